# The steps of the shared-pool VM tests, sourced by scripts/vm/run-shared.sh
# (which provides `on GUEST SECONDS SCRIPT`, `scenario NAME FUNCTION`, $VG
# and $work). Functions named s_* are scenarios; each prints "timing: ..."
# lines for the figures the log keeps.

# Shell functions every guest script starts with.
GUEST_LIB='
set -eo pipefail
VG='"$VG"'
CONF=/etc/volagent/volagent.toml
# waitfor SECONDS WHAT COMMAND...: polls COMMAND until it succeeds.
waitfor() {
	local secs=$1 what=$2 end
	shift 2
	end=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		[ "$SECONDS" -lt "$end" ] || { echo "timed out after $secs s waiting for $what"; exit 1; }
		sleep 0.2
	done
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" "BEGIN { printf \"%.2f\", b - a }"; }
vols() { volagent volumes --json; }
vol() { volagent volumes --json | jq -er --arg n "$1" --arg f "$2" ".[] | select(.pool == \"shared\" and .name == \$n) | .[\$f]"; }
volid() { vol "$1" id; }
has_vol() { volagent volumes --json | jq -e --arg n "$1" "any(.[]; .pool == \"shared\" and .name == \$n)"; }
no_vol() { ! has_vol "$1"; }
active_on() { [ "$(vol "$1" active-on)" = "$2" ]; }
served() { systemctl is-active -q volagent && busctl get-property org.volagent.VolAgent1 /org/volagent/VolAgent1/pools/shared org.volagent.VolAgent1.Pool Shared | grep -qx "b true"; }
'

# g GUEST SECONDS SCRIPT: `on` with the library in front.
g() { on "$1" "$2" "$GUEST_LIB
$3"; }

volagent_conf() {
	cat <<'EOF'
[hosts]
1 = "hosta"
2 = "hostb"

[[pool]]
name = "shared"
type = "lvm"
volume_group = "vmsharedvg"
activation = "device-mapper"
shared = true
lock_type = "sanlock"
backing_roots = ["/var/lib/volagent/images"]
initial_size = "16M"
chunk_size = "16M"
EOF
}

# both SECONDS SCRIPT-A SCRIPT-B: runs the two scripts at once, one on
# each host, and waits for both.
both() {
	local secs=$1 ra=0 rb=0 pa pb
	g A "$secs" "$2" >"$work/both.A" 2>&1 &
	pa=$!
	g B "$secs" "$3" >"$work/both.B" 2>&1 &
	pb=$!
	wait "$pa" || ra=$?
	wait "$pb" || rb=$?
	sed 's/^/A: /' "$work/both.A"
	sed 's/^/B: /' "$work/both.B"
	[ "$ra" -eq 0 ] && [ "$rb" -eq 0 ]
}

INSTALL="dpkg-query -W volagent >/dev/null 2>&1 || apt-get install -y -q /vmtest/debs/volagent_N.deb >/dev/null 2>&1"

s_refuse_unconfigured() {
	# Before lvmlockd is configured on B: the daemon says what is missing.
	# (A installs the package meanwhile.)
	# Distinct host names first: LVM records the creating host's
	# (lv_host), by which each host cleans up only its own crashes.
	both 300 "hostname hosta; echo hosta >/etc/hostname; $INSTALL" "
hostname hostb; echo hostb >/etc/hostname
$INSTALL
cat >\$CONF <<'EOF'
$(volagent_conf)
EOF
systemctl restart volagent
waitfor 60 'volagent to start' systemctl is-active -q volagent
status=\$(systemctl show -P StatusText volagent)
echo \"STATUS=\$status\"
grep -q 'use_lvmlockd = 1' <<<\"\$status\"
"
}

lvmlockd_script() { # HOST_ID
	cat <<EOS
sed -i -E 's/^(\s*)#?\s*use_lvmlockd = [01]\s*\$/\1use_lvmlockd = 1/' /etc/lvm/lvm.conf
[ "\$(lvmconfig global/use_lvmlockd)" = use_lvmlockd=1 ] || { echo 'use_lvmlockd not set'; lvmconfig global/use_lvmlockd; exit 1; }
cat >/etc/lvm/lvmlocal.conf <<'EOF'
local {
	host_id = $1
}
EOF
# lvm2's own test suite: a 2 s sanlock I/O timeout instead of 10 s.
mkdir -p /etc/systemd/system/lvmlockd.service.d
cat >/etc/systemd/system/lvmlockd.service.d/vmtest.conf <<'EOF'
[Service]
ExecStart=
ExecStart=/usr/sbin/lvmlockd --foreground -o 2
EOF
systemctl daemon-reload
# Both are enabled at boot: restarted with the drop-in.
systemctl restart lvmlockd
systemctl start sanlock
waitfor 30 lvmlockd lvmlockctl --info
EOS
}

s_setup_lvmlockd() {
	both 300 "$(lvmlockd_script 1)" "$(lvmlockd_script 2)"
}

setup_hosts() {
	scenario "13.1 set-up: volagentd refuses a shared pool without use_lvmlockd = 1, and says so in STATUS" s_refuse_unconfigured
	scenario "13.1 set-up: lvmlockd and sanlock on A (host_id 1) and B (host_id 2)" s_setup_lvmlockd
	scenario "13.1 set-up: vgcreate --shared on A (lockspace started)" s_vgcreate
	scenario "13.1 set-up: volagentd on both hosts starts the lockspace, READY after it" s_start_volagent
}

s_vgcreate() {
	g A 300 "
t0=\$(now)
vgcreate --shared \$VG /dev/disk/by-id/virtio-vmtest-shared
echo \"timing: vgcreate --shared and lockspace start on A: \$(since \$t0) s\"
vgs -o vg_name,vg_lock_type,vg_lock_args \$VG
"
}

start_volagent_script() { # HOST
	cat <<EOS
$INSTALL
cat >\$CONF <<'EOF'
$(volagent_conf)
EOF
t0=\$(now)
systemctl restart volagent
echo "timing: systemctl restart volagent (READY after the lockspace started) on $1: \$(since \$t0) s"
systemctl show -P StatusText volagent
served
EOS
}

s_start_volagent() {
	both 300 "$(start_volagent_script A)" "$(start_volagent_script B)"
}

# hosttime: seconds since the epoch on this (the test) host.
hosttime() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(hosttime)" 'BEGIN { printf "%.2f", b - a }'; }
# seen_within HOST SECONDS WHAT COND-SCRIPT: polls COND-SCRIPT in HOST
# (one guest command, polling inside) and prints how long it took from
# the call, measured on this host.
seen_within() {
	local h=$1 secs=$2 what=$3 cond=$4 t0
	t0=$(hosttime)
	g "$h" $((secs + 30)) "cond() { $cond; }
waitfor $secs '$what' cond" || return 1
	echo "timing: $what: $(elapsed "$t0") s after the change returned"
}
# dbus_call HOST VOLUME METHOD SIG ARGS...: a Volume method by name.
vol_call() {
	local h=$1 name=$2 method=$3
	shift 3
	g "$h" 120 "busctl call org.volagent.VolAgent1 /org/volagent/VolAgent1/volumes/\$(volid $name) org.volagent.VolAgent1.Volume $method $*"
}

s_create_visible() {
	g A 120 "
head -c 4M /dev/urandom >/root/one.raw
t0=\$(now)
volagent volumes import --pool shared --name vol1 /root/one.raw >/dev/null
echo \"timing: import of a 4 MiB volume on A: \$(since \$t0) s\"
active_on vol1 local
"
	seen_within B 10 "vol1 made on A listed on B" "has_vol vol1"
	g B 30 "vols | jq -c '.[] | select(.name == \"vol1\") | {name, \"active-on\", \"device-size\"}'; active_on vol1 hosta"
	g A 120 "volagent volumes deactivate vol1; active_on vol1 ''"
	seen_within B 15 "vol1 deactivated on A shown inactive on B" "active_on vol1 ''"
	g A 120 "busctl call org.volagent.VolAgent1 /org/volagent/VolAgent1/volumes/\$(volid vol1) org.volagent.VolAgent1.Volume Delete a{sv} 0"
	seen_within B 10 "vol1 deleted on A gone from B" "no_vol vol1"
}

s_import_write_refused() {
	g A 300 "
head -c 8M /dev/urandom >/root/two.raw
volagent volumes import --pool shared --name vol2 /root/two.raw >/dev/null
active_on vol2 local
# Write (and flush) a marker through the daemon: \"volA\" at 1 MiB.
busctl call org.volagent.VolAgent1 /org/volagent/VolAgent1/volumes/\$(volid vol2) org.volagent.VolAgent1.Volume Write 'taya{sv}' 1048576 4 118 111 108 65 0
printf volA | dd of=/root/two.raw bs=1 seek=1048576 conv=notrunc 2>/dev/null
volagent export /dev/\$VG/vol2 - | cmp - /root/two.raw
sha256sum </root/two.raw | cut -d' ' -f1 >/root/two.sum
"
	g B 60 "waitfor 15 'vol2 on B' has_vol vol2"
	g B 120 "
out=\$(volagent volumes activate vol2 2>&1) && { echo \"activated on B while A has it: \$out\"; exit 1; }
echo \"refused: \$out\"
grep -q hosta <<<\"\$out\"
out=\$(lvchange -aey \$VG/vol2 2>&1) && { echo 'lvchange -aey succeeded on B'; exit 1; }
echo \"lvm: \$out\"
out=\$(busctl call org.volagent.VolAgent1 /org/volagent/VolAgent1/volumes/\$(volid vol2) org.volagent.VolAgent1.Volume Write 'taya{sv}' 0 1 66 0 2>&1) && { echo 'Write succeeded on B'; exit 1; }
echo \"Write on B refused: \$out\"
grep -q hosta <<<\"\$out\"
"
}

s_grow() {
	g A 300 "
head -c 40M /dev/urandom >/root/three.raw
t0=\$(now)
volagent volumes import --pool shared --name vol3 /root/three.raw >/dev/null
echo \"timing: import of 40 MiB with the device grown from 16 MiB: \$(since \$t0) s\"
volagent export /dev/\$VG/vol3 - | cmp - /root/three.raw
size=\$(vol vol3 device-size)
echo \"device size \$size\"
[ \"\$size\" -gt \$((40 << 20)) ]
journalctl -u volagent -o json --no-pager | jq -r 'select(.MESSAGE == \"volume device grown\" and .VOLUME == \"vol3\") | \"timing: lvextend and refresh under the exclusive lock: \" + .SECONDS + \" s (to \" + .DEVICE_SIZE + \" bytes)\"'
[ \$(journalctl -u volagent -o json --no-pager | jq -r 'select(.MESSAGE == \"volume device grown\" and .VOLUME == \"vol3\") | .SECONDS' | wc -l) -ge 1 ]
echo \$size >/root/three.size
"
	local size
	size=$(g A 10 "cat /root/three.size")
	seen_within B 15 "vol3 grown on A shows its new LV size on B" "[ \"\$(vol vol3 device-size)\" -ge $size ]"
}

s_delete_refused() {
	g B 120 "
out=\$(busctl call org.volagent.VolAgent1 /org/volagent/VolAgent1/volumes/\$(volid vol2) org.volagent.VolAgent1.Volume Delete a{sv} 0 2>&1) && { echo 'Delete succeeded on B'; exit 1; }
echo \"Delete on B refused: \$out\"
grep -q 'active on hosta' <<<\"\$out\"
has_vol vol2
"
	g A 60 "has_vol vol2; active_on vol2 local; lvs \$VG/vol2"
}

s_shared_base() {
	g A 300 "
head -c 4M /dev/urandom >/root/base.raw
volagent volumes import --pool shared --name base6 /root/base.raw >/dev/null
volagent volumes deactivate base6
volagent overlay create --pool shared --name ovA --backing-volume shared/base6 >/dev/null
active_on ovA local
active_on base6 local
volagent export --allow-backing /dev /dev/\$VG/ovA - | cmp - /root/base.raw
"
	g B 300 "
waitfor 15 'ovA on B' has_vol ovA
volagent overlay create --pool shared --name ovB --backing-volume shared/base6 >/dev/null
active_on ovB local
active_on base6 local
lvs -o lv_name,lv_attr \$VG
out=\$(volagent volumes activate base6 2>&1) && { echo 'base6 taken exclusively on B while A reads it'; exit 1; }
echo \"exclusive activation of the shared base refused: \$out\"
grep -q hosta <<<\"\$out\"
"
	# The guest views agree: both overlays read the same base.
	local a b
	a=$(g A 120 "volagent export --allow-backing /dev /dev/\$VG/ovA - | sha256sum | cut -d' ' -f1")
	b=$(g B 120 "volagent export --allow-backing /dev /dev/\$VG/ovB - | sha256sum | cut -d' ' -f1")
	echo "ovA $a ovB $b"
	[ -n "$a" ] && [ "$a" = "$b" ]
}

# A domain with vol2 as its disk, as the hook gets it on stdin.
DOMAIN_XML="<domain type='kvm'><name>vm2</name><devices><disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='/dev/$VG/vol2'/><target dev='vda' bus='virtio'/></disk></devices></domain>"

s_hook() {
	g A 120 "
xml=\"$DOMAIN_XML\"
out=\$(volagent hook qemu vm2 migrate begin - <<<\"\$xml\" 2>&1) && { echo \"migration allowed: \$out\"; exit 1; }
echo \"migrate begin refused: \$out\"
grep -q shared-pool-migration <<<\"\$out\"
volagent hook qemu vm2 prepare begin - <<<\"\$xml\"
echo 'prepare begin on A (which holds vol2): allowed'
active_on vol2 local
"
	g B 120 "
xml=\"$DOMAIN_XML\"
out=\$(volagent hook qemu vm2 prepare begin - <<<\"\$xml\" 2>&1) && { echo \"start allowed on B while A holds vol2: \$out\"; exit 1; }
echo \"prepare begin on B refused: \$out\"
grep -q shared-volume-busy <<<\"\$out\"
grep -q hosta <<<\"\$out\"
"
}

s_host_death() {
	echo "killing host A's qemu (pid ${qpid[A]})"
	kill -KILL "${qpid[A]}"
	wait "${qpid[A]}" 2>/dev/null || true
	unset 'qpid[A]'
	local t0 want
	want=$(cat "$work/two.sum")
	[ -n "$want" ] || { echo "no checksum of vol2 from A"; return 1; }
	t0=$(hosttime)
	g B 400 "
waitfor 300 'vol2 activated on B after the lease of A expired' volagent volumes activate vol2
"
	echo "timing: vol2 taken over by B after A was killed: $(elapsed "$t0") s"
	g B 120 "
active_on vol2 local
sum=\$(volagent export /dev/\$VG/vol2 - | sha256sum | cut -d' ' -f1)
echo \"vol2 on B: \$sum\"
[ \"\$sum\" = \"$want\" ]
"
}

s_lease_storage_lost() {
	# B watches for the signal, then loses the shared disk (qemu's drive
	# removed under the guest: every I/O to it fails, as with a dead path).
	g B 60 "
rm -f /root/signals
setsid busctl monitor --system --match \"type='signal',interface='org.volagent.VolAgent1.Manager',member='LeaseLost'\" >/root/signals 2>&1 </dev/null &
waitfor 10 'busctl monitor' grep -q Monitoring /root/signals
"
	local t0
	t0=$(hosttime)
	monitor B "drive_del sh"
	g B 120 "
waitfor 60 'the LeaseLost signal' grep -q 'Member=LeaseLost' /root/signals
grep -A12 'Member=LeaseLost' /root/signals | head -20
journalctl -u volagent --no-pager -o cat | grep 'LEASE STORAGE LOST'
"
	echo "timing: LeaseLost signalled and logged $(elapsed "$t0") s after the disk went away (sanlock fails its lease renewal after 8 x 2 s = 16 s; lvmlockd's kill follows)"
	g B 120 "
out=\$(busctl call org.volagent.VolAgent1 /org/volagent/VolAgent1/volumes/\$(volid vol2) org.volagent.VolAgent1.Volume Write 'taya{sv}' 0 1 66 0 2>&1) && { echo 'Write accepted without the lease storage'; exit 1; }
echo \"Write refused: \$out\"
grep -Eq 'lost access|not answered' <<<\"\$out\"
"
}

run_scenarios() {
	setup_hosts
	scenario "13.4 create on A: listed on B without a Rescan, active on hosta; deactivated and deleted on A: B follows" s_create_visible
	scenario "13.2 import and write on A while B is refused activation (naming hosta)" s_import_write_refused
	g A 10 "cat /root/two.sum" >"$work/two.sum" || true
	scenario "13.3 grow on A: the import grows the LV under A's exclusive lock; B sees the new size" s_grow
	scenario "13.2 delete from B refused while A has the volume active" s_delete_refused
	scenario "13.2 a shared base backs overlays on both hosts" s_shared_base
	scenario "13.2/13.6 hook: migrate begin refused (shared-pool-migration); prepare begin activates on A, is refused on B naming hosta (shared-volume-busy)" s_hook
	scenario "13.5 kill A's qemu: B takes over after the lease expires, flushed data intact" s_host_death
	scenario "13.5 B loses the lease storage: journal and LeaseLost signal at once, writes refused" s_lease_storage_lost
}
