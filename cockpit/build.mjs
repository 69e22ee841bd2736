// Builds the page into dist/ (what the packages ship in
// /usr/share/cockpit/volagent): index.html, manifest.json, index.js,
// index.css and the fonts the CSS names. cockpit.js is not bundled:
// cockpit-ws serves it at ../base1/cockpit.js.
import * as esbuild from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";

const out = "dist";
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });

await esbuild.build({
    entryPoints: ["src/index.jsx"],
    bundle: true,
    outdir: out,
    minify: true,
    target: ["es2020"],
    jsx: "automatic",
    legalComments: "external",
    logLevel: "warning",
    define: { "process.env.NODE_ENV": '"production"' },
    loader: { ".woff2": "file", ".woff": "file", ".svg": "file", ".png": "file", ".jpg": "file" },
    assetNames: "assets/[name]-[hash]",
});
for (const f of ["index.html", "manifest.json"]) {
    copyFileSync(f, `${out}/${f}`);
}
