#!/usr/bin/env bash
# The shared-pool VM tests (`make vm-test-shared`, issue 13): two Debian 12
# guests of build-image.sh ("hosts" A and B, sanlock host_id 1 and 2) share
# one raw disk, on which A makes a volume group shared through lvmlockd and
# sanlock; volagentd from the .deb serves a shared pool on it on both. This
# script drives both guests step by step over a virtio-serial channel each
# (scripts/vm/guest-agent.sh runs what it sends), so every step on one host
# starts once the other host's step it depends on has finished, and waits
# are polls of a condition with a deadline, never sleeps. Each scenario is
# one TAP line with its time; on a failure the consoles, the log and both
# guests' journals are kept in dist/vmtest-shared/.
#
# Usage: scripts/vm/run-shared.sh [test|explore]
#   test     (default) the scenarios
#   explore  sets both hosts up, prints the work directory and waits; send
#            commands with: scripts/vm/run-shared.sh ctl WORKDIR A|B 'CMD'
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-test}
timeout=${VMTEST_SHARED_TIMEOUT:-900}
start=$(date +%s)
VG=vmsharedvg
LOG=

fail() { echo "vm-test-shared: FAIL: $*" >&2; exit 1; }
step() { echo "vm-test-shared: $*" >&2; }

# on GUEST SECONDS SCRIPT: runs SCRIPT (bash) in the guest, prints its
# output, returns its exit status (124 when it did not answer in time).
on() {
	local g=$1 secs=$2 script=$3 tag rc b64 in out
	in=$(fdof "$g" in) out=$(fdof "$g" out)
	printf '%s\n' "$(printf '%s' "$script" | base64 -w0)" >&"$in"
	local end=$(( $(date +%s) + secs ))
	while :; do
		local left=$(( end - $(date +%s) ))
		[ "$left" -gt 0 ] || { echo "(no answer from $g within $secs s)"; return 124; }
		if ! IFS=' ' read -t "$left" -r tag rc b64 <&"$out"; then
			echo "(no answer from $g within $secs s)"
			return 124
		fi
		[ "$tag" = RC ] && break
	done
	printf '%s' "$b64" | base64 -d
	return "$rc"
}
fdof() { # GUEST in|out: the descriptor of its channel
	local v="fd_$1_$2"
	echo "${!v}"
}

if [ "$mode" = ctl ]; then
	work=$2 g=$3
	exec {fd_X_in}<>"$work/$g.ctl.in" {fd_X_out}<>"$work/$g.ctl.out"
	on X "${VMTEST_CTL_TIMEOUT:-600}" "$4"
	exit
fi

[ "$(id -u)" -eq 0 ] || fail "needs root"
for tool in qemu-system-x86_64 qemu-img mkfs.ext4 dpkg-deb base64 mkfifo; do
	command -v "$tool" >/dev/null || fail "needs $tool; run scripts/install-deps.sh"
done
image=${VMTEST_IMAGE:-$(scripts/vm/build-image.sh)}
deb=$(ls dist/volagent_*_amd64.deb 2>/dev/null || true)
if [ -z "$deb" ] || [ -n "$(find go.mod go.sum scripts/packages.sh packaging internal cmd ./*/ -newer "$deb" -type f \( -name '*.go' -o -path '*packaging*' -o -name 'go.*' -o -name packages.sh \) -print -quit)" ]; then
	scripts/packages.sh >/dev/null
	deb=$(ls dist/volagent_*_amd64.deb)
fi

work=$(mktemp -d /var/tmp/volagent-vmshared.XXXXXX)
declare -A qpid=()
cleanup() {
	set +e
	for g in "${!qpid[@]}"; do
		kill -KILL "${qpid[$g]}" 2>/dev/null
		wait "${qpid[$g]}" 2>/dev/null
	done
	[ "$mode" = explore ] || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT
# The shared LUN: raw, no host page cache, no qemu image locks (both
# guests open it read-write, as two hosts open a SAN LUN).
truncate -s 2G "$work/shared.img"

boot() { # GUEST HOST_ID
	local g=$1 id=$2
	mkdir -p "$work/$g/in/debs"
	cp "$deb" "$work/$g/in/debs/volagent_N.deb"
	cp scripts/vm/guest-agent.sh "$work/$g/in/guest-tests.sh"
	echo "$id" >"$work/$g/in/host_id"
	truncate -s 512M "$work/$g/vmtest.img"
	mkfs.ext4 -q -F -L vmtest -d "$work/$g/in" "$work/$g/vmtest.img"
	qemu-img create -q -f qcow2 -F raw -b "$image/root.img" "$work/$g/root.qcow2"
	mkfifo "$work/$g.ctl.in" "$work/$g.ctl.out" "$work/$g.mon.in" "$work/$g.mon.out"
	qemu-system-x86_64 -accel tcg -m 1536 -smp 1 -nodefaults -no-user-config -display none -nic none \
		-kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
		-append "root=UUID=$(cat "$image/root.uuid") rw console=ttyS0,115200 panic=-1 vmtest" \
		-drive "file=$work/$g/root.qcow2,format=qcow2,if=virtio,cache=unsafe" \
		-drive "file=$work/$g/vmtest.img,format=raw,if=virtio" \
		-drive "file=$work/shared.img,format=raw,if=none,id=sh,cache=none,file.locking=off" \
		-device virtio-blk-pci,drive=sh,share-rw=on,serial=vmtest-shared \
		-device virtio-serial-pci -chardev "pipe,id=ctl,path=$work/$g.ctl" \
		-device virtserialport,chardev=ctl,name=vmtest.ctl \
		-chardev "pipe,id=mon,path=$work/$g.mon" -mon chardev=mon,mode=readline \
		-serial "file:$work/$g.console.log" -no-reboot &
	qpid[$g]=$!
	local in out mon
	exec {in}<>"$work/$g.ctl.in" {out}<>"$work/$g.ctl.out" {mon}<>"$work/$g.mon.in"
	printf -v "fd_${g}_in" '%s' "$in"
	printf -v "fd_${g}_out" '%s' "$out"
	printf -v "fd_${g}_mon" '%s' "$mon"
	# Nobody reads the monitor's answers: drain them so qemu never blocks.
	cat "$work/$g.mon.out" >"$work/$g.mon.log" &
}

# monitor GUEST COMMAND: an HMP command to the guest's qemu.
monitor() {
	local fd
	fd=$(fdof "$1" mon)
	printf '%s\n' "$2" >&"$fd"
}

step "image $image; booting hosts A (host_id 1) and B (host_id 2)"
boot A 1
boot B 2
for g in A B; do
	out=$(fdof "$g" out)
	line=
	IFS= read -t 300 -r line <&"$out" || true
	[[ $line == READY* ]] || fail "host $g did not come up within 300 s (console: $(tail -c 600 "$work/$g.console.log"))"
done
step "both hosts up ($(( $(date +%s) - start )) s)"

n=0
failed=()
results=$work/results.txt
: >"$results"
tap() { echo "$*" | tee -a "$results" >&2; }
# scenario NAME FUNCTION: runs FUNCTION (which uses `on`), one TAP line
# with its wall time; its output goes to the log, and after a failure
# into the TAP diagnostics too.
scenario() {
	local name=$1 rc t0 t1
	shift
	n=$((n + 1))
	t0=$(date +%s.%N)
	set +e
	( set -e; "$@" ) >"$work/step.log" 2>&1
	rc=$?
	set -e
	t1=$(date +%s.%N)
	local took
	took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
	{ echo "== $n $name"; cat "$work/step.log"; } >>"$work/log.txt"
	if [ "$rc" -eq 0 ]; then
		tap "ok $n - $name ($took s)"
		grep -E '^([AB]: )?timing:' "$work/step.log" | sed 's/^/#   /' | tee -a "$results" >&2 || true
	else
		tap "not ok $n - $name ($took s)"
		tail -n 30 "$work/step.log" | sed 's/^/#   /' | tee -a "$results" >&2
		failed+=("$n - $name")
	fi
	return 0
}

. scripts/vm/shared-scenarios.sh

if [ "$mode" = explore ]; then
	setup_hosts
	step "explore: hosts set up; work directory $work"
	step "  scripts/vm/run-shared.sh ctl $work A|B 'CMD'   (kill $$ to stop)"
	wait
	exit 0
fi
[ "$mode" = test ] || fail "unknown mode $mode (test or explore)"

deadline=$(( start + timeout ))
# At the deadline the guests are killed first: a step waiting on one then
# fails at once, and the script ends (and cleans up) without waiting.
( while sleep 5; do [ "$(date +%s)" -lt "$deadline" ] || { echo "vm-test-shared: timeout after $timeout s" >&2; kill -KILL "${qpid[@]}" 2>/dev/null; kill -TERM $$; exit; }; done ) &
watchdog=$!
run_scenarios
kill "$watchdog" 2>/dev/null || true

passed=$(grep -c '^ok' "$results" || true)
if [ "${#failed[@]}" -gt 0 ]; then
	logs=dist/vmtest-shared
	rm -rf "$logs" && mkdir -p "$logs"
	cp "$work"/*.console.log "$work/log.txt" "$results" "$logs/"
	for g in A B; do
		[ -n "${qpid[$g]:-}" ] && kill -0 "${qpid[$g]}" 2>/dev/null &&
			on "$g" 60 'journalctl -b --no-pager -o short-monotonic' >"$logs/$g.journal.txt" 2>&1 || true
	done
	step "logs kept in $logs"
	printf 'vm-test-shared: failed: %s\n' "${failed[@]}" >&2
	fail "${#failed[@]} scenario(s) failed, $passed passed"
fi
for g in A B; do
	[ -n "${qpid[$g]:-}" ] && kill -0 "${qpid[$g]}" 2>/dev/null && { on "$g" 5 'systemctl --no-block poweroff' >/dev/null || true; }
done
step "ok: $passed scenarios passed; total $(( $(date +%s) - start )) s"
