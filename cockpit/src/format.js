// Display helpers.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function bytes(n) {
    if (n === undefined || n === null)
        return "";
    let v = Number(n);
    let i = 0;
    while (v >= 1024 && i < UNITS.length - 1) {
        v /= 1024;
        i++;
    }
    return i === 0 ? `${v} B` : `${v.toFixed(1)} ${UNITS[i]}`;
}

export function rate(bps) {
    return bps ? `${bytes(Math.round(bps))}/s` : "";
}

// The size units the forms offer: a number times one of these.
export const SIZE_UNITS = [
    { label: "MiB", factor: 1024 ** 2 },
    { label: "GiB", factor: 1024 ** 3 },
    { label: "TiB", factor: 1024 ** 4 },
];

export function time(d) {
    return d.toLocaleTimeString();
}
