#!/usr/bin/env bash
# The main job: start the volagent daemon with a default loop pool, drive it
# with busctl as an administrator would (create an overlay, look at it), then
# show a guest-written header in a raw disk being caught.
#
# On a host with a system bus the daemon joins it (it needs the bus policy
# installed, as the package does). Without one (containers, this project's
# CI machines) the demo starts a private bus of the system type that reads
# the repository's own policy file, and points everything at it.
#
# With a terminal, the daemon keeps running until Ctrl-C; otherwise the demo
# stops it and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/private-bus.sh
bin=$PWD/${1:-bin/volagent}
daemon=$PWD/${2:-bin/volagentd}
work=$(mktemp -d /var/tmp/volagent-demo.XXXXXX)
daemon_pid= bus_pid=

cleanup() {
	set +e
	[ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
	[ -n "$bus_pid" ] && kill "$bus_pid" 2>/dev/null
	for loop in $(losetup -a | awk -F: -v d="$work/" 'index($0, d) { print $1 }'); do
		losetup -d "$loop"
	done
	rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (the daemon attaches loop devices)" >&2; exit 1; }

if [ -S /run/dbus/system_bus_socket ] && [ -f /usr/share/dbus-1/system.d/org.volagent.VolAgent1.conf ]; then
	address=unix:path=/run/dbus/system_bus_socket
else
	mkdir -p "$work/system.d"
	cp packaging/dbus/org.volagent.VolAgent1.conf "$work/system.d/"
	start_private_bus "$work" "$work/system.d"
	address=$bus_address
	echo "demo: no system bus with volagent's policy here; using a private system-type bus at $work/bus"
fi
export DBUS_SYSTEM_BUS_ADDRESS=$address

# A base image a guest would boot from, and the daemon's configuration:
# one loop pool whose overlays may be backed by files under $work/images.
mkdir -p "$work/images"
truncate -s 256M "$work/images/debian.raw"
printf 'hello from the base image\n' | dd of="$work/images/debian.raw" conv=notrunc status=none
cat >"$work/volagent.toml" <<EOF
[[pool]]
name = "default"
type = "loop"
directory = "$work/pool"
backing_roots = ["$work/images"]
initial_size = "64M"
chunk_size = "64M"
policy = "enforce"
EOF

step volagentd --config "$work/volagent.toml" '&'
"$daemon" --config "$work/volagent.toml" 2>"$work/daemon.log" &
daemon_pid=$!
wait_for_volagent "$address" "$daemon_pid" "$work/daemon.log"
bc() { busctl --address="$address" "$@"; }

step busctl tree org.volagent.VolAgent1
bc tree org.volagent.VolAgent1

step busctl call org.volagent.VolAgent1 /org/volagent/VolAgent1 org.volagent.VolAgent1.Manager \
	CreateOverlay ssssta{sv} default vm1 "$work/images/debian.raw" raw 0 0
reply=$(bc call org.volagent.VolAgent1 /org/volagent/VolAgent1 org.volagent.VolAgent1.Manager \
	CreateOverlay ssssta{sv} default vm1 "$work/images/debian.raw" raw 0 0)
echo "$reply"
volume=$(awk '{ gsub(/"/, "", $2); print $2 }' <<<"$reply")

step busctl introspect org.volagent.VolAgent1 "$volume" org.volagent.VolAgent1.Volume
bc introspect org.volagent.VolAgent1 "$volume" org.volagent.VolAgent1.Volume

# Creating an overlay without a backing format is refused, never guessed.
step busctl call ... CreateOverlay ssssta{sv} default vm2 "$work/images/debian.raw" '""' 0 0 '(no backing format)'
bc call org.volagent.VolAgent1 /org/volagent/VolAgent1 org.volagent.VolAgent1.Manager \
	CreateOverlay ssssta{sv} default vm2 "$work/images/debian.raw" "" 0 0 || true

step volagent volumes
"$bin" volumes

device=$(bc get-property org.volagent.VolAgent1 "$volume" org.volagent.VolAgent1.Volume DevicePath | awk '{ gsub(/"/, "", $2); print $2 }')
step volagent inspect --allow-backing "$work/images" "$device"
"$bin" inspect --allow-backing "$work/images" "$device"

step volagent export --allow-backing "$work/images" "$device" "$work/guest-view.raw"
"$bin" export --allow-backing "$work/images" "$device" "$work/guest-view.raw"
echo "the guest sees: $(head -c 25 "$work/guest-view.raw")"

# A guest owns its raw disk and can write a qcow2 header into it that names
# a host file; a host that probed formats would open that file as backing.
qemu-img create -q -f qcow2 -u -b /etc/shadow -F raw "$work/fake.qcow2" 256M
cp "$work/images/debian.raw" "$work/guest-disk.raw"
dd if="$work/fake.qcow2" of="$work/guest-disk.raw" bs=4096 count=1 conv=notrunc status=none
step volagent inspect --format raw "$work/guest-disk.raw" '(a raw disk a guest wrote a qcow2 header into)'
set +e
"$bin" inspect --format raw "$work/guest-disk.raw"
status=$?
set -e
echo "(exit status $status: refused)"
[ "$status" -eq 3 ]

if [ -t 0 ]; then
	echo
	echo "The daemon is running (bus $address). Try: volagent volumes; volagent jobs --watch"
	echo "Press Ctrl-C to stop it and clean up."
	wait "$daemon_pid" || true
	daemon_pid=
fi
