#!/usr/bin/env bash
# Benchmarks volagent against the qemu-img command doing the same job, on
# the same images, and prints one line per benchmark:
#   inspect: volagent 2.1ms, qemu-img info 15.3ms, ratio 0.14 (goal <= 0.5)
#
# Usage: scripts/bench.sh bin/volagent   (make bench; needs root for loop devices)
# BENCH_RUNS sets the runs per command (default 30); times are the median
# wall time of whole processes, taken with bash's $EPOCHREALTIME so that no
# timer process is forked inside the measured interval.
#
# To add a benchmark: write a bench_NAME function that prepares its inputs
# under $work (loop devices through new_loop_device, so the trap detaches
# them), times both commands with median_ms, prints with report, and add
# NAME to BENCHMARKS at the bottom.
set -euo pipefail

if [ $# -ne 1 ]; then
	echo "usage: $0 path/to/volagent" >&2
	exit 2
fi
volagent=$(realpath "$1")
runs=${BENCH_RUNS:-30}
if [ "$(id -u)" -ne 0 ]; then
	echo "bench: needs root (loop devices); run: sudo make bench" >&2
	exit 1
fi
for tool in qemu-img losetup; do
	command -v "$tool" >/dev/null || { echo "bench: $tool missing; run scripts/install-deps.sh" >&2; exit 1; }
done

# /var/tmp rather than /tmp: loop devices with direct I/O need a filesystem
# that supports O_DIRECT, which tmpfs does not.
work=$(mktemp -d /var/tmp/volagent-bench.XXXXXX)
loop_devices=()
cleanup() {
	local dev
	for dev in "${loop_devices[@]}"; do
		losetup --detach "$dev" || echo "bench: could not detach $dev" >&2
	done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# new_loop_device SIZE NAME: attaches a new sparse file as a loop device
# (direct I/O, 512-byte sectors) and sets $loop_device to its path.
new_loop_device() {
	local file="$work/$2.img"
	truncate -s "$1" "$file"
	loop_device=$(losetup --find --show --direct-io=on "$file")
	loop_devices+=("$loop_device")
}

# median_ms CMD...: runs CMD $runs times (output discarded) and prints the
# median wall time in milliseconds. Fails if any run fails.
median_ms() {
	local i start end times=()
	for ((i = 0; i < runs; i++)); do
		start=${EPOCHREALTIME/[.,]/}
		if ! "$@" >/dev/null 2>"$work/stderr"; then
			echo "bench: failed: $* : $(head -c 500 "$work/stderr")" >&2
			return 1
		fi
		end=${EPOCHREALTIME/[.,]/}
		times+=($((10#$end - 10#$start)))
	done
	printf '%s\n' "${times[@]}" | sort -n | awk '
		{ t[NR] = $1 }
		END { m = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2; printf "%.2f", m / 1000 }'
}

# report NAME OURS_MS THEIRS_LABEL THEIRS_MS GOAL: prints one result line.
report() {
	awk -v name="$1" -v ours="$2" -v label="$3" -v theirs="$4" -v goal="$5" 'BEGIN {
		ratio = ours / theirs
		printf "%s: volagent %.1fms, %s %.1fms, ratio %.2f (goal <= %s)%s\n",
			name, ours, label, theirs, ratio, goal, (ratio > goal ? " MISSED" : "")
	}'
}

# inspect: reading and judging a header, against qemu-img info, on the same
# overlay (raw backing, 64 KiB clusters, some data written).
bench_inspect() {
	local base="$work/inspect-base.raw" image="$work/inspect.qcow2"
	truncate -s 10G "$base"
	qemu-img create -q -f qcow2 -b "$base" -F raw "$image"
	qemu-img info --output=json "$image" >/dev/null # the image itself is sound
	local ours theirs
	ours=$(median_ms "$volagent" inspect "$image") || return 1
	theirs=$(median_ms qemu-img info --output=json "$image") || return 1
	report inspect "$ours" "qemu-img info" "$theirs" 0.5
}

# create: writing an overlay onto a loop device, against qemu-img create
# onto the same device (qemu-img accepts a block device as the target and
# takes the virtual size from the backing, like volagent).
bench_create() {
	local base="$work/create-base.raw"
	truncate -s 10G "$base"
	new_loop_device 1G create-target
	local ours theirs
	ours=$(median_ms "$volagent" create --backing "$base" --backing-format raw "$loop_device") || return 1
	theirs=$(median_ms qemu-img create -q -f qcow2 -b "$base" -F raw "$loop_device") || return 1
	report create "$ours" "qemu-img create" "$theirs" 0.5
}

BENCHMARKS=(inspect create)

status=0
for name in "${BENCHMARKS[@]}"; do
	"bench_$name" || { echo "$name: FAILED" >&2; status=1; }
done
exit "$status"
