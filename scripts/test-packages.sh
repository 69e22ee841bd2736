#!/usr/bin/env bash
# Tests the packages as an administrator meets them: builds the .deb and the
# .rpm, lints them, checks the rpm's files, requirements and scripts, then
# installs the .deb on this machine, starts the installed binary against a
# private system bus that reads the installed policy file, creates an
# overlay with busctl, purges the package, and proves nothing is left but
# what Debian policy keeps (the volagent system group).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/private-bus.sh

fail() { echo "test-packages: FAIL: $*" >&2; exit 1; }
step() { echo "test-packages: $*" >&2; }

[ "$(id -u)" -eq 0 ] || fail "needs root (dpkg -i, loop devices)"
for tool in lintian rpm dpkg busctl dbus-daemon qemu-img systemd-analyze objdump; do
	command -v "$tool" >/dev/null || fail "needs $tool; run scripts/install-deps.sh"
done
if dpkg -s volagent >/dev/null 2>&1; then
	fail "a volagent package is already installed; this test installs and purges its own"
fi

scripts/packages.sh >/dev/null
deb=$(ls dist/volagent_*_amd64.deb)
rpm=$(ls dist/volagent-*.x86_64.rpm)
version=$(scripts/version.sh)

step "lintian $deb"
# Errors fail the test; warnings are shown.
lintian_status=0
lintian --fail-on error --tag-display-limit 0 "$deb" >dist/lintian.log 2>&1 || lintian_status=$?
grep -v 'running with root privileges' dist/lintian.log >&2 || true
[ "$lintian_status" -eq 0 ] || fail "lintian reports errors (exit $lintian_status)"
# Debian's maintainer scripts go through deb-systemd-helper/-invoke.
! grep -q maintainer-script-calls-systemctl dist/lintian.log || fail "Debian maintainer scripts call systemctl"

# polkitd reads rules only from rules.d; the group volagent gets its grant there.
dpkg-deb -c "$deb" | grep -q ' \./usr/share/polkit-1/rules\.d/50-volagent\.rules$' || fail "the deb does not ship /usr/share/polkit-1/rules.d/50-volagent.rules"

# The Cockpit page (listings read whole: grep -q would cut the pipe).
deb_list=$(dpkg-deb -c "$deb")
rpm_list=$(rpm -qlp "$rpm" 2>/dev/null)
for page in index.html manifest.json index.js index.css; do
	grep -q " \./usr/share/cockpit/volagent/$page\$" <<<"$deb_list" || fail "the deb does not ship the Cockpit page's $page"
	grep -qx "/usr/share/cockpit/volagent/$page" <<<"$rpm_list" || fail "the rpm does not ship the Cockpit page's $page"
done

step "rpm contents, requirements and scripts"
expected_rpm_files="/etc/libvirt/hooks/qemu.d/volagent
/etc/volagent/volagent.toml
/usr/bin/volagent
/usr/lib/systemd/system/volagent.service
/usr/sbin/volagentd
/usr/share/dbus-1/interfaces/org.volagent.VolAgent1.xml
/usr/share/dbus-1/system-services/org.volagent.VolAgent1.service
/usr/share/dbus-1/system.d/org.volagent.VolAgent1.conf
/usr/share/doc/volagent/changelog.gz
/usr/share/doc/volagent/copyright
/usr/share/man/man5/volagent.toml.5.gz
/usr/share/man/man8/volagent.8.gz
/usr/share/man/man8/volagentd.8.gz
/usr/share/polkit-1/actions/org.volagent.VolAgent1.policy
/usr/share/polkit-1/rules.d/50-volagent.rules"
# The Cockpit page's asset names carry content hashes: checked apart.
actual_rpm_files=$(rpm -qlp "$rpm" 2>/dev/null | grep -v '^/usr/share/cockpit/volagent' | sort)
[ "$actual_rpm_files" = "$expected_rpm_files" ] ||
	fail "rpm files differ from the expected list:
$(diff <(echo "$expected_rpm_files") <(echo "$actual_rpm_files") || true)"
[ "$(rpm -qp --queryformat '%{VERSION}' "$rpm" 2>/dev/null)" = "$version" ] || fail "rpm version is not $version"
expected_config="/etc/libvirt/hooks/qemu.d/volagent
/etc/volagent/volagent.toml"
[ "$(rpm -qp --configfiles "$rpm" 2>/dev/null | sort)" = "$expected_config" ] || fail "rpm config files"
requires=$(rpm -qp --requires "$rpm" 2>/dev/null)
for need in lvm2 dbus 'libc.so.6()(64bit)'; do
	grep -qxF "$need" <<<"$requires" || fail "rpm does not require $need (requires: $requires)"
done
# Every shared library the binary needs is required.
for lib in $(objdump -p dist/staging/volagent | awk '$1 == "NEEDED" { print $2 }'); do
	grep -qxF "$lib()(64bit)" <<<"$requires" || fail "rpm does not require $lib"
done
scripts=$(rpm -qp --scripts "$rpm" 2>/dev/null)
for want in "postinstall scriptlet" "preuninstall scriptlet" "postuninstall scriptlet" "groupadd --system volagent"; do
	grep -qF "$want" <<<"$scripts" || fail "rpm scripts lack \"$want\""
done

step "deb metadata"
[ "$(dpkg-deb -f "$deb" Version)" = "$version-1" ] || fail "deb version is not $version-1"
depends=$(dpkg-deb -f "$deb" Depends)
for need in lvm2 dbus libc6; do
	grep -q "\b$need\b" <<<"$depends" || fail "deb does not depend on $need ($depends)"
done
[ "$(dpkg-deb -I "$deb" conffiles | sort)" = "$expected_config" ] || fail "deb conffiles: $(dpkg-deb -I "$deb" conffiles)"

work=$(mktemp -d /var/tmp/volagent-pkgtest.XXXXXX)
daemon_pid= bus_pid=
cleanup() {
	set +e
	[ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
	[ -n "$bus_pid" ] && kill "$bus_pid" 2>/dev/null
	for loop in $(losetup -n -O NAME -j "$work/pool" 2>/dev/null) $(losetup -a | awk -F: -v d="$work/" 'index($0, d) { print $1 }'); do
		losetup -d "$loop" 2>/dev/null
	done
	dpkg -s volagent >/dev/null 2>&1 && dpkg --purge volagent >/dev/null 2>&1
	rm -rf "$work"
}
trap cleanup EXIT

step "dpkg -i"
dpkg -i "$deb" >/dev/null
[ "$(/usr/bin/volagent --version)" = "volagent version $version" ] || fail "installed binary's --version"
[ "$(/usr/sbin/volagentd --version)" = "volagentd version $version" ] || fail "installed daemon's --version"
# The command the hook runs at every domain start loads no shared library.
! objdump -p /usr/bin/volagent | grep -q NEEDED || fail "/usr/bin/volagent is not statically linked"
[ -x /etc/libvirt/hooks/qemu.d/volagent ] || fail "the libvirt hook is not installed executable"
echo '<domain><name>x</name></domain>' | /etc/libvirt/hooks/qemu.d/volagent x release end - ||
	fail "the installed hook fails on a step it should ignore"
getent group volagent >/dev/null || fail "postinst did not create the volagent group"
installed_files=$(dpkg -L volagent)

step "systemd-analyze verify and security"
systemd-analyze verify /lib/systemd/system/volagent.service || fail "systemd-analyze verify"
systemd-analyze security --offline=yes /lib/systemd/system/volagent.service | tail -1 >&2

step "installed daemon on a private bus with the installed policy"
mkdir -p "$work/pool" "$work/images"
# The installed policy, read from where the system bus reads it.
start_private_bus "$work" /usr/share/dbus-1/system.d
address=$bus_address
cat >"$work/volagent.toml" <<EOF
[[pool]]
name = "pkgtest"
type = "loop"
directory = "$work/pool"
backing_roots = ["$work/images"]
initial_size = "64M"
chunk_size = "64M"
policy = "enforce"
EOF
DBUS_SYSTEM_BUS_ADDRESS=$address /usr/sbin/volagentd --config "$work/volagent.toml" 2>"$work/daemon.log" &
daemon_pid=$!
wait_for_volagent "$address" "$daemon_pid" "$work/daemon.log" || fail "the installed daemon did not start"
truncate -s 256M "$work/images/base.raw"
reply=$(busctl --address="$address" call org.volagent.VolAgent1 /org/volagent/VolAgent1 \
	org.volagent.VolAgent1.Manager CreateOverlay ssssta{sv} pkgtest vm1 "$work/images/base.raw" raw 0 0) ||
	fail "CreateOverlay over D-Bus: $(cat "$work/daemon.log")"
volume=$(awk '{ gsub(/"/, "", $2); print $2 }' <<<"$reply")
device=$(busctl --address="$address" get-property org.volagent.VolAgent1 "$volume" \
	org.volagent.VolAgent1.Volume DevicePath | awk '{ gsub(/"/, "", $2); print $2 }')
[ -b "$device" ] || fail "volume $volume has no block device ($device)"
info=$(qemu-img info --output=json -U "json:{\"driver\":\"qcow2\",\"backing\":null,\"file\":{\"driver\":\"host_device\",\"filename\":\"$device\"}}")
grep -q "\"backing-filename\": \"$work/images/base.raw\"" <<<"$info" || fail "overlay's backing file: $info"
grep -q '"backing-filename-format": "raw"' <<<"$info" || fail "overlay's backing format: $info"
kill "$daemon_pid" && wait "$daemon_pid" || fail "the daemon did not stop cleanly on SIGTERM"
daemon_pid=

step "dpkg --purge leaves nothing behind"
dpkg --purge volagent >/dev/null
left=""
while IFS= read -r path; do
	[ -e "$path" ] || continue
	# Directories other packages own (/usr/share/man, ...) stay.
	[ -d "$path" ] && [ -n "$(dpkg -S "$path" 2>/dev/null)" ] && continue
	[ -d "$path" ] && [ -n "$(ls -A "$path")" ] && continue
	left="$left $path"
done <<<"$installed_files"
[ -z "$left" ] || fail "left behind after purge:$left"
[ ! -e /etc/volagent ] || fail "/etc/volagent left behind after purge"
[ ! -e /etc/libvirt/hooks/qemu.d/volagent ] || fail "the libvirt hook was left behind after purge"
[ ! -e /var/lib/volagent ] || fail "/var/lib/volagent left behind after purge"
step "ok"
