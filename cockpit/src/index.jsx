import "@patternfly/react-core/dist/styles/base.css";
import "./volagent.css";

import { createRoot } from "react-dom/client";
import { App } from "./app.jsx";
import { Store } from "./volagent.js";

document.addEventListener("DOMContentLoaded", () => {
    createRoot(document.getElementById("app")).render(<App store={new Store()} />);
});
