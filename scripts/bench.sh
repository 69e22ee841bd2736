#!/usr/bin/env bash
# Benchmarks volagent against the qemu-img command doing the same job, on
# the same images, and prints one line per benchmark:
#   inspect: volagent 2.1ms, qemu-img info 15.3ms, ratio 0.14 (goal <= 0.5)
#
# Usage: scripts/bench.sh bin/volagent bin/volagentd   (make bench; needs root for loop devices)
# BENCH_RUNS sets the runs per command (default 30); times are the median
# wall time of whole processes, taken with bash's $EPOCHREALTIME so that no
# timer process is forked inside the measured interval. BENCH_ONLY="a b"
# runs only the named benchmarks (names as in BENCHMARKS at the bottom).
#
# To add a benchmark: write a bench_NAME function that prepares its inputs
# under $work (loop devices through new_loop_device, so the trap detaches
# them), times both commands with median_ms, prints with report, and add
# NAME to BENCHMARKS at the bottom.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib/private-bus.sh"

if [ $# -ne 2 ]; then
	echo "usage: $0 path/to/volagent path/to/volagentd" >&2
	exit 2
fi
volagent=$(realpath "$1")
volagentd=$(realpath "$2")
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

# stop_daemons: SIGTERM to every process start_daemon started (volagent
# first, so it can release its name), SIGKILL after 10 s.
stop_daemons() {
	local pid i
	for pid in "${daemon_pids[@]}"; do
		kill -TERM "$pid" 2>/dev/null || continue
		for ((i = 0; i < 100; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	daemon_pids=()
}

# detach_loops_under DIR: detaches every loop device over a file under DIR
# (the daemon's pool volumes stay attached when it stops, as for VMs).
detach_loops_under() {
	local dev file
	while read -r dev file; do
		case "$file" in
		"$1"/*) losetup --detach "$dev" || echo "bench: could not detach $dev ($file)" >&2 ;;
		esac
	done < <(losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null)
}

# remove_new_loop_devices: removes the unattached loop devices that did not
# exist when the bench started. The pools make the kernel create a device
# per volume (idle-rss: 1,000), and the kernel keeps them after detaching;
# each one would slow every later scan of /sys/block. Attached ones (and
# devices anyone has open) are refused by the kernel and stay.
loops_at_start=" $(cd /sys/block && echo loop*) "
remove_new_loop_devices() {
	local d n new=()
	for d in /sys/block/loop*; do
		n=${d#/sys/block/loop}
		case "$loops_at_start" in *" loop$n "*) continue ;; esac
		[ -e "$d/loop/backing_file" ] || new+=("$n")
	done
	if [ "${#new[@]}" -gt 0 ] && [ -x "$work/benchtool" ]; then
		"$work/benchtool" loop-remove "${new[@]}" >/dev/null || echo "bench: could not remove new loop devices" >&2
	fi
}

loop_devices=()
daemon_pids=() # volagentd and dbus-daemon processes, stopped by cleanup
cleanup() {
	local dev
	stop_daemons
	for dev in "${loop_devices[@]}"; do
		losetup --detach "$dev" || echo "bench: could not detach $dev" >&2
	done
	detach_loops_under "$work" # what the daemon's pools left attached
	remove_new_loop_devices
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

# report NAME OURS_MS THEIRS_LABEL THEIRS_MS GOAL [FLOOR_MS]: prints one
# result line; FLOOR_MS, when given, is what a Go program that does
# nothing takes (start_floor), shown as a ratio too.
report() {
	awk -v name="$1" -v ours="$2" -v label="$3" -v theirs="$4" -v goal="$5" -v floor="${6:-}" 'BEGIN {
		ratio = ours / theirs
		printf "%s: volagent %.1fms, %s %.1fms, ratio %.2f (goal <= %s)%s", name, ours, label, theirs, ratio, goal, (ratio > goal ? " MISSED" : "")
		if (floor != "")
			printf "; floor (a static Go program that does nothing) %.1fms, ratio %.2f", floor, floor / theirs
		printf "\n"
	}'
}

# start_floor: the median wall time of a static Go program whose main is
# empty (internal/startfloor), built as volagent is: what any Go command
# costs on this host before it does anything.
# start_floor proc-locks: the same program reading /proc/locks once.
start_floor() {
	if [ ! -x "$work/startfloor" ]; then
		(cd "$(dirname "${BASH_SOURCE[0]}")/.." && CGO_ENABLED=0 go build -o "$work/startfloor" ./internal/startfloor) || return 1
	fi
	median_ms "$work/startfloor" "$@"
}

# inspect: reading and judging a header, against qemu-img info, on the same
# overlay (raw backing, 64 KiB clusters, some data written).
bench_inspect() {
	local base="$work/inspect-base.raw" image="$work/inspect.qcow2"
	truncate -s 10G "$base"
	qemu-img create -q -f qcow2 -b "$base" -F raw "$image"
	qemu-img info --output=json "$image" >/dev/null # the image itself is sound
	local ours theirs floor
	ours=$(median_ms "$volagent" inspect "$image") || return 1
	theirs=$(median_ms qemu-img info --output=json "$image") || return 1
	floor=$(start_floor) || return 1
	report inspect "$ours" "qemu-img info" "$theirs" 0.25 "$floor"
}

# create: writing an overlay onto a loop device, against qemu-img create
# onto the same device (qemu-img accepts a block device as the target and
# takes the virtual size from the backing, like volagent).
bench_create() {
	local base="$work/create-base.raw"
	truncate -s 10G "$base"
	new_loop_device 1G create-target
	local ours theirs floor
	ours=$(median_ms "$volagent" create --backing "$base" --backing-format raw "$loop_device") || return 1
	theirs=$(median_ms qemu-img create -q -f qcow2 -b "$base" -F raw "$loop_device") || return 1
	floor=$(start_floor) || return 1
	report create "$ours" "qemu-img create" "$theirs" 0.3 "$floor"
}

# import: sequential allocating writes of 1 GiB into a fresh overlay, by
# volagent import from a raw file in /dev/shm, against dd of the same data
# onto the raw loop device (the device's limit) and qemu-img convert -n
# into an equally fresh overlay, all on one loop device with direct I/O.
# Runs are interleaved (dd, volagent, qemu-img) so drift hits all three;
# the median of BENCH_IMPORT_RUNS (default 5) runs counts. Throughput
# ratios: goal >= 0.95 of dd, >= 1.0 of qemu-img.
bench_import() {
	local shm size=$((1024 * 1024 * 1024)) n=${BENCH_IMPORT_RUNS:-5}
	shm=$(mktemp /dev/shm/volagent-bench-import.XXXXXX)
	bench_import_body "$shm" "$size" "$n"
	local status=$?
	rm -f "$shm"
	return "$status"
}

bench_import_body() {
	local shm=$1 size=$2 n=$3 base="$work/import-base.raw"
	head -c "$size" /dev/urandom >"$shm" || return 1
	truncate -s "$size" "$base"
	new_loop_device $((size + 256 * 1024 * 1024)) import-target
	local dev=$loop_device i start end dd_t=() va_t=() qi_t=()
	for ((i = 0; i < n; i++)); do
		start=${EPOCHREALTIME/[.,]/}
		dd if="$shm" of="$dev" oflag=direct bs=1M status=none || return 1
		end=${EPOCHREALTIME/[.,]/}
		dd_t+=($((10#$end - 10#$start)))

		qemu-img create -q -f qcow2 -b "$base" -F raw "$dev" "$size" || return 1
		start=${EPOCHREALTIME/[.,]/}
		"$volagent" import --allow-backing "$work" "$shm" "$dev" >/dev/null 2>"$work/stderr" ||
			{ echo "bench: volagent import failed: $(head -c 500 "$work/stderr")" >&2; return 1; }
		end=${EPOCHREALTIME/[.,]/}
		va_t+=($((10#$end - 10#$start)))

		qemu-img create -q -f qcow2 -b "$base" -F raw "$dev" "$size" || return 1
		start=${EPOCHREALTIME/[.,]/}
		qemu-img convert -n -t none -T none -f raw -O qcow2 "$shm" "$dev" || return 1
		end=${EPOCHREALTIME/[.,]/}
		qi_t+=($((10#$end - 10#$start)))
	done
	local dd_us va_us qi_us
	dd_us=$(printf '%s\n' "${dd_t[@]}" | sort -n | awk '{ t[NR] = $1 } END { print t[int((NR + 1) / 2)] }')
	va_us=$(printf '%s\n' "${va_t[@]}" | sort -n | awk '{ t[NR] = $1 } END { print t[int((NR + 1) / 2)] }')
	qi_us=$(printf '%s\n' "${qi_t[@]}" | sort -n | awk '{ t[NR] = $1 } END { print t[int((NR + 1) / 2)] }')
	awk -v size="$size" -v dd="$dd_us" -v va="$va_us" -v qi="$qi_us" 'BEGIN {
		mib = size / 1048576
		r_dd = dd / va; r_qi = qi / va
		printf "import: volagent %.0f MiB/s, dd %.0f MiB/s, ratio %.2f (goal >= 0.95)%s; qemu-img convert %.0f MiB/s, ratio %.2f (goal >= 1.0)%s\n",
			mib / (va / 1e6), mib / (dd / 1e6), r_dd, (r_dd < 0.95 ? " MISSED" : ""),
			mib / (qi / 1e6), r_qi, (r_qi < 1.0 ? " MISSED" : "")
	}'
}

# cow-latency: 4 KiB writes, one per 64 KiB cluster, into a fresh overlay
# over a raw backing (each a copy-on-write), against 4 KiB O_DIRECT writes
# to the raw device, alternating on one loop device: median latencies.
# The Go benchmark sets up its own loop device and backing.
bench_cow_latency() {
	local root result="$work/cow-latency.txt"
	root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
	(cd "$root" && VOLAGENT_BENCH_RESULT="$result" go test -count=1 -run '^$' \
		-bench '^BenchmarkCowWriteLatency$' -benchtime 1x ./qcow2 >"$work/cow.out" 2>&1) ||
		{ echo "bench: cow-latency failed: $(tail -c 1000 "$work/cow.out")" >&2; return 1; }
	local ours theirs ratio raw64
	read -r ours theirs ratio raw64 <"$result"
	awk -v o="$ours" -v t="$theirs" -v f="$raw64" 'BEGIN {
		r = o / t
		printf "cow-latency: volagent 4K copy-on-write median %.1fus, raw 4K O_DIRECT median %.1fus, ratio %.2f (goal <= 1.5)%s; raw 64K write (the floor) %.1fus\n",
			o * 1000, t * 1000, r, (r > 1.5 ? " MISSED" : ""), f * 1000
	}'
}

# subcluster-cow-latency: as cow-latency, with 128 KiB clusters and
# extended L2 entries: a 4 KiB write into an unallocated cluster allocates
# one 4 KiB subcluster and copies nothing.
bench_subcluster_cow_latency() {
	local root result="$work/subcluster-cow-latency.txt"
	root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
	(cd "$root" && VOLAGENT_BENCH_RESULT="$result" go test -count=1 -run '^$' \
		-bench '^BenchmarkSubclusterCowWriteLatency$' -benchtime 1x ./qcow2 >"$work/subcow.out" 2>&1) ||
		{ echo "bench: subcluster-cow-latency failed: $(tail -c 1000 "$work/subcow.out")" >&2; return 1; }
	local ours theirs ratio rawc
	read -r ours theirs ratio rawc <"$result"
	awk -v o="$ours" -v t="$theirs" -v f="$rawc" 'BEGIN {
		r = o / t
		printf "subcluster-cow-latency: volagent 4K write into an unallocated 128K extended-L2 cluster median %.1fus, raw 4K O_DIRECT median %.1fus, ratio %.2f (goal <= 1.2)%s; raw 128K write %.1fus\n",
			o * 1000, t * 1000, r, (r > 1.2 ? " MISSED" : ""), f * 1000
	}'
}

# --- The daemon over D-Bus -------------------------------------------------
# These start a private system-type dbus-daemon (the system bus's default
# policy plus packaging/dbus/org.volagent.VolAgent1.conf) and `volagentd`
# with a loop pool under $work; internal/benchtool is the one client.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# benchtool: builds internal/benchtool once into $work.
benchtool() {
	if [ ! -x "$work/benchtool" ]; then
		(cd "$root" && go build -o "$work/benchtool" ./internal/benchtool) || return 1
	fi
	"$work/benchtool" "$@"
}

# start_bus NAME INITIAL_SIZE: writes the configuration of start_daemon
# ($work/NAME/volagent.toml) and starts the bus. Sets $bus and $images.
start_bus() {
	local dir="$work/$1" policy="$root/packaging/dbus/org.volagent.VolAgent1.conf"
	mkdir -p "$dir/pool" "$dir/images" "$dir/system.d"
	images="$dir/images"
	bus="unix:path=$dir/bus"
	cp "$policy" "$dir/system.d/"
	cat >"$dir/volagent.toml" <<-EOF
		[[pool]]
		name = "bench"
		type = "loop"
		directory = "$dir/pool"
		backing_roots = ["$dir/images"]
		initial_size = "$2"
		chunk_size = "$2"
	EOF
	rm -f "$dir/bus" # a second bus in the same directory must not find the first one's socket
	start_private_bus "$dir" "$dir/system.d" || return 1
	daemon_pids=("$bus_pid" "${daemon_pids[@]}")
}

# start_daemon NAME INITIAL_SIZE: starts the bus and the daemon with loop
# pool "bench" (directory $work/NAME/pool, backing root $work/NAME/images,
# initial_size INITIAL_SIZE) and waits until it serves. Sets $bus (the
# address), $images and $serve_pid.
start_daemon() {
	local dir="$work/$1"
	start_bus "$1" "$2" || return 1
	"$volagentd" --config "$dir/volagent.toml" --bus-address "$bus" 2>"$dir/serve.log" &
	serve_pid=$!
	daemon_pids=("$serve_pid" "${daemon_pids[@]}") # stopped before the bus
	benchtool wait -bus "$bus" -timeout 60s ||
		{ echo "bench: volagentd: $(tail -c 1000 "$dir/serve.log")" >&2; return 1; }
}

# dbus-create: CreateOverlay over D-Bus from call to reply (the daemon
# replies once the overlay is flushed and marked complete on its device),
# median of $runs calls, against one `qemu-img create -b -F` process onto
# a loop device of the pool's initial size (1 GiB). Goal: ratio <= 0.3.
bench_dbus_create() {
	start_daemon dbus-create 1G || return 1
	local base="$images/base.raw" ours theirs
	truncate -s 10G "$base"
	ours=$(benchtool create -bus "$bus" -pool bench -backing "$base" -n "$runs" -prefix create-) || return 1
	stop_daemons
	new_loop_device 1G dbus-create-target
	theirs=$(median_ms qemu-img create -q -f qcow2 -b "$base" -F raw "$loop_device") || return 1
	awk -v o="$ours" -v t="$theirs" 'BEGIN {
		r = o / t
		printf "dbus-create: volagent %.1fms, qemu-img create %.1fms, ratio %.2f (goal <= 0.3)%s\n",
			o, t, r, (r > 0.3 ? " MISSED" : "")
	}'
}

# hook: the libvirt qemu hook's verdict ("prepare begin") for a domain with
# three volagent disks, from process start to exit, the daemon's
# CheckDomain included: the static volagent binary, D-Bus, the daemon's
# policy over the three overlays. Goal: median <= 10 ms.
bench_hook() {
	start_daemon hook 4M || return 1
	local base="$images/base.raw" disks="" i reply volume device ours floor targets=(vda vdb vdc)
	truncate -s 1G "$base"
	for i in 1 2 3; do
		reply=$(busctl --address="$bus" call org.volagent.VolAgent1 /org/volagent/VolAgent1 \
			org.volagent.VolAgent1.Manager CreateOverlay ssssta{sv} bench "hook$i" "$base" raw 0 0) || return 1
		volume=$(awk '{ gsub(/"/, "", $2); print $2 }' <<<"$reply")
		device=$(busctl --address="$bus" get-property org.volagent.VolAgent1 "$volume" \
			org.volagent.VolAgent1.Volume DevicePath | awk '{ gsub(/"/, "", $2); print $2 }')
		disks+="<disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='$device'/><target dev='${targets[i - 1]}' bus='virtio'/></disk>"
	done
	printf "<domain type='kvm'><name>bench-hook</name><memory>65536</memory><os><type arch='x86_64'>hvm</type></os><devices>%s</devices></domain>\n" "$disks" >"$work/hook-domain.xml"
	hook_once() { "$volagent" hook qemu --bus-address "$bus" --config /dev/null bench-hook prepare begin - <"$work/hook-domain.xml"; }
	hook_once >/dev/null 2>"$work/hook.err" || { echo "bench: the hook refused the domain: $(head -c 500 "$work/hook.err")" >&2; return 1; }
	ours=$(median_ms hook_once) || return 1
	stop_daemons
	floor=$(start_floor proc-locks) || return 1
	awk -v o="$ours" -v f="$floor" 'BEGIN {
		printf "hook: verdict for a domain with three volagent disks, median %.1fms (goal <= 10ms)%s; floor (a static Go program that reads /proc/locks once, as the check of block devices must) %.1fms\n", o, (o > 10 ? " MISSED" : ""), f
	}'
}

# dbus-inspect: Inspect calls per second from one client connection, one
# call at a time, each passing the descriptor of a qcow2 overlay (raw
# backing), for BENCH_INSPECT_SECONDS (default 5). Goal: >= 2000 calls/s.
bench_dbus_inspect() {
	start_daemon dbus-inspect 4M || return 1
	local image="$images/inspect.qcow2" rate
	truncate -s 10G "$images/inspect-base.raw"
	qemu-img create -q -f qcow2 -b "$images/inspect-base.raw" -F raw "$image"
	rate=$(benchtool inspect -bus "$bus" -image "$image" -duration "${BENCH_INSPECT_SECONDS:-5}s") || return 1
	stop_daemons
	awk -v r="$rate" 'BEGIN {
		printf "dbus-inspect: %.0f calls/s (goal >= 2000)%s\n", r, (r < 2000 ? " MISSED" : "")
	}'
}

# idle-rss: the daemon's resident memory (VmRSS) after it has idled
# BENCH_IDLE_SECONDS (default 10) with BENCH_VOLUMES (default 1000) small
# overlays in a loop pool (initial size 4M), each attached to a loop device
# of its own. Loop devices are made on demand through /dev/loop-control
# (max_loop only sizes the set made at boot); if fewer can be attached,
# the line says how many volumes there were. Goal: <= 40 MiB.
bench_idle_rss() {
	local want=${BENCH_VOLUMES:-1000} made rss_kib note=""
	start_daemon idle-rss 4M || return 1
	truncate -s 64M "$images/base.raw"
	made=$(benchtool populate -bus "$bus" -pool bench -backing "$images/base.raw" -n "$want" -prefix v 2>"$work/populate.err") || return 1
	if [ "$made" -lt "$want" ]; then
		note=" (only $made of $want could be made: $(head -c 300 "$work/populate.err"))"
	fi
	sleep "${BENCH_IDLE_SECONDS:-10}"
	rss_kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$serve_pid/status")
	benchtool delete -bus "$bus" -pool bench >/dev/null || echo "bench: idle-rss: deleting the volumes failed" >&2
	stop_daemons
	awk -v k="$rss_kib" -v n="$made" -v note="$note" 'BEGIN {
		m = k / 1024
		printf "idle-rss: %.1f MiB with %d volumes (goal <= 40)%s%s\n", m, n, (m > 40 ? " MISSED" : ""), note
	}'
}

# start-time: the daemon restarted over BENCH_START_VOLUMES (default 1000)
# volumes of a loop pool: small overlays made over D-Bus, still attached
# from the daemon that made them, and BENCH_START_LARGE (default 100) with
# 100 GiB of metadata each (qemu-img preallocation=metadata: L2 tables and
# refcounts for every cluster; sparse files), new files it must attach.
# The files are written back first, as on a host whose images are at
# rest: attaching the 100 files just copied (1.6 GB of dirty pages) would
# otherwise wait for their writeback, 2-5 s that are the copy's cost, not
# the daemon's. Measured from the exec of `volagentd`:
# when it owns its bus name, when it has answered CheckDomain for a domain
# on one of the volumes (goal: both <= 1 s), and when its background check
# of every volume's metadata finished (no goal; it runs at idle I/O
# priority after the daemon is ready).
bench_start_time() {
	local want=${BENCH_START_VOLUMES:-1000} big=${BENCH_START_LARGE:-100} dir="$work/start-time" made i names=() dev out
	start_daemon start-time 4M || return 1
	truncate -s 64M "$images/base.raw"
	made=$(benchtool populate -bus "$bus" -pool bench -backing "$images/base.raw" -n $((want - big)) -prefix v 2>"$work/populate.err") || return 1
	stop_daemons # its volumes stay attached, as on a host where the daemon restarts
	qemu-img create -q -f qcow2 -o preallocation=metadata "$dir/large.qcow2" 100G
	for ((i = 0; i < big; i++)); do
		cp --sparse=always "$dir/large.qcow2" "$dir/pool/large$i.img"
		names+=("large$i")
	done
	benchtool set-meta -pool-dir "$dir/pool" -role base "${names[@]}" || return 1
	sync
	dev=$(losetup --noheadings --output NAME --associated "$dir/pool/v0000.img" | head -n 1)
	start_bus start-time 4M || return 1
	out=$(benchtool start -bus "$bus" -volagentd "$volagentd" -config "$dir/volagent.toml" -disk "$dev" -timeout 30m) || return 1
	stop_daemons
	detach_loops_under "$dir"
	remove_new_loop_devices
	rm -rf "$dir"
	awk -v o="$out" -v n="$((made + big))" -v big="$big" 'BEGIN {
		split(o, t, " ")
		worst = (t[1] > t[2] ? t[1] : t[2])
		printf "start-time: %d volumes (%d with 100 GiB of metadata): bus name %.0fms, CheckDomain answered %.0fms (goal <= 1000), background check done %.1fs%s\n",
			n, big, t[1], t[2], t[3], (worst > 1000 ? " MISSED" : "")
	}'
}

# grow-latency: what the block-threshold handler does for a running
# guest, timed from its call to the new size on the device (qemu's
# host_device node reads the size at each length query, so this is when
# qemu can write past the old end): a loop pool, and an LVM pool (loop
# activation) on a volume group over a loop device, 20 growths by 64 MiB
# each. Goals: median <= 150 ms (loop), <= 400 ms (LVM).
bench_grow_latency() {
	local out loop lvm
	mkdir -p "$work/grow-loop" "$work/grow-lvm"
	loop=$(benchtool grow -type loop -dir "$work/grow-loop") || return 1
	lvm=$(benchtool grow -type lvm -dir "$work/grow-lvm") || return 1
	rm -rf "$work/grow-loop" "$work/grow-lvm"
	awk -v a="$loop" -v b="$lvm" 'BEGIN {
		split(a, l, " "); split(b, v, " ")
		printf "grow-latency: loop pool median %.1fms (slowest %.1fms, goal <= 150), LVM pool median %.0fms (slowest %.0fms, goal <= 400)%s\n",
			l[1], l[2], v[1], v[2], (l[1] > 150 || v[1] > 400 ? " MISSED" : "")
	}'
}

# guest-growth: the boot-sector test guest under KVM writing 2.56 GiB
# sequentially as fast as int 13h goes, on a thin overlay in a loop pool
# and in an LVM pool (loop activation), both at the pools' default
# initial_size and chunk_size, with volagent's thin growth
# (virt.BenchmarkGuestGrowth, under a libvirtd of its own): the guest's
# write rate, its pauses on ENOSPC (goal: 0) and the growths. The Go
# benchmark sets up its pools, libvirtd and domains and checks what the
# guest wrote reads back.
bench_guest_growth() {
	local result="$work/guest-growth.txt"
	(cd "$root" && VOLAGENT_BENCH_RESULT="$result" go test -count=1 -run '^$' -timeout 90m \
		-bench '^BenchmarkGuestGrowth$' -benchtime 1x ./virt >"$work/guest-growth.out" 2>&1) ||
		{ echo "bench: guest-growth failed: $(grep -v 'level=DEBUG' "$work/guest-growth.out" | tail -c 1500)" >&2; return 1; }
	awk '
		{ name = ($1 == "lvm" ? "LVM" : $1); missed = ($3 > 0 || $4 > 0 ? " MISSED" : "")
		  line = line sep sprintf("%s pool: guest %.1f MiB/s, %d pauses (goal 0)%s, %d growths, device %d MiB", name, $2, $3, missed, $5, $7); sep = "; " }
		END { if (NR != 2) { print "guest-growth: no result" > "/dev/stderr"; exit 1 } print "guest-growth: " line }' "$result"
}

BENCHMARKS=(inspect create hook import cow_latency subcluster_cow_latency dbus_create dbus_inspect idle_rss start_time grow_latency guest_growth)
# BENCH_ONLY="dbus_create idle_rss" runs just those.
if [ -n "${BENCH_ONLY:-}" ]; then
	read -ra BENCHMARKS <<<"$BENCH_ONLY"
fi

status=0
for name in "${BENCHMARKS[@]}"; do
	"bench_$name" || { echo "$name: FAILED" >&2; status=1; }
done
exit "$status"
