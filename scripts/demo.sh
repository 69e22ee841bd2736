#!/usr/bin/env bash
# The main job for now: make a base disk and a qcow2 overlay of it with
# volagent itself, inspect the overlay, then show a guest-written header in a
# raw disk being caught. Everything is made in a temporary directory.
set -euo pipefail
bin=${1:-bin/volagent}
work=$(mktemp -d /var/tmp/volagent-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

truncate -s 64M "$work/base.raw"
printf 'hello from the base image\n' | dd of="$work/base.raw" conv=notrunc status=none

step volagent create --backing "$work/base.raw" --backing-format raw "$work/overlay.qcow2"
"$bin" create --backing "$work/base.raw" --backing-format raw "$work/overlay.qcow2"

step volagent inspect --allow-backing "$work" "$work/overlay.qcow2"
"$bin" inspect --allow-backing "$work" "$work/overlay.qcow2"

step volagent export --allow-backing "$work" "$work/overlay.qcow2" "$work/guest-view.raw"
"$bin" export --allow-backing "$work" "$work/overlay.qcow2" "$work/guest-view.raw"
echo "the guest sees: $(head -c 25 "$work/guest-view.raw")"

# A guest owns its raw disk and can write a qcow2 header into it that names
# a host file; a host that probed formats would open that file as backing.
cp "$work/overlay.qcow2" "$work/guest-disk.raw"
truncate -s 64M "$work/guest-disk.raw"
step volagent inspect --format raw "$work/guest-disk.raw" '(a raw disk a guest wrote a qcow2 header into)'
set +e
"$bin" inspect --format raw "$work/guest-disk.raw"
status=$?
set -e
echo "(exit status $status: refused)"
[ "$status" -eq 3 ]
