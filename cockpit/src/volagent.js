// The page's view of volagent: Cockpit's D-Bus channel to
// org.volagent.VolAgent1 on the system bus, ObjectManager proxies for
// pools, volumes and jobs (kept current by PropertiesChanged), and the
// signals. Authorization is volagent's: calls go out as the Cockpit user
// (or as root when the session has administrative access), and a refusal
// comes back as the daemon's (or the bus's) own error.

/* global cockpit */

export const BUS_NAME = "org.volagent.VolAgent1";
export const ROOT = "/org/volagent/VolAgent1";
export const IFACE = "org.volagent.VolAgent1";

// How many allocation samples a volume's plot keeps.
const HISTORY = 240;

export class Store {
    constructor() {
        this.listeners = new Set();
        this.pools = {};
        this.volumes = {};
        this.jobs = {};
        this.version = null;
        this.violations = []; // newest first
        this.spaceLowEvents = []; // newest first
        this.history = {}; // volume path -> [{t, allocated, device}]
        this.problem = null; // the channel closed: why
        this.loaded = false;
        this.serial = 0;

        this.client = cockpit.dbus(BUS_NAME, { bus: "system", superuser: "try" });
        this.client.addEventListener("close", (_ev, options) => {
            this.problem = cockpit.message(options);
            this.changed();
        });

        const track = (iface, ns, map, onUpdate) => {
            const proxies = this.client.proxies(`${IFACE}.${iface}`, `${ROOT}/${ns}`, { watch: true });
            proxies.addEventListener("changed", (_ev, proxy) => {
                map[proxy.path] = { path: proxy.path, ...proxy.data };
                if (onUpdate) onUpdate(map[proxy.path]);
                this.changed();
            });
            proxies.addEventListener("removed", (_ev, proxy) => {
                delete map[proxy.path];
                this.changed();
            });
            return proxies.wait();
        };
        const waits = [
            track("Pool", "pools", this.pools),
            track("Volume", "volumes", this.volumes, v => this.sample(v)),
            track("Job", "jobs", this.jobs),
        ];
        this.manager = this.client.proxy(`${IFACE}.Manager`, ROOT, { watch: true });
        this.manager.addEventListener("changed", () => {
            this.version = this.manager.Version;
            this.changed();
        });
        waits.push(this.manager.wait());
        Promise.allSettled(waits).then(() => {
            this.loaded = true;
            this.changed();
        });

        this.client.subscribe({ interface: `${IFACE}.Manager`, member: "PolicyViolation" },
                              (_path, _iface, _signal, args) => {
                                  const [subject, code, message] = args;
                                  this.violations = [{ id: ++this.serial, time: new Date(), subject, code, message, ...parseSubject(subject) },
                                      ...this.violations].slice(0, 500);
                                  this.changed();
                              });
        // Pool.SpaceLow is newer than some daemons: subscribing to a signal
        // that never comes costs nothing.
        this.client.subscribe({ interface: `${IFACE}.Pool`, member: "SpaceLow" },
                              (path, _iface, _signal, args) => {
                                  this.spaceLowEvents = [{ id: ++this.serial, time: new Date(), path, args },
                                      ...this.spaceLowEvents].slice(0, 100);
                                  this.changed();
                              });
    }

    // sample records a volume's allocation when it moved.
    sample(v) {
        const h = this.history[v.path] || (this.history[v.path] = []);
        const last = h[h.length - 1];
        if (last && last.allocated === v.HighestAllocated && last.device === v.DeviceSize)
            return;
        h.push({ t: Date.now(), allocated: v.HighestAllocated, device: v.DeviceSize });
        if (h.length > HISTORY)
            h.splice(0, h.length - HISTORY);
    }

    subscribe(fn) {
        this.listeners.add(fn);
        return () => this.listeners.delete(fn);
    }

    changed() {
        this.listeners.forEach(fn => fn());
    }

    poolName(path) {
        const p = this.pools[path];
        return p ? p.Name : path;
    }

    // Calls; each rejects with the daemon's error (name and message).
    createOverlay(pool, name, backing, backingFormat, virtualSize) {
        return this.client.call(ROOT, `${IFACE}.Manager`, "CreateOverlay",
                                [pool, name, backing, backingFormat, virtualSize, {}]);
    }

    resize(volumePath, size) {
        return this.client.call(volumePath, `${IFACE}.Volume`, "Resize", [size, {}]);
    }

    remove(volumePath) {
        return this.client.call(volumePath, `${IFACE}.Volume`, "Delete", [{}]);
    }

    cancelJob(jobPath) {
        return this.client.call(jobPath, `${IFACE}.Job`, "Cancel", [{}]);
    }
}

// parseSubject reads the subject CheckDomain gives a violation
// ("domain NAME disk TARGET"); other subjects name an image.
export function parseSubject(subject) {
    const m = /^domain (\S+) disk (\S+)$/.exec(subject || "");
    return m ? { domain: m[1], disk: m[2] } : { domain: "", disk: "" };
}

// inspect asks the daemon's Manager.Inspect about path read as format.
// Cockpit's D-Bus channel cannot send a file descriptor, so gdbus (run
// through the bridge, as the session's user or root) opens the path and
// passes it as the handle; the verdict is the daemon's. Rejects with the
// full message.
export function inspect(path, format) {
    const script = 'exec gdbus call --system --dest org.volagent.VolAgent1 --object-path /org/volagent/VolAgent1 ' +
        '--method org.volagent.VolAgent1.Manager.Inspect "handle 3" "$2" "{\'name\': <$3>}" 3<"$1"';
    return cockpit.spawn(["/bin/sh", "-c", script, "volagent-inspect", path, format, gvariantString(path)],
                         { superuser: "try", err: "message" })
            .then(out => JSON.parse(parseGVariantString(out)));
}

// gvariantString quotes s in GVariant text format.
export function gvariantString(s) {
    return "'" + s.replace(/[\\']/g, c => "\\" + c) + "'";
}

// parseGVariantString reads the one string of a reply gdbus prints as
// ('...',) or ("...",), undoing GVariant's escapes.
export function parseGVariantString(out) {
    const m = /^\((['"])([\s\S]*)\1,\)$/.exec(out.trim());
    if (!m)
        throw new Error(`unexpected reply from gdbus: ${out}`);
    const simple = { n: "\n", t: "\t", r: "\r", a: "\x07", b: "\b", f: "\f", v: "\v" };
    return m[2].replace(/\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)/g, (_all, e) => {
        if (e[0] === "u" || e[0] === "U")
            return String.fromCodePoint(parseInt(e.slice(1), 16));
        return simple[e] ?? e;
    });
}

// errorText is an error in full: the D-Bus error name and the daemon's
// message, or a process's message and exit status.
export function errorText(err) {
    if (!err)
        return "";
    if (err.name && err.message && err.name !== "Error")
        return `${err.name}: ${err.message}`;
    if (err.message)
        return err.message + (err.exit_status ? ` (exit status ${err.exit_status})` : "");
    if (err.problem)
        return cockpit.message(err);
    return String(err);
}
