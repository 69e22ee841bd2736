// A volume's backing chain, as the daemon reports it: each image is read
// by Manager.Inspect as the format the image above it recorded (the
// volume's own format for the first), never guessed. Where Inspect cannot
// read an image (an unprivileged session cannot open host devices), the
// chain goes on from the volume's own BackingName and BackingFormat
// properties, and says so.

import { inspect, errorText } from "./volagent.js";

const MAX_DEPTH = 16;

// The violations that are about the link to the backing rather than the
// image itself: they are drawn on the arrow.
const LINK_CODES = new Set(["backing-name", "backing-format-missing", "backing-format", "not-allowed", "header-in-raw"]);

// findVolume is the volagent volume a recorded backing name refers to:
// its device, or (loop pools) its file in the pool directory, NAME.img.
export function findVolume(volumes, backing) {
    if (!backing)
        return null;
    const all = Object.values(volumes);
    const byDevice = all.find(v => v.DevicePath === backing);
    if (byDevice)
        return byDevice;
    const base = backing.split("/").pop();
    return all.find(v => `${v.Name}.img` === base) || null;
}

// buildChain returns [{path, format, volume, report, error, violations,
// link: {name, format, violations}}], the volume first.
export async function buildChain(volume, volumes) {
    const nodes = [];
    let path = volume.DevicePath;
    let format = volume.Format;
    let vol = volume;
    for (let depth = 0; depth < MAX_DEPTH && path; depth++) {
        const node = { path, format, volume: vol, report: null, error: null, violations: [], link: null };
        nodes.push(node);
        try {
            node.report = await inspect(path, format);
            node.violations = node.report.violations || [];
        } catch (err) {
            node.error = errorText(err);
        }
        let backing = "";
        let backingFormat = "";
        if (node.report) {
            const q = node.report.qcow2 || {};
            backing = q["backing-resolved"] || q["backing-file"] || "";
            backingFormat = q["backing-format"] || "";
        } else if (vol) {
            backing = vol.BackingName;
            backingFormat = vol.BackingFormat;
        }
        if (!backing)
            break;
        node.link = {
            name: backing,
            format: backingFormat,
            violations: node.violations.filter(v => LINK_CODES.has(v.code)),
        };
        node.violations = node.violations.filter(v => !LINK_CODES.has(v.code));
        // Only volagent's own volumes are opened (through their devices):
        // a name a header records is hostile input, and this page has no
        // gate to check it through, so anything else ends the chain unread.
        const next = findVolume(volumes, backing);
        if (!next || node.link.violations.length > 0 || !backingFormat) {
            nodes.push({
                path: backing, format: backingFormat, volume: next, report: null, violations: [], link: null,
                note: !backingFormat
                    ? "no backing format recorded: volagent never guesses one, so the image is not read"
                    : next
                        ? "not read: the link to it breaks the policy"
                        : "not read: not a volagent volume (volagent opens a backing file only through its gate)",
                external: !next,
            });
            break;
        }
        vol = next;
        path = next.DevicePath;
        format = backingFormat;
    }
    return nodes;
}
