#!/usr/bin/env bash
# Builds the Debian 12 guest of the VM tests (scripts/vm/run.sh) from
# Debian's packages with mmdebstrap, and caches it under a key derived from
# its recipe: this script and the files under scripts/vm/guest/ that go into
# the image. A fresh machine builds it (about 2-3 minutes); later runs reuse it.
#
# Usage: build-image.sh  (prints the image directory)
# The image directory holds root.img (a raw ext4 file system, no partition
# table), vmlinuz and initrd.img (booted directly with qemu's -kernel), and
# root.uuid (the file system's UUID: the guest boots with root=UUID=, since
# /dev/vda can lose the race against a second virtio disk).
#
# Mirrors: the host's own apt sources (/etc/apt/sources.list and
# /etc/apt/sources.list.d/*.list|*.sources), so the guest comes from
# wherever this machine gets its packages. Nothing is mounted: mmdebstrap
# writes a directory, mkfs.ext4 -d turns it into the file system image.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${VMTEST_CACHE:-/var/cache/volagent-vmtest}

# The packages of a virtualization host (systemd, udev, D-Bus, polkitd,
# device-mapper LVM with lvmlockd and sanlock, libvirt with Debian's
# defaults, qemu with SeaBIOS) and what the in-guest tests use.
packages=(
	linux-image-amd64 initramfs-tools systemd-sysv udev dbus polkitd kmod
	lvm2 lvm2-lockd sanlock thin-provisioning-tools
	libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
	qemu-system-x86 qemu-utils seabios ipxe-qemu
	e2fsprogs procps jq
)

key=$( { cat "$0"; printf '%s\n' "${packages[@]}"; find "$here/guest" -type f | sort | xargs cat; } | sha256sum | cut -c1-16)
out=$cache/$key
if [ -f "$out/done" ]; then
	echo "$out"
	exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "build-image: needs root (mmdebstrap's root mode)" >&2; exit 1; }
for tool in mmdebstrap mkfs.ext4; do
	command -v "$tool" >/dev/null || { echo "build-image: needs $tool; run scripts/install-deps.sh" >&2; exit 1; }
done

sources=()
[ -f /etc/apt/sources.list ] && sources+=(/etc/apt/sources.list)
for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
	[ -f "$f" ] && sources+=("$f")
done
[ "${#sources[@]}" -gt 0 ] || { echo "build-image: no apt sources on this host" >&2; exit 1; }

mkdir -p "$cache"
# One build at a time; a second run waits and takes the first one's image.
exec 9>"$cache/.lock"
flock 9
if [ -f "$out/done" ]; then
	echo "$out"
	exit 0
fi
work=$(mktemp -d "$cache/build.XXXXXX")
# The root is built in memory where there is room: dpkg syncs every file
# it unpacks, which costs minutes on a disk and nothing on tmpfs.
tmp=${VMTEST_BUILD_TMP:-/dev/shm}
if [ -d "$tmp" ] && [ "$(df -P -k "$tmp" | awk 'NR == 2 { print $4 }')" -gt $((4 << 20)) ]; then
	root=$(mktemp -d "$tmp/volagent-vmtest-root.XXXXXX")
else
	root=$work/root
fi
trap 'rm -rf "$work" "$root"' EXIT
start=$(date +%s)
echo "build-image: building the guest image $key (mmdebstrap, a few minutes)" >&2

uuid=$(cat /proc/sys/kernel/random/uuid)
mmdebstrap --quiet --mode=root --variant=minbase --dpkgopt=force-unsafe-io \
	--include="$(IFS=,; echo "${packages[*]}")" \
	--customize-hook="tar -C '$here/guest/root' --owner=0 --group=0 -c . | tar -C \"\$1\" -x --no-same-owner" \
	--customize-hook="chroot \"\$1\" /bin/sh /usr/local/lib/vmtest/setup.sh $uuid" \
	bookworm "$root" "${sources[@]}" >&2

mkdir -p "$work/out"
cp "$root"/boot/vmlinuz-* "$work/out/vmlinuz"
cp "$root"/boot/initrd.img-* "$work/out/initrd.img"
echo "$uuid" >"$work/out/root.uuid"
# Sparse; the guest's loop pool and logs live on it.
truncate -s 6G "$work/out/root.img"
mkfs.ext4 -q -F -L vmroot -U "$uuid" -d "$root" "$work/out/root.img"
rm -rf "$root"
touch "$work/out/done"
rm -rf "$out"
mv "$work/out" "$out"
# Images of older recipes are of no use any more.
find "$cache" -mindepth 1 -maxdepth 1 -type d ! -path "$out" -exec rm -rf {} +
echo "build-image: built $out in $(( $(date +%s) - start )) s" >&2
echo "$out"
