#!/usr/bin/env bash
# The Cockpit page's browser test (make cockpit-test): a private system bus
# with volagent's own bus policy, volagentd (built from this tree) on a loop
# pool, cockpit-ws --local-session serving the freshly built page (as root,
# and as the unprivileged user nobody), and Debian's chromium driven
# headless by playwright-core (cockpit/test/browser-test.mjs), which asserts
# on what the page shows and saves screenshots in dist/cockpit-test/.
#
# Everything it starts (daemon, dbus-daemon, cockpit-ws and their bridges,
# chromium, loop devices, temporary files) is removed on exit, also on
# failure. Missing tools fail the test: nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/private-bus.sh
root=$PWD
daemon=$root/${1:-bin/volagentd}
page=$root/cockpit/dist
out=$root/dist/cockpit-test
cockpit_ws=/usr/lib/cockpit/cockpit-ws
chromium=/usr/bin/chromium

fail() {
	echo "cockpit-test: $*" >&2
	exit 1
}

[ "$(id -u)" -eq 0 ] || fail "run as root (volagentd attaches loop devices, the test runs a session as nobody)"
[ -x "$chromium" ] || fail "$chromium missing: apt-get install chromium (scripts/install-deps.sh)"
[ -x "$cockpit_ws" ] || fail "$cockpit_ws missing: apt-get install cockpit-ws (scripts/install-deps.sh)"
for tool in cockpit-bridge dbus-daemon busctl node losetup setpriv; do
	command -v "$tool" >/dev/null || fail "$tool missing: run scripts/install-deps.sh"
done
[ -x "$daemon" ] || fail "$daemon missing: run make build"
[ -f "$page/index.js" ] && [ -f "$page/manifest.json" ] ||
	fail "the page is not built in $page: run make cockpit (npm ci && npm run build in cockpit/)"
[ -f "$root/cockpit/node_modules/playwright-core/package.json" ] || fail "playwright-core missing: run npm ci in cockpit/"

work=$(mktemp -d /var/tmp/volagent-cockpit.XXXXXX)
# nobody's session reaches the bus socket and the page through it.
chmod 755 "$work"
daemon_pid= bus_pid= test_pid=
ws_pids=()

# kill_group PID: stops a process group started with setsid, waiting for it.
kill_group() {
	local pid=$1 _
	kill -TERM -- "-$pid" 2>/dev/null || return 0
	for _ in $(seq 100); do
		kill -0 -- "-$pid" 2>/dev/null || return 0
		sleep 0.05
	done
	kill -KILL -- "-$pid" 2>/dev/null || true
}

cleanup() {
	local status=$? pid loop cmdline argv
	set +e
	[ -n "$test_pid" ] && kill_group "$test_pid"
	# Playwright starts chromium in its own process group and stops it when
	# node exits; a chromium left over (node killed hard) is found by the
	# profile directory only this run uses.
	# (Read with builtins: a grep for the path would find itself.)
	for cmdline in /proc/[0-9]*/cmdline; do
		mapfile -d '' argv <"$cmdline" 2>/dev/null || continue
		case "${argv[*]}" in
		*"$work/chromium-profile"*) pid=${cmdline#/proc/} && kill -KILL "${pid%/cmdline}" 2>/dev/null ;;
		esac
	done
	for pid in "${ws_pids[@]}"; do kill_group "$pid"; done
	[ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
	[ -n "$bus_pid" ] && kill "$bus_pid" 2>/dev/null && wait "$bus_pid" 2>/dev/null
	for loop in $(losetup -a | awk -F: -v d="$work/" 'index($0, d) { print $1 }'); do
		losetup -d "$loop"
	done
	if [ "$status" -ne 0 ]; then
		for log in "$work"/*.log; do
			[ -s "$log" ] && { echo "--- $log (last lines)"; tail -n 30 "$log"; } >&2
		done
	fi
	rm -rf "$work"
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

started=$(date +%s)

# The private system bus with the project's policy file, unmodified.
mkdir -p "$work/system.d"
cp packaging/dbus/org.volagent.VolAgent1.conf "$work/system.d/"
start_private_bus "$work" "$work/system.d"
export DBUS_SYSTEM_BUS_ADDRESS=$bus_address

# Images: a raw base, a raw disk a guest wrote a qcow2 header into (naming
# /etc/shadow), and a large raw source for the import (not zeros, so the
# copy takes long enough for progress to show).
mkdir -p "$work/images" "$work/pool" "$work/audit-pool"
truncate -s 64M "$work/images/base.raw"
printf 'hello from the base image\n' | dd of="$work/images/base.raw" conv=notrunc status=none
qemu-img create -q -f qcow2 -u -b /etc/shadow -F raw "$work/fake.qcow2" 64M
truncate -s 64M "$work/images/hostile.raw"
dd if="$work/fake.qcow2" of="$work/images/hostile.raw" bs=4096 count=1 conv=notrunc status=none
{ yes 'volagent import source' || true; } | head -c 768M >"$work/images/import.raw"

cat >"$work/volagent.toml" <<EOF
[[pool]]
name = "default"
type = "loop"
directory = "$work/pool"
backing_roots = ["$work/images"]
initial_size = "64M"
chunk_size = "64M"
policy = "enforce"

[[pool]]
name = "audit"
type = "loop"
directory = "$work/audit-pool"
backing_roots = ["$work/images"]
initial_size = "64M"
chunk_size = "64M"
policy = "audit"
EOF
"$daemon" --config "$work/volagent.toml" 2>"$work/daemon.log" &
daemon_pid=$!
wait_for_volagent "$bus_address" "$daemon_pid" "$work/daemon.log"

# The page as the package installs it, found through XDG_DATA_DIRS
# (cockpit-bridge reads packages from DIR/cockpit/NAME), with Cockpit's own
# packages (base1) from /usr/share.
mkdir -p "$work/share/cockpit"
cp -r "$page" "$work/share/cockpit/volagent"
chmod -R a+rX "$work/share"

free_port() {
	node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })'
}

# start_ws USER PORT: cockpit-ws with a local session (its bridge runs as
# USER) on 127.0.0.1:PORT; waits until it answers.
start_ws() {
	local user=$1 port=$2 home=$work/home-$1 _
	mkdir -p "$home"
	chown "$user" "$home"
	setsid setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups \
		env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$home" USER="$user" \
		DBUS_SYSTEM_BUS_ADDRESS="$bus_address" XDG_DATA_DIRS="$work/share:/usr/share" \
		"$cockpit_ws" --no-tls --address=127.0.0.1 --port="$port" --local-session=cockpit-bridge \
		>"$work/cockpit-ws-$user.log" 2>&1 &
	ws_pids+=($!)
	for _ in $(seq 300); do
		(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
		kill -0 "${ws_pids[-1]}" 2>/dev/null || break
		sleep 0.05
	done
	fail "cockpit-ws ($user) did not listen on 127.0.0.1:$port: $(cat "$work/cockpit-ws-$user.log")"
}
root_port=$(free_port)
start_ws root "$root_port"
nobody_port=$(free_port)
start_ws nobody "$nobody_port"

rm -rf "$out"
mkdir -p "$out"
echo "cockpit-test: volagentd on $bus_address; cockpit-ws on 127.0.0.1:$root_port (root) and :$nobody_port (nobody)"
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 \
	VOLAGENT_TEST_WORK="$work" VOLAGENT_TEST_OUT="$out" VOLAGENT_TEST_BUS="$bus_address" \
	VOLAGENT_TEST_ROOT_URL="http://127.0.0.1:$root_port" VOLAGENT_TEST_NOBODY_URL="http://127.0.0.1:$nobody_port" \
	VOLAGENT_TEST_CHROMIUM="$chromium" \
	setsid node cockpit/test/browser-test.mjs &
test_pid=$!
status=0
wait "$test_pid" || status=$?
test_pid=
[ "$status" -eq 0 ] || fail "browser test failed (exit status $status); screenshots in $out"
echo "cockpit-test: passed in $(($(date +%s) - started)) s; screenshots in $out"
