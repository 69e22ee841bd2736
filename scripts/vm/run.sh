#!/usr/bin/env bash
# The VM tests (`make vm-test`): boots the Debian 12 guest of
# build-image.sh under qemu, hands it the project's .deb (and an N+1 build
# of it for the upgrade check) and guest-tests.sh on a second disk, lets
# the guest run the checks of issue 12 as a systemd unit (one boot, a
# reboot for the LVM reboot check, then power-off), and reads the results
# back: TAP lines on the guest's second serial port, the guest's journal
# on the disk. Fails, naming each failed check, when one fails, when the
# guest stops early, or when the boots take longer than VMTEST_TIMEOUT
# seconds (qemu is killed). Logs of a failed run are kept in dist/vmtest/.
#
# Usage: scripts/vm/run.sh [test|shell]
#   test   (default) the checks
#   shell  boots the guest with root logged in on this terminal (serial
#          console; Ctrl-A X quits qemu), the packages in /vmtest/debs and
#          the LVM pool disk as /dev/disk/by-id/virtio-vmtest-pool; the
#          checks do not run (run them by hand: bash /vmtest/guest-tests.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-test}
timeout=${VMTEST_TIMEOUT:-900}
start=$(date +%s)

fail() { echo "vm-test: FAIL: $*" >&2; exit 1; }
step() { echo "vm-test: $*" >&2; }

[ "$(id -u)" -eq 0 ] || fail "needs root (mmdebstrap builds the image as root)"
for tool in qemu-system-x86_64 qemu-img mkfs.ext4 debugfs dpkg-deb timeout; do
	command -v "$tool" >/dev/null || fail "needs $tool; run scripts/install-deps.sh"
done

# VMTEST_IMAGE: an image directory of build-image.sh to use as it is.
image=${VMTEST_IMAGE:-$(scripts/vm/build-image.sh)}
step "image $image ($(( $(date +%s) - start )) s)"

# The package under test, and N+1: the same package with a bumped version,
# built by repacking it, so the upgrade runs the maintainer scripts of a
# real upgrade.
# `make test` has just built it (package-test): rebuilt only when a
# source is newer.
deb=$(ls dist/volagent_*_amd64.deb 2>/dev/null || true)
if [ -z "$deb" ] || [ -n "$(find go.mod go.sum scripts/packages.sh packaging internal cmd ./*/ -newer "$deb" -type f \( -name '*.go' -o -path '*packaging*' -o -name 'go.*' -o -name packages.sh \) -print -quit)" ]; then
	scripts/packages.sh >/dev/null
	deb=$(ls dist/volagent_*_amd64.deb)
fi
version=$(dpkg-deb -f "$deb" Version)
upstream=${version%-*}
next="${upstream%.*}.$(( ${upstream##*.} + 1 ))-1"

work=$(mktemp -d /var/tmp/volagent-vmtest.XXXXXX)
qemu_pid=
cleanup() {
	set +e
	if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
		kill -KILL "$qemu_pid"
		wait "$qemu_pid" 2>/dev/null
	fi
	rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/in/debs" "$work/in/results" "$work/repack"
cp "$deb" "$work/in/debs/volagent_N.deb"
dpkg-deb -R "$deb" "$work/repack"
sed -i "s/^Version: .*/Version: $next/" "$work/repack/DEBIAN/control"
dpkg-deb --root-owner-group -b "$work/repack" "$work/in/debs/volagent_N+1.deb" >/dev/null
echo "$next" >"$work/in/debs/next-version"
cp scripts/vm/guest-tests.sh "$work/in/guest-tests.sh"
# The vmtest disk: what goes in, and where the guest puts its journal.
truncate -s 1G "$work/vmtest.img"
mkfs.ext4 -q -F -L vmtest -d "$work/in" "$work/vmtest.img"
qemu-img create -q -f qcow2 -F raw -b "$image/root.img" "$work/root.qcow2"
truncate -s 4G "$work/pool.raw"

qemu=(qemu-system-x86_64 -accel tcg -m 2560 -smp 2 -nodefaults -no-user-config
	-display none -nic none
	-kernel "$image/vmlinuz" -initrd "$image/initrd.img"
	-drive "file=$work/root.qcow2,format=qcow2,if=virtio,cache=unsafe"
	-drive "file=$work/vmtest.img,format=raw,if=virtio"
	-drive "file=$work/pool.raw,format=raw,if=none,id=pool,cache=unsafe"
	-device virtio-blk-pci,drive=pool,serial=vmtest-pool)
append="root=UUID=$(cat "$image/root.uuid") rw console=ttyS0,115200 panic=-1"

if [ "$mode" = shell ]; then
	step "booting the guest; root is logged in on the console below; Ctrl-A X quits"
	"${qemu[@]}" -append "$append" -serial mon:stdio
	exit 0
fi
[ "$mode" = test ] || fail "unknown mode $mode (test or shell)"

step "booting the guest (TCG, at most $timeout s)"
boot_start=$(date +%s)
# -no-reboot would end the reboot check: the guest reboots once, then powers off.
"${qemu[@]}" -append "$append vmtest" \
	-serial "file:$work/console.log" -serial "file:$work/results.tap" &
qemu_pid=$!
timed_out=
deadline=$(( boot_start + timeout ))
while kill -0 "$qemu_pid" 2>/dev/null; do
	if [ "$(date +%s)" -ge "$deadline" ]; then
		timed_out=1
		kill -KILL "$qemu_pid"
		break
	fi
	sleep 1
done
wait "$qemu_pid" || true
qemu_pid=
step "guest ran $(( $(date +%s) - boot_start )) s"

# Results: TAP lines from the guest, the journal it saved.
touch "$work/results.tap"
debugfs -R "rdump /results $work" "$work/vmtest.img" >/dev/null 2>&1 || true
tr -d '\r' <"$work/results.tap" >"$work/results.txt"
cat "$work/results.txt" >&2
failed=$(grep '^not ok' "$work/results.txt" || true)
problem=
[ -z "$timed_out" ] || problem="the guest did not finish within $timeout s (qemu killed)"
grep -q '^# vmtest done' "$work/results.txt" || problem="${problem:-the guest stopped before running every check (last: $(grep -E '^(not )?ok' "$work/results.txt" | tail -1))}"
passed=$(grep -c '^ok' "$work/results.txt" || true)
if [ -n "$failed" ] || [ -n "$problem" ]; then
	logs=dist/vmtest
	rm -rf "$logs" && mkdir -p "$logs"
	cp "$work/console.log" "$work/results.txt" "$logs/"
	[ -d "$work/results" ] && cp -r "$work/results/." "$logs/"
	step "logs (console, TAP, guest journal) kept in $logs"
	if [ -n "$failed" ]; then
		echo "vm-test: failed checks:" >&2
		echo "$failed" >&2
	fi
	fail "${problem:-$(grep -c '^not ok' <<<"$failed") check(s) failed, $passed passed}"
fi
step "ok: $passed checks passed; total $(( $(date +%s) - start )) s"
