#!/bin/bash
# The checks of issue 12, run inside the test guest (scripts/vm/run.sh) by
# vmtest.service from the disk labelled "vmtest", mounted at /vmtest. Each
# check prints one TAP line on /dev/ttyS1 ("ok N - NAME" or "not ok N -
# NAME" followed by "#" lines with its output); names start with the point
# of the issue they prove (2.1 install, 2.2 polkit, 2.3 lvm, 2.4 libvirt,
# 2.5 upgrade/purge, 2.6 locks). Boot 1 runs everything but what needs a
# reboot, then reboots; boot 2 runs the reboot checks, upgrade and purge,
# prints "# vmtest done" and powers off. When a check failed the journal of
# both boots is saved to /vmtest/results/.
#
# By hand in `make vm-shell`: bash /vmtest/guest-tests.sh (it reboots and
# powers the guest off like the unit does).
set -u
V=/vmtest
S=$V/state   # survives the reboot: phase, check counter, variables
R=$V/results # read by the host
mkdir -p "$S" "$R"
exec 3>/dev/ttyS1
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
phase=$(cat "$S/phase" 2>/dev/null || echo 1)
n=$(cat "$S/n" 2>/dev/null || echo 0)

VG=vmtestvg
POOLDISK=/dev/disk/by-id/virtio-vmtest-pool
IMG=/var/lib/libvirt/images
REQ=/var/lib/volagent/requests
DEST=(org.volagent.VolAgent1 /org/volagent/VolAgent1 org.volagent.VolAgent1.Manager)
CONF=/etc/volagent/volagent.toml

tap() {
	echo "$*" >&3
	echo "vmtest: $*"
}

# check NAME FUNCTION [ARGS]: runs FUNCTION in a subshell with set -e;
# variables it must pass on go through setvar.
check() {
	local name=$1 rc t0=$SECONDS
	shift
	(
		set -eo pipefail
		"$@"
	) >"$S/check.log" 2>&1 3>&-
	rc=$?
	n=$((n + 1))
	echo "$n" >"$S/n"
	if [ "$rc" -eq 0 ]; then
		tap "ok $n - $name ($((SECONDS - t0)) s)"
	else
		tap "not ok $n - $name ($((SECONDS - t0)) s)"
		{
			tail -n 40 "$S/check.log"
			echo "-- journal of volagent.service:"
			journalctl -u volagent --no-pager -n 8 -o short-monotonic
		} 2>&1 | sed 's/^/#   /' >&3
		echo "$n - $name" >>"$S/failed"
	fi
	[ -f "$S/vars" ] && . "$S/vars"
	return 0
}

die() {
	echo "$*"
	exit 1
}
setvar() { printf '%s=%q\n' "$1" "$2" >>"$S/vars"; }
[ -f "$S/vars" ] && . "$S/vars"

# waitfor SECONDS WHAT COMMAND...: polls COMMAND until it succeeds.
waitfor() {
	local secs=$1 what=$2 end
	shift 2
	end=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		[ "$SECONDS" -lt "$end" ] || die "timed out after $secs s waiting for $what"
		sleep 0.5
	done
}

bus_up() { busctl status org.volagent.VolAgent1 >/dev/null 2>&1 && [ "$(systemctl is-active volagent)" = active ]; }
mainpid() { systemctl show -P MainPID volagent; }
# volumes: the daemon's volumes as JSON, sorted by pool and name.
volumes() { volagent volumes --json | jq -S 'sort_by(.pool, .name)'; }
# vol POOL NAME FIELD: one field of one volume.
vol() { volagent volumes --json | jq -er --arg p "$1" --arg n "$2" --arg f "$3" '.[] | select(.pool == $p and .name == $n) | .[$f]'; }
create_overlay() { # POOL NAME BACKING FORMAT SIZE: the object path
	busctl call "${DEST[@]}" CreateOverlay 'ssssta{sv}' "$1" "$2" "$3" "$4" "$5" 0 | awk '{ gsub(/"/, "", $2); print $2 }'
}

# Domains: TCG, firmware only (SeaBIOS), one disk as the README shows it.
domain_xml() { # NAME SOURCE-DEV DRIVER-ATTRS [BUS]
	local bus=${4:-virtio} target=vda
	[ "$bus" = ide ] && target=hda
	cat <<EOF
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' $3/>
      <source dev='$2'/>
      <target dev='$target' bus='$bus'/>
    </disk>
  </devices>
</domain>
EOF
}
define() { # NAME SOURCE-DEV DRIVER-ATTRS [BUS]
	domain_xml "$@" >"/tmp/$1.xml"
	virsh -q define "/tmp/$1.xml" >/dev/null
}
running() { [ "$(virsh domstate "$1" 2>/dev/null)" = running ]; }
vol_xml() { # NAME
	cat <<EOF
<volume>
  <name>$1</name>
  <capacity unit='G'>1</capacity>
  <target><format type='qcow2'/></target>
  <backingStore>
    <path>$IMG/base.raw</path>
    <format type='raw'/>
  </backingStore>
</volume>
EOF
}
request_ready() { [ -L "$REQ/$1/$2" ] && [ -b "$REQ/$1/$2" ]; }
vol_create() { # POOL NAME: virsh vol-create, then volagent replaces the request with a link
	vol_xml "$2" >"/tmp/$2.vol.xml"
	virsh vol-create "$1" "/tmp/$2.vol.xml"
	waitfor 60 "volagent to turn request $1/$2 into a link to its device" request_ready "$1" "$2"
	volagent inspect --json "$REQ/$1/$2" | tee "/tmp/$2.inspect.json"
	jq -e --arg b "$IMG/base.raw" '.["backing-filename"] == $b or .backing == $b or (tostring | contains($b))' "/tmp/$2.inspect.json" >/dev/null ||
		die "$1/$2 does not record backing $IMG/base.raw"
}

# ---------------------------------------------------------------- 2.1
c_install() {
	apt-get install -y -q "$V/debs/volagent_N.deb"
	[ "$(dpkg-query -W -f '${Status}' volagent)" = 'install ok installed' ]
}
c_active() {
	[ "$(systemctl show -P Type volagent)" = notify ] || die "Type is $(systemctl show -P Type volagent)"
	[ "$(systemctl is-active volagent)" = active ] || die "volagent is $(systemctl is-active volagent)"
	local st
	st=$(systemctl show -P StatusText volagent)
	[ -n "$st" ] || die "no STATUS= text"
	systemctl status --no-pager volagent | tee /dev/stderr | grep -F "Status: \"$st\"" >/dev/null || die "systemctl status does not show the STATUS= line"
}
c_busctl() {
	truncate -s 256M "$IMG/base.raw"
	echo "vmtest base image" | dd of="$IMG/base.raw" conv=notrunc status=none
	local obj dev
	obj=$(create_overlay default vm0 "$IMG/base.raw" raw 0)
	[[ "$obj" == /org/volagent/VolAgent1/volumes/* ]] || die "CreateOverlay returned $obj"
	dev=$(busctl get-property org.volagent.VolAgent1 "$obj" org.volagent.VolAgent1.Volume DevicePath | awk '{ gsub(/"/, "", $2); print $2 }')
	[ -b "$dev" ] || die "volume $obj has no block device ($dev)"
	qemu-img info --output=json "json:{\"driver\":\"qcow2\",\"backing\":null,\"file\":{\"driver\":\"host_device\",\"filename\":\"$dev\"}}" | tee /tmp/vm0.json
	jq -e --arg b "$IMG/base.raw" '.["backing-filename"] == $b and .["backing-filename-format"] == "raw"' /tmp/vm0.json
}
c_activation() {
	systemctl stop volagent
	[ "$(systemctl is-active volagent)" != active ] || die "volagent still active after stop"
	busctl get-property "${DEST[@]}" Version
	[ "$(systemctl is-active volagent)" = active ] || die "the call did not start volagent ($(systemctl is-active volagent))"
}
watchdog_restarted() { [ "$(mainpid)" != "$1" ] && [ "$(mainpid)" != 0 ] && bus_up; }
c_watchdog() {
	local pid restarts
	pid=$(mainpid)
	restarts=$(systemctl show -P NRestarts volagent)
	kill -STOP "$pid"
	# WatchdogSec=30s as packaged, RestartSec=2s.
	waitfor 90 "systemd's watchdog to restart the stopped volagent (pid $pid)" watchdog_restarted "$pid"
	[ "$(systemctl show -P NRestarts volagent)" -gt "$restarts" ] || die "NRestarts did not grow"
	journalctl -u volagent --no-pager | grep -i 'watchdog timeout' || die "no watchdog timeout in the journal"
}
c_journal() {
	journalctl -u volagent -o json --no-pager >/tmp/volagent.json
	# "overlay created" (c_busctl) carries pool, volume, id, backing.
	jq -se --arg b "$IMG/base.raw" 'map(select(.MESSAGE == "overlay created" and .POOL == "default" and .VOLUME == "vm0" and .BACKING == $b and .BACKING_FORMAT == "raw" and .PRIORITY == "6")) | length > 0' /tmp/volagent.json ||
		die "no structured record of the overlay: $(grep -m3 'overlay created' /tmp/volagent.json)"
}

# ---------------------------------------------------------------- 2.2
c_polkit_setup() {
	busctl call org.freedesktop.PolicyKit1 /org/freedesktop/PolicyKit1/Authority org.freedesktop.DBus.Properties Get ss org.freedesktop.PolicyKit1.Authority BackendName
	busctl status org.freedesktop.PolicyKit1 >/dev/null
	id alice >/dev/null 2>&1 || useradd -m -G volagent alice
	id bob >/dev/null 2>&1 || useradd -m bob
}
c_polkit_group() {
	runuser -u alice -- busctl call "${DEST[@]}" CreateOverlay 'ssssta{sv}' default vm-alice "$IMG/base.raw" raw 0 0
	vol default vm-alice id
}
c_polkit_other() {
	local before out
	before=$(volumes)
	if out=$(runuser -u bob -- busctl call "${DEST[@]}" CreateOverlay 'ssssta{sv}' default vm-bob "$IMG/base.raw" raw 0 0 2>&1); then
		die "bob (not in group volagent) was allowed: $out"
	fi
	echo "$out"
	# The daemon's NotAuthorized, or the bus policy's AccessDenied before it.
	grep -Eq 'NotAuthorized|not authorized|Access denied|AccessDenied|Rejected send message' <<<"$out" || die "refused, but not as unauthorized: $out"
	[ "$(volumes)" = "$before" ] || die "the volumes changed"
}
c_polkit_root() {
	create_overlay default vm-root "$IMG/base.raw" raw 0
	vol default vm-root id
}

# ---------------------------------------------------------------- 2.3
c_lvm_setup() {
	waitfor 30 "the pool disk $POOLDISK" test -b "$POOLDISK"
	pvcreate -q "$POOLDISK"
	vgcreate -q "$VG" "$POOLDISK"
	# Also the administrator's edit the upgrade must keep.
	cat >>"$CONF" <<EOF

# vmtest: an LVM pool on the guest's second virtio disk.
[[pool]]
name = "fast"
type = "lvm"
volume_group = "$VG"
activation = "device-mapper"
backing_roots = ["$IMG"]
initial_size = "64M"
chunk_size = "64M"
policy = "enforce"
EOF
	setvar CONF_SUM "$(sha256sum <"$CONF")"
	systemctl restart volagent
	waitfor 30 "volagent on the bus" bus_up
	busctl get-property "${DEST[@]}" Pools | grep pools/fast >/dev/null || die "no pool fast: $(busctl get-property "${DEST[@]}" Pools)"
}
c_lvm_import() {
	head -c 40M /dev/urandom >"$IMG/lvbase.raw"
	volagent volumes import --pool fast --name base --source-format raw "$IMG/lvbase.raw" </dev/null
	local dev real
	dev=$(vol fast base device-path)
	echo "device-path $dev"
	[[ "$dev" == /dev/$VG/* ]] || die "base's device is $dev, not /dev/$VG/LV"
	[ -b "$dev" ] || die "$dev is not a block device"
	real=$(readlink -f "$dev")
	[[ "$real" == /dev/dm-* ]] || die "$dev is $real, not a device-mapper device"
	dmsetup info "$real"
	lvs "$VG"
}
c_lvm_overlay() {
	volagent overlay create --pool fast --name ov1 --backing-volume fast/base --size 1G
	local bn dev
	bn=$(vol fast ov1 backing-name)
	dev=$(vol fast ov1 device-path)
	echo "ov1 records backing $bn, is at $dev"
	[[ "$bn" == /dev/$VG/* ]] || die "ov1 records backing $bn, not a stable /dev/$VG/LV name"
	[[ "$bn" != *dm-* && "$bn" != *loop* ]] || die "unstable backing name $bn"
	qemu-img info --output=json "$dev" | tee /tmp/ov1.json
	jq -e --arg b "$bn" '.["backing-filename"] == $b and (.["backing-filename-format"] | length > 0)' /tmp/ov1.json
	setvar OV1_BACKING "$bn"
}
c_lvm_chain() {
	# qemu reads ov1 through its chain: the guest view is the imported data.
	qemu-img compare -f qcow2 -F raw "$(vol fast ov1 device-path)" "$IMG/lvbase.raw"
}
c_lvm_start_activates() {
	# An LV the administrator deactivated (or one LVM did not
	# autoactivate) is active again once volagent has started: the start
	# activates every inactive LV of the pool in one lvchange.
	lvchange -an "$VG/ov1"
	lvs --noheadings -o lv_attr "$VG/ov1" | grep -q '^ *....-' || die "ov1 still active: $(lvs "$VG")"
	systemctl restart volagent
	waitfor 30 "volagent on the bus" bus_up
	lvs --noheadings -o lv_attr "$VG/ov1" | grep -q '^ *....a' || die "ov1 inactive after volagent started: $(lvs "$VG")"
	[ -b "$(vol fast ov1 device-path)" ] || die "ov1's device $(vol fast ov1 device-path) is not a block device"
	volumes | jq -e 'map(select(.pool == "fast" and (.problem // "") != "")) | length == 0' >/dev/null ||
		die "volumes with a problem after the start: $(volumes | jq -c 'map(select((.problem // "") != ""))')"
	qemu-img compare -f qcow2 -F raw "$(vol fast ov1 device-path)" "$IMG/lvbase.raw"
}

# ---------------------------------------------------------------- 2.4
c_libvirt_pools() {
	# As the README says: libvirtd reads hooks only when it starts.
	systemctl restart libvirtd
	systemctl is-active libvirtd
	waitfor 60 "volagent's libvirt pools default and fast" sh -c 'virsh -q pool-list | grep -qw fast && virsh -q pool-list | grep -qw default'
	virsh pool-list --all
	ls -ld /var/lib/volagent "$REQ" "$REQ/fast"
}
c_vol_create() {
	vol_create fast vm1
	virsh vol-path --pool fast vm1
	virsh pool-refresh fast >/dev/null
	virsh vol-list fast | grep -w vm1
}
c_hook_refuses() {
	define bad "$REQ/fast/vm1" ""
	local out
	if out=$(virsh start bad 2>&1); then
		virsh destroy bad >/dev/null 2>&1
		die "a disk without <driver type> started: $out"
	fi
	echo "$out"
	! running bad || die "bad runs"
	grep -q 'violation' <<<"$out" || die "virsh start failed, but not by the hook's policy verdict"
	! grep -q 'cannot ask the volagent daemon' <<<"$out" || die "the hook could not reach the daemon"
}
c_domain_starts() {
	define good "$REQ/fast/vm1" "type='qcow2' cache='none' io='native'"
	virsh start good
	waitfor 30 "domain good running" running good
	local pid user
	pid=$(cat /run/libvirt/qemu/good.pid)
	user=$(ps -o user= -p "$pid")
	[ "$user" = libvirt-qemu ] || die "qemu runs as $user, not libvirt-qemu"
}
c_thin_domain() {
	local dev
	create_overlay fast vmthin "$IMG/base.raw" raw $((1 << 30))
	dev=$(vol fast vmthin device-path)
	# IDE: HMP qemu-io -d reaches the guest device's own block backend
	# (virtio-blk keeps it on an inner device without an id, and a second
	# writer on the node is refused the write permission the guest holds).
	define thin "$dev" "type='qcow2' cache='none' io='native'" ide
	virsh start thin
	waitfor 30 "domain thin running" running thin
}
# qemu_io DOMAIN COMMAND: a qemu-io command on the domain's only disk,
# through qemu's block layer (HMP); by the device, else by libvirt's
# format node name.
qemu_io() {
	# HMP's qemu-io prints its results on qemu's stdout; the monitor shows
	# only errors, so any answer is one.
	virsh qemu-monitor-command "$1" --hmp "qemu-io -d ide0-0-0 \"$2\""
}
size_at_least() { [ "$(blockdev --getsize64 "$1")" -ge "$2" ]; }
c_thin_growth() {
	running thin || die "domain thin is not running"
	local dev lv size0 off=0 step=$((8 << 20)) total=$((112 << 20)) out
	lv=$(vol fast vmthin device-path)
	dev=$(readlink -f "$lv")
	size0=$(blockdev --getsize64 "$dev")
	echo "vmthin: $dev ($lv), $size0 bytes"
	[ "$size0" -lt "$total" ] || die "vmthin's device starts at $size0 bytes, no growth needed"
	# Guest-side writes through qemu's block layer (HMP qemu-io), in
	# steps that stay below the device's end; each crossing of the block
	# threshold must grow the LV before the next step needs the room.
	while [ "$off" -lt "$total" ]; do
		waitfor 60 "vmthin's device to grow past $((off + step + (4 << 20))) bytes" size_at_least "$dev" $((off + step + (4 << 20)))
		out=$(qemu_io thin "write -P 0x5a $off $step")
		[ -z "$(tr -d '[:space:]' <<<"$out")" ] || die "qemu-io write at $off: $out"
		off=$((off + step))
	done
	# qemu-io's read results go to qemu's stdout, not the monitor: the
	# data is read back from the host, after a flush, sharing the image.
	out=$(qemu_io thin "flush")
	[ -z "$(tr -d '[:space:]' <<<"$out")" ] || die "qemu-io flush: $out"
	out=$(qemu-io -U -r -f qcow2 -c "read -P 0x5a 0 $total" "$lv" 2>&1) || die "reading back: $out"
	! grep -qi 'fail\|error\|verification' <<<"$out" || die "reading back: $out"
	lvs --units b "$lv"
	[ "$(lvs --noheadings --nosuffix --units b -o lv_size "$lv" | tr -d ' ')" -gt "$size0" ] || die "the LV did not grow"
	journalctl -u volagent --no-pager | grep 'volume device grown' | tail -3
}

# ---------------------------------------------------------------- 2.6
c_locks_volagent_refuses() {
	running thin || die "domain thin is not running"
	head -c 1M /dev/urandom >/tmp/small.raw
	local out obj
	if out=$(volagent import --allow-backing "$IMG" --source-format raw /tmp/small.raw "$(vol fast vmthin device-path)" 2>&1); then
		die "volagent import wrote into vmthin while domain thin holds it: $out"
	fi
	echo "local import refused: $out"
	obj=$(vol fast vmthin object)
	if out=$(busctl call org.volagent.VolAgent1 "$obj" org.volagent.VolAgent1.Volume Delete 'a{sv}' 0 2>&1); then
		die "Delete of vmthin allowed while domain thin runs on it: $out"
	fi
	echo "D-Bus Delete refused: $out"
	grep -qi 'busy' <<<"$out" || die "Delete refused, but not as Busy"
	grep -q 'domain thin' <<<"$out" || die "Delete refused without naming the domain"
	if out=$(busctl call org.volagent.VolAgent1 "$obj" org.volagent.VolAgent1.Volume Write 'taya{sv}' 0 1 0 0 2>&1); then
		die "Write into vmthin allowed while domain thin runs on it: $out"
	fi
	echo "D-Bus Write refused: $out"
	grep -qi 'busy' <<<"$out" || die "Write refused, but not as Busy"
	# A running domain's disk is resized through libvirt: qemu rewrites its
	# own header, and the domain sees the new size.
	local before after
	before=$(virsh domblkinfo thin hda | awk '/Capacity/ { print $2 }')
	busctl call org.volagent.VolAgent1 "$obj" org.volagent.VolAgent1.Volume Resize 'ta{sv}' $((before + (1 << 30))) 0 ||
		die "Resize of vmthin under domain thin failed"
	after=$(virsh domblkinfo thin hda | awk '/Capacity/ { print $2 }')
	[ "$after" = $((before + (1 << 30))) ] || die "domain thin sees capacity $after after Resize, want $((before + (1 << 30)))"
	running thin || die "domain thin stopped after the Resize"
}
has_open() { ls -l "/proc/$1/fd" 2>/dev/null | grep -- "-> $2\$" >/dev/null; }
c_locks_libvirt_refused() {
	local obj dev pid out
	obj=$(create_overlay default vm-lock "$IMG/base.raw" raw 0)
	dev=$(vol default vm-lock device-path)
	define lockdom "$dev" "type='qcow2' cache='none' io='native'"
	{ yes vmtest-lock || true; } | head -c 200M >/tmp/big.raw
	volagent import --allow-backing "$IMG" --source-format raw /tmp/big.raw "$dev" </dev/null >/tmp/import.log 2>&1 &
	pid=$!
	# Stopped at once and let run in slices of a few ms until it has the
	# disk open: it is then stopped with the disk held, mid-copy at the
	# latest. (Polling while it ran let a fast copy finish between the
	# poll and the stop.)
	kill -STOP "$pid"
	local end=$((SECONDS + 60))
	until has_open "$pid" "$dev"; do
		kill -0 "$pid" 2>/dev/null || die "volagent import exited before it opened $dev: $(cat /tmp/import.log)"
		[ "$SECONDS" -lt "$end" ] || { kill -CONT "$pid"; die "volagent import did not open $dev in 60 s"; }
		kill -CONT "$pid"
		sleep 0.01
		kill -STOP "$pid"
	done
	# Stopped mid-copy, it still holds the disk: a domain must not start on it.
	if out=$(virsh start lockdom 2>&1); then
		kill -CONT "$pid"
		virsh destroy lockdom >/dev/null 2>&1
		wait "$pid"
		die "lockdom started on $dev while volagent was writing it: $out"
	fi
	kill -CONT "$pid"
	echo "refused while volagent writes: $out"
	wait "$pid" || die "volagent import failed: $(cat /tmp/import.log)"
	virsh start lockdom || die "lockdom does not start after the import either"
	virsh destroy lockdom
}

# ---------------------------------------------------------------- 2.4 restarts
c_libvirt_restarts() {
	systemctl restart libvirtd
	systemctl restart volagent
	waitfor 30 "volagent on the bus" bus_up
	running good || die "domain good stopped"
	vol_create fast vm2
	virsh destroy good
	virsh start good
	waitfor 30 "domain good running" running good
	if out=$(virsh start bad 2>&1); then
		virsh destroy bad
		die "bad started after the restarts: $out"
	fi
	grep -q violation <<<"$out" || die "bad refused, but not by the policy: $out"
}

# ---------------------------------------------------------------- 2.3 reboot
c_reboot_volumes() {
	waitfor 60 "volagent on the bus after the reboot" bus_up
	volumes >/tmp/after.json
	diff <(jq -S 'map({id, name, pool, format, "backing-name", "backing-format", "virtual-size", role})' "$S/before-reboot.json") \
		<(jq -S 'map({id, name, pool, format, "backing-name", "backing-format", "virtual-size", role})' /tmp/after.json) ||
		die "the volumes differ after the reboot"
	jq -r '.[] | select(.pool == "fast") | .["device-path"]' /tmp/after.json | while read -r dev; do
		[ -b "$dev" ] || die "$dev missing after the reboot"
	done
	! journalctl -b -u volagent --no-pager | grep -i 'has a problem' || die "volagent reports a volume with a problem"
}
c_reboot_chains() {
	qemu-img compare -f qcow2 -F raw "$(vol fast ov1 device-path)" "$IMG/lvbase.raw"
	qemu-img info --backing-chain "$REQ/fast/vm1"
	out=$(qemu-io -r -f qcow2 -c "read -P 0x5a 0 $((112 << 20))" "$(vol fast vmthin device-path)" 2>&1) ||
		die "the data written before the reboot: $out"
	! grep -qi 'fail\|error\|verification' <<<"$out" || die "the data written before the reboot: $out"
	virsh start thin
	waitfor 30 "domain thin running" running thin
	virsh destroy thin
}

# ---------------------------------------------------------------- 2.5
c_upgrade() {
	local pid0 next
	next=$(cat "$V/debs/next-version")
	pid0=$(mainpid)
	volumes >/tmp/before-upgrade.json
	apt-get install -y -q "$V/debs/volagent_N+1.deb"
	[ "$(dpkg-query -W -f '${Version}' volagent)" = "$next" ] || die "installed $(dpkg-query -W -f '${Version}' volagent), not $next"
	[ "$(sha256sum <"$CONF")" = "$CONF_SUM" ] || die "the edited configuration changed: $(cat "$CONF")"
	waitfor 30 "volagent on the bus" bus_up
	[ "$(mainpid)" != "$pid0" ] || die "volagent was not restarted (pid $pid0)"
	# A loop pool's volume may come back on another loop device.
	diff <(jq -S 'map(del(.object, .["device-path"]))' /tmp/before-upgrade.json) <(volumes | jq -S 'map(del(.object, .["device-path"]))') || die "the volumes changed"
	qemu-img compare -f qcow2 -F raw "$(vol fast ov1 device-path)" "$IMG/lvbase.raw"
}
c_purge() {
	local files left="" path
	files=$(dpkg -L volagent)
	lvs --noheadings -o lv_name "$VG" | sort >/tmp/lvs-before
	apt-get purge -y -q volagent
	! dpkg-query -W -f '${Status}' volagent 2>/dev/null | grep -q installed || die "still installed"
	while IFS= read -r path; do
		[ -e "$path" ] || continue
		[ -d "$path" ] && [ -n "$(dpkg -S "$path" 2>/dev/null)" ] && continue
		[ -d "$path" ] && [ -n "$(ls -A "$path")" ] && continue
		left="$left $path"
	done <<<"$files"
	[ -z "$left" ] || die "left behind:$left"
	[ ! -e /etc/volagent ] || die "/etc/volagent left behind"
	[ ! -e /etc/libvirt/hooks/qemu.d/volagent ] || die "the hook was left behind"
	! pgrep -x volagent || die "volagent still runs"
	! busctl status org.volagent.VolAgent1 >/dev/null 2>&1 || die "org.volagent.VolAgent1 still on the bus"
	getent group volagent || die "the volagent group was removed (policy keeps system groups)"
	# Only guests' disks stay: the loop pool's volume files, and the LVs.
	left=$(find /var/lib/volagent -mindepth 1 ! -path '/var/lib/volagent/pools' ! -path '/var/lib/volagent/pools/*' 2>/dev/null || true)
	[ -z "$left" ] || die "left in /var/lib/volagent besides the pools' volumes: $left"
	diff /tmp/lvs-before <(lvs --noheadings -o lv_name "$VG" | sort) || die "LVs changed"
}

c_purge_libvirt() {
	systemctl restart libvirtd
	virsh pool-list --all
	! virsh -q pool-list --all | grep -Ew 'default|fast' || die "libvirt still defines volagent's request pools"
}

# No domain left running: libvirt-guests would wait 300 s for each at shutdown.
destroy_all() {
	local d
	for d in $(virsh list --name 2>/dev/null); do
		virsh destroy "$d" >/dev/null 2>&1
	done
}

finish() {
	destroy_all
	tap "1..$n"
	if [ -s "$S/failed" ]; then
		journalctl --no-pager -o short-monotonic >"$R/journal.txt" 2>&1
		journalctl --no-pager -o json -u volagent >"$R/volagent-journal.json" 2>&1
		tap "# $(wc -l <"$S/failed") failed; the journal is in results/journal.txt"
	fi
	tap "# vmtest done"
	sync
	umount "$V" 2>/dev/null
	systemctl poweroff
	exit 0
}

tap "# boot $phase: vmtest starts $(cut -d' ' -f1 /proc/uptime) s after the kernel"
case $phase in
1)
	check "2.1 install: apt install ./volagent_N.deb" c_install
	check "2.1 install: volagent.service active, Type=notify, STATUS= shown by systemctl status" c_active
	check "2.1 install: busctl call CreateOverlay on the system bus" c_busctl
	check "2.1 install: D-Bus activation starts the stopped daemon" c_activation
	check "2.1 install: the watchdog restarts a SIGSTOPped daemon" c_watchdog
	check "2.1 install: journalctl -u volagent -o json carries structured fields" c_journal
	check "2.2 polkit: polkitd runs, users alice (group volagent) and bob" c_polkit_setup
	check "2.2 polkit: a member of group volagent may CreateOverlay" c_polkit_group
	check "2.2 polkit: a user outside group volagent is refused, nothing changes" c_polkit_other
	check "2.2 polkit: root may CreateOverlay" c_polkit_root
	check "2.3 lvm: a pool on a virtio disk, added to the configuration" c_lvm_setup
	check "2.3 lvm: an imported volume appears as /dev/VG/LV on device-mapper" c_lvm_import
	check "2.3 lvm: an overlay over an LVM volume records /dev/VG/LV" c_lvm_overlay
	check "2.3 lvm: qemu reads the overlay through its chain" c_lvm_chain
	check "2.3 lvm: volagent activates the pool's inactive LVs when it starts" c_lvm_start_activates
	check "2.4 libvirt: volagent's request pools are defined in libvirtd" c_libvirt_pools
	check "2.4 libvirt: virsh vol-create on a request pool makes an overlay" c_vol_create
	check "2.4 libvirt: the hook refuses a domain without <driver type>" c_hook_refuses
	check "2.4 libvirt: a TCG domain starts from the overlay (README disk XML) as libvirt-qemu" c_domain_starts
	check "2.3 lvm: a TCG domain starts on an LVM overlay by its /dev/VG/LV path" c_thin_domain
	check "2.3 lvm: thin growth extends the LV under a running domain, qemu writes past the old end" c_thin_growth
	check "2.6 locks: volagent refuses a disk a running domain holds" c_locks_volagent_refuses
	check "2.6 locks: libvirt cannot start a domain on a disk volagent is writing" c_locks_libvirt_refused
	check "2.4 libvirt: after restarting libvirtd and volagent, vol-create, start and the hook still work" c_libvirt_restarts
	destroy_all
	volumes >"$S/before-reboot.json" 2>/dev/null
	echo 2 >"$S/phase"
	tap "# rebooting for the LVM reboot check"
	sync
	systemctl reboot
	exit 0
	;;
2)
	check "2.3 lvm after reboot: every volume is back, no problem reported" c_reboot_volumes
	check "2.3 lvm after reboot: qemu opens the overlay chains" c_reboot_chains
	check "2.5 upgrade: N+1 keeps the edited configuration, restarts the service, volumes intact" c_upgrade
	check "2.5 purge: apt purge leaves nothing but the volumes and the volagent group" c_purge
	check "2.5 purge: no libvirt storage pool of volagent is left defined" c_purge_libvirt
	finish
	;;
esac
