# Shell helpers (sourced, not run) for scripts that need a D-Bus system bus
# where there may be none: the demo, the package test and the benchmarks.

# start_private_bus DIR POLICY_DIR: starts a private dbus-daemon of the
# system type, listening on DIR/bus, whose policy is the system bus's
# default plus every file in POLICY_DIR (dbusapi/dbustest/system-bus.conf.in,
# the template the Go tests use too). Sets bus_address and bus_pid; the
# caller stops the daemon.
start_private_bus() {
	local dir=$1 policy_dir=$2 root _
	root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
	command -v dbus-daemon >/dev/null || { echo "dbus-daemon missing; run scripts/install-deps.sh" >&2; return 1; }
	sed -e "s|@SOCKET@|$dir/bus|g" -e "s|@POLICY_DIR@|$policy_dir|g" \
		"$root/dbusapi/dbustest/system-bus.conf.in" >"$dir/bus.conf"
	dbus-daemon --config-file="$dir/bus.conf" --nofork --nopidfile --nosyslog 2>"$dir/bus.log" &
	bus_pid=$!
	bus_address=unix:path=$dir/bus
	for _ in $(seq 200); do
		[ -S "$dir/bus" ] && return 0
		kill -0 "$bus_pid" 2>/dev/null || break
		sleep 0.05
	done
	echo "dbus-daemon did not start: $(cat "$dir/bus.log")" >&2
	return 1
}

# wait_for_volagent ADDRESS PID LOG: waits until volagentd (PID)
# owns its name on the bus at ADDRESS; fails with its LOG if it exits or
# takes more than 30 s.
wait_for_volagent() {
	local address=$1 pid=$2 log=$3 _
	for _ in $(seq 600); do
		busctl --address="$address" status org.volagent.VolAgent1 >/dev/null 2>&1 && return 0
		kill -0 "$pid" 2>/dev/null || { echo "volagentd exited: $(cat "$log")" >&2; return 1; }
		sleep 0.05
	done
	echo "volagentd did not take its bus name in 30 s: $(cat "$log")" >&2
	return 1
}
