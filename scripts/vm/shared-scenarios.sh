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

s_refuse_unconfigured() {
	# Before lvmlockd is configured on B: the daemon says what is missing.
	g B 300 "
apt-get install -y -q /vmtest/debs/volagent_N.deb >/dev/null
cat >\$CONF <<'EOF'
$(volagent_conf)
EOF
systemctl restart volagent
waitfor 60 'volagent to start' systemctl is-active -q volagent
status=\$(systemctl show -P StatusText volagent)
echo \"STATUS=\$status\"
grep -q 'use_lvmlockd' <<<\"\$status\"
"
}

setup_lvmlockd() { # GUEST HOST_ID
	g "$1" 300 "
sed -i -E 's/^(\s*)#?\s*use_lvmlockd = [01]\s*$/\1use_lvmlockd = 1/' /etc/lvm/lvm.conf
[ \"\$(lvmconfig global/use_lvmlockd)\" = use_lvmlockd=1 ] || { echo 'use_lvmlockd not set'; lvmconfig global/use_lvmlockd; exit 1; }
cat >/etc/lvm/lvmlocal.conf <<'EOF'
local {
	host_id = $2
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
systemctl start sanlock lvmlockd
waitfor 30 lvmlockd lvmlockctl --info
"
}

setup_hosts() {
	scenario "13.1 set-up: volagentd refuses a shared pool without use_lvmlockd = 1, and says so in STATUS" s_refuse_unconfigured
	scenario "13.1 set-up: lvmlockd and sanlock on A (host_id 1)" setup_lvmlockd A 1
	scenario "13.1 set-up: lvmlockd and sanlock on B (host_id 2)" setup_lvmlockd B 2
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

s_start_volagent() {
	for h in A B; do
		g "$h" 300 "
dpkg-query -W volagent >/dev/null 2>&1 || apt-get install -y -q /vmtest/debs/volagent_N.deb >/dev/null
cat >\$CONF <<'EOF'
$(volagent_conf)
EOF
t0=\$(now)
systemctl restart volagent
echo \"timing: systemctl restart volagent (READY after the lockspace started) on $h: \$(since \$t0) s\"
systemctl show -P StatusText volagent
served
"
	done
}

run_scenarios() {
	setup_hosts
}
