// The page in a real browser: Debian's chromium, headless, driven by
// playwright-core against cockpit-ws sessions that scripts/cockpit-test.sh
// starts (one as root, one as nobody) on a private system bus where
// volagentd runs. Every flow is asserted on what the page shows; each view
// is saved as a screenshot in VOLAGENT_TEST_OUT. Run it through
// scripts/cockpit-test.sh (make cockpit-test), never on its own.
import { chromium } from "playwright-core";
import { execFile } from "node:child_process";
import { mkdirSync } from "node:fs";
import { promisify } from "node:util";
import assert from "node:assert/strict";

const env = name => {
    const v = process.env[name];
    if (!v)
        throw new Error(`${name} is not set: run scripts/cockpit-test.sh`);
    return v;
};
const work = env("VOLAGENT_TEST_WORK");
const out = env("VOLAGENT_TEST_OUT");
const bus = env("VOLAGENT_TEST_BUS");
const rootURL = env("VOLAGENT_TEST_ROOT_URL");
const nobodyURL = env("VOLAGENT_TEST_NOBODY_URL");
const pagePath = "/cockpit/@localhost/volagent/index.html";
const images = `${work}/images`;
const TIMEOUT = 30_000;

const run = promisify(execFile);
const MANAGER = ["org.volagent.VolAgent1", "/org/volagent/VolAgent1", "org.volagent.VolAgent1.Manager"];

// busctl on the test's bus as root; a shell for the fd redirection.
async function busctl(script) {
    return run("/bin/bash", ["-c", `busctl --address="$BUS" ${script}`], { env: { ...process.env, BUS: bus } });
}

const results = [];
let rootPage = null;
async function flow(name, fn) {
    const t0 = Date.now();
    // A failed flow may leave a dialog open: the next starts without it.
    if (rootPage && await rootPage.getByRole("dialog").count() > 0) {
        await rootPage.keyboard.press("Escape");
        await rootPage.getByRole("dialog").waitFor({ state: "detached" });
    }
    try {
        await fn();
        results.push({ name, ok: true, ms: Date.now() - t0 });
        console.log(`ok   ${name} (${Date.now() - t0} ms)`);
    } catch (err) {
        results.push({ name, ok: false, ms: Date.now() - t0 });
        console.log(`FAIL ${name}: ${err.stack || err}`);
    }
}

async function shot(page, name) {
    await page.screenshot({ path: `${out}/${name}.png`, fullPage: true });
}

async function openPage(context, url) {
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);
    page.on("pageerror", err => console.log(`page error (${url}): ${err}`));
    page.on("console", msg => msg.type() === "error" && console.log(`console error (${url}): ${msg.text()}`));
    await page.goto(url + pagePath);
    await page.getByTestId("pool").first().waitFor();
    return page;
}

async function tab(page, name) {
    await page.getByRole("tab", { name }).click();
}

// createOverlay fills the form and submits it.
async function createOverlay(page, { pool, name, backing, format }) {
    await page.getByRole("button", { name: "Create overlay" }).click();
    const dialog = page.getByTestId("create-dialog");
    await dialog.waitFor();
    if (pool)
        await dialog.getByLabel("Pool").selectOption(pool);
    await dialog.getByLabel("Name").fill(name);
    await dialog.getByLabel("Backing path").fill(backing);
    await dialog.getByLabel("Backing format").selectOption(format);
    await dialog.getByRole("button", { name: "Create", exact: true }).click();
    return dialog;
}

// unlabelled lists controls without an accessible name.
async function unlabelled(page) {
    return page.evaluate(() => {
        const bad = [];
        for (const el of document.querySelectorAll("button, input, select, textarea, [role=tab]")) {
            const id = el.id;
            const label = el.getAttribute("aria-label") || el.getAttribute("aria-labelledby") ||
                (id && document.querySelector(`label[for="${CSS.escape(id)}"]`)) || el.textContent.trim() || el.title;
            if (!label && el.type !== "hidden")
                bad.push(el.outerHTML.slice(0, 120));
        }
        return bad;
    });
}

mkdirSync(out, { recursive: true });
const context = await chromium.launchPersistentContext(`${work}/chromium-profile`, {
    executablePath: env("VOLAGENT_TEST_CHROMIUM"),
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 900 },
});

try {
    const page = rootPage = await openPage(context, rootURL);
    await flow("pools show capacity, free space and policy mode", async () => {
        const pool = page.locator('[data-testid=pool][data-pool="default"]');
        await pool.getByText("policy: enforce").waitFor();
        await page.locator('[data-testid=pool][data-pool="audit"]').getByText("policy: audit").waitFor();
        assert.ok(await pool.getByRole("progressbar", { name: "Free space in pool default" }).count() === 1);
        await shot(page, "pools");
    });

    await flow("1 create an overlay through the form: it is in the table, its chain shows the raw backing", async () => {
        const dialog = await createOverlay(page, { pool: "default", name: "vm1", backing: `${images}/base.raw`, format: "raw" });
        await dialog.waitFor({ state: "detached" });
        await page.getByTestId("volume-title").getByText("Volume vm1").waitFor();
        const nodes = page.getByTestId("chain-node");
        await nodes.nth(1).waitFor();
        assert.equal(await nodes.count(), 2, "overlay and its base");
        assert.equal(await nodes.nth(0).getAttribute("data-format"), "qcow2");
        assert.equal(await page.getByTestId("link-format").first().textContent(), "raw");
        assert.equal(await nodes.nth(1).getAttribute("data-format"), "raw");
        await nodes.nth(1).getByText(`${images}/base.raw`).waitFor();
        await nodes.nth(0).getByText("accepted").waitFor();
        const plot = page.getByTestId("allocation-plot");
        await plot.waitFor();
        assert.match(await plot.getAttribute("aria-label"), /: 1 samples,/);
        // A write past the allocated end: the plot follows PropertiesChanged.
        const path = await page.getByTestId("volume-title").getAttribute("data-path");
        await busctl(`call ${MANAGER[0]} ${path} org.volagent.VolAgent1.Volume Write 'taya{sv}' 33554432 4 1 2 3 4 0`);
        await page.waitForFunction(() => /: [2-9]\d* samples,/.test(
            document.querySelector("[data-testid=allocation-plot]").getAttribute("aria-label")));
        await shot(page, "volume");
        await page.getByRole("button", { name: "All volumes" }).click();
        await page.locator('[data-testid=volume-row][data-volume="vm1"]').waitFor();
        await shot(page, "volumes");
    });

    await flow("3 a refused CreateOverlay shows the daemon's message in full", async () => {
        // The daemon's own words, as busctl gets them for the same request.
        let cli = "";
        try {
            await busctl(`call ${MANAGER.join(" ")} CreateOverlay 'ssssta{sv}' default refused-cli ${images}/hostile.raw raw 0 0`);
        } catch (err) {
            cli = err.stderr.trim().replace(/^Call failed: /, "");
        }
        assert.match(cli, /header/, `busctl got the refusal: ${cli}`);
        const dialog = await createOverlay(page, { pool: "default", name: "refused-page", backing: `${images}/hostile.raw`, format: "raw" });
        const alert = dialog.getByTestId("error");
        await alert.waitFor();
        const text = await alert.textContent();
        assert.match(text, /org\.volagent\.VolAgent1\.Error\.PolicyViolation: /);
        assert.ok(text.includes(cli), `the page shows the daemon's message in full:\n page: ${text}\n busctl: ${cli}`);
        assert.match(text, /\[codes: [a-z,-]*header-in-raw/);
        await shot(page, "refused");
        await dialog.getByRole("button", { name: "Cancel" }).click();
        await dialog.waitFor({ state: "detached" });
    });

    await flow("policy feed shows the violations volagent signals", async () => {
        await tab(page, "Policy");
        // Audit mode: the overlay is made, and the violation signalled.
        await busctl(`call ${MANAGER.join(" ")} CreateOverlay 'ssssta{sv}' audit audited ${images}/hostile.raw raw 0 0`);
        const row = page.getByTestId("violation-row").filter({ hasText: "hostile.raw" }).first();
        await row.waitFor();
        assert.match(await row.textContent(), /header-in-raw/);
        // The qemu hook's question about a domain: a violation per disk.
        const xml = `<domain type='kvm'><name>va-cockpit-test</name><devices><disk type='file' device='disk'>` +
            `<driver name='qemu' type='raw'/><source file='${images}/hostile.raw'/><target dev='vdb' bus='virtio'/>` +
            `</disk></devices></domain>`;
        await busctl(`call ${MANAGER.join(" ")} CheckDomain 'sa{sv}' "${xml}" 0`);
        const domainRow = page.getByTestId("violation-row").filter({ hasText: "va-cockpit-test" }).first();
        await domainRow.waitFor();
        assert.equal(await domainRow.getByTestId("violation-domain").textContent(), "va-cockpit-test");
        assert.equal(await domainRow.getByTestId("violation-disk").textContent(), "vdb");
        await shot(page, "policy");
    });

    await flow("2 an import started through D-Bus: the progress bar moves and the job completes", async () => {
        await tab(page, "Jobs");
        // Every progress value the page shows, from before the job starts.
        await page.evaluate(() => {
            window.seenProgress = [];
            const record = () => document.querySelectorAll("[data-testid=job-progress]")
                    .forEach(el => window.seenProgress.push(Number(el.getAttribute("data-progress"))));
            new MutationObserver(record).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ["data-progress"] });
        });
        // busctl cannot pass a file descriptor; gdbus can.
        const { stdout } = await run("/bin/bash", ["-c",
            `gdbus call --address "$BUS" --dest ${MANAGER[0]} --object-path ${MANAGER[1]} --method ${MANAGER[2]}.Import ` +
            `default imported "handle 3" raw "{}" 3<${images}/import.raw`], { env: { ...process.env, BUS: bus } });
        const id = /jobs\/(\d+)'/.exec(stdout)[1];
        const row = page.locator(`[data-testid=job-row][data-job="${id}"]`);
        await row.waitFor();
        await page.waitForFunction(() => window.seenProgress.some(p => p > 0 && p < 1), null, { timeout: 120_000 });
        await shot(page, "jobs-running");
        await page.locator(`[data-testid=job-row][data-job="${id}"][data-state="succeeded"]`).waitFor({ timeout: 300_000 });
        assert.equal(await row.getByTestId("job-state").textContent(), "succeeded");
        assert.equal(await row.getByRole("progressbar").getAttribute("aria-valuenow"), "100");
        const seen = await page.evaluate(() => window.seenProgress);
        assert.ok(new Set(seen.filter(p => p > 0 && p < 1)).size >= 1, `progress moved: ${seen}`);
        await shot(page, "jobs");
    });

    await flow("an overlay over a volagent volume: the chain reads both", async () => {
        await page.getByRole("button", { name: "Create overlay" }).click();
        const dialog = page.getByTestId("create-dialog");
        await dialog.getByLabel("Pool").selectOption("default");
        await dialog.getByLabel("Name").fill("vm2");
        await dialog.getByLabel("A volagent volume").check();
        await dialog.getByLabel("Backing volume").selectOption({ label: "imported (default, qcow2)" });
        await dialog.getByRole("button", { name: "Create", exact: true }).click();
        await dialog.waitFor({ state: "detached" });
        await page.getByTestId("volume-title").getByText("Volume vm2").waitFor();
        const nodes = page.getByTestId("chain-node");
        await nodes.nth(1).getByText("imported").waitFor();
        assert.equal(await nodes.count(), 2);
        assert.equal(await page.getByTestId("link-format").first().textContent(), "qcow2");
        await nodes.nth(0).getByText("accepted").waitFor();
        await nodes.nth(1).getByText("accepted").waitFor();
        await shot(page, "volume-chain");
    });

    await flow("inspect a path shows the daemon's verdict", async () => {
        await tab(page, "Inspect");
        await page.getByLabel("Path of the image").fill(`${images}/hostile.raw`);
        await page.getByLabel("Read it as").selectOption("raw");
        await page.getByRole("button", { name: "Inspect", exact: true }).click();
        await page.getByTestId("verdict").getByText("refused").waitFor();
        await page.getByTestId("inspect-report").getByText("header-in-raw").waitFor();
        await shot(page, "inspect");
    });

    await flow("delete and resize confirmations name the volume and its users", async () => {
        await tab(page, "Volumes");
        await page.getByRole("button", { name: "Delete volume vm1" }).click();
        const del = page.getByTestId("delete-dialog");
        await del.getByText("Delete volume vm1?").waitFor();
        await del.getByTestId("users").getByText("volagent knows no users of vm1").waitFor();
        await del.getByRole("button", { name: "Cancel" }).click();
        await del.waitFor({ state: "detached" });
        // A volume with users: the dialog names them, and the daemon's refusal shows in full.
        await page.getByRole("button", { name: "Delete volume imported" }).click();
        await del.getByTestId("users").getByText("overlay vm2 (pool default)").waitFor();
        await shot(page, "delete");
        await del.getByRole("button", { name: "Delete imported" }).click();
        await del.getByTestId("error").getByText(/^org\.volagent\.VolAgent1\.Error\.Busy: .*vm2/).waitFor();
        await shot(page, "delete-refused");
        await del.getByRole("button", { name: "Cancel" }).click();
        await del.waitFor({ state: "detached" });
        // Shrinking is refused by the daemon: its message is shown in full.
        await page.getByRole("button", { name: "Resize volume vm1" }).click();
        const rs = page.getByTestId("resize-dialog");
        await rs.getByLabel("New virtual size", { exact: true }).fill("1");
        await rs.getByLabel("New virtual size: unit").selectOption("MiB");
        await rs.getByRole("button", { name: "Resize vm1" }).click();
        await rs.getByTestId("error").getByText(/org\.volagent\.VolAgent1\.Error\.\w+: /).waitFor();
        await rs.getByRole("button", { name: "Cancel" }).click();
        await rs.waitFor({ state: "detached" });
    });

    await flow("the volumes table filters and sorts", async () => {
        await tab(page, "Volumes");
        const rows = page.getByTestId("volume-row");
        await page.getByLabel("Filter volumes").fill("vm");
        await page.waitForFunction(() => document.querySelectorAll("[data-testid=volume-row]").length === 2);
        assert.deepEqual(await rows.evaluateAll(r => r.map(x => x.dataset.volume)), ["vm1", "vm2"]);
        await page.getByRole("button", { name: "Name" }).click(); // ascending already: now descending
        await page.waitForFunction(() => document.querySelector("[data-testid=volume-row]").dataset.volume === "vm2");
        await page.getByRole("button", { name: "Allocated" }).click();
        await page.getByLabel("Filter volumes").fill("");
        await page.waitForFunction(() => document.querySelectorAll("[data-testid=volume-row]").length === 4);
        const sizes = await rows.evaluateAll(r => r.map(x => x.dataset.volume));
        assert.equal(sizes[sizes.length - 1], "imported", `ascending by allocation: ${sizes}`);
    });

    await flow("keyboard, labels and narrow widths", async () => {
        assert.deepEqual(await unlabelled(page), [], "every control has a label");
        // The tabs are reached and switched with the keyboard alone.
        await page.getByRole("tab", { name: "Volumes" }).focus();
        await page.keyboard.press("Tab");
        await page.keyboard.press("Enter");
        await page.getByRole("tab", { name: "Jobs", selected: true }).waitFor();
        await page.setViewportSize({ width: 380, height: 900 });
        await tab(page, "Volumes");
        await page.locator('[data-testid=volume-row][data-volume="vm1"]').waitFor();
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
        assert.ok(overflow <= 0, `no horizontal scrolling at 380 px (overflow ${overflow} px)`);
        await shot(page, "volumes-narrow");
        await page.setViewportSize({ width: 1280, height: 900 });
    });

    await flow("4 a Cockpit user without privileges sees the data and is refused the actions", async () => {
        const p = await openPage(context, nobodyURL);
        await tab(p, "Volumes");
        await p.locator('[data-testid=volume-row][data-volume="vm1"]').waitFor();
        const dialog = await createOverlay(p, { pool: "default", name: "by-nobody", backing: `${images}/base.raw`, format: "raw" });
        const alert = dialog.getByTestId("error");
        await alert.waitFor();
        // The bus policy (packaging/dbus) refuses nobody before the daemon does.
        assert.match(await alert.locator("pre").textContent(), /^org\.freedesktop\.DBus\.Error\.AccessDenied: Rejected send message.*member="CreateOverlay"/);
        await shot(p, "nobody-refused");
        await dialog.getByRole("button", { name: "Cancel" }).click();
        await p.getByRole("button", { name: "Delete volume vm1" }).click();
        const del = p.getByTestId("delete-dialog");
        await del.getByRole("button", { name: "Delete vm1" }).click();
        await del.getByTestId("error").getByText(/AccessDenied: Rejected send message.*member="Delete"/).waitFor();
        await del.getByRole("button", { name: "Cancel" }).click();
        const { stdout } = await busctl(`--json=short call ${MANAGER.slice(0, 2).join(" ")} org.freedesktop.DBus.ObjectManager GetManagedObjects`);
        assert.match(stdout, /"Name":\{"type":"s","data":"vm1"\}/, "vm1 still exists");
        assert.doesNotMatch(stdout, /by-nobody/, "nobody made no volume");
        await p.close();
    });
} finally {
    await context.close();
}

const failed = results.filter(r => !r.ok).length;
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
