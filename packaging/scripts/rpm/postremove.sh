#!/bin/sh
# volagent %postun for RPM: $1 is 0 on erase, 1 on upgrade.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
	# As %systemd_postun_with_restart does: the new version takes over.
	if [ "$1" -ge 1 ]; then
		systemctl try-restart volagent.service >/dev/null 2>&1 || true
	fi
fi
if [ -S /run/dbus/system_bus_socket ] && command -v dbus-send >/dev/null 2>&1; then
	dbus-send --system --type=method_call --dest=org.freedesktop.DBus \
		/org/freedesktop/DBus org.freedesktop.DBus.ReloadConfig >/dev/null 2>&1 || true
fi
# On erase (RPM has no purge), as Debian's purge does.
if [ "$1" -eq 0 ]; then
	# The request pools volagent made: libvirt's storage pool of each (a "dir"
	# pool on /var/lib/volagent/requests/POOL) is undefined, and the links and
	# refusal notes in it go. The volumes the links point to (LVs, loop-pool
	# files) are guests' disks and stay.
	requests=/var/lib/volagent/requests
	if [ -d "$requests" ]; then
		for dir in "$requests"/*/; do
			[ -d "$dir" ] || continue
			pool=$(basename "$dir")
			if command -v virsh >/dev/null 2>&1 &&
				virsh -q -c qemu:///system pool-dumpxml "$pool" 2>/dev/null | grep -q "<path>$requests/$pool</path>"; then
				virsh -q -c qemu:///system pool-destroy "$pool" >/dev/null 2>&1 || true
				virsh -q -c qemu:///system pool-undefine "$pool" >/dev/null 2>&1 || true
			fi
			find "$dir" -mindepth 1 -maxdepth 1 \( -type l -o -name '*.refused' -o -name '*.refused.reason' -o -name '.volagent-*' \) -delete 2>/dev/null || true
		done
	fi
	find /var/lib/volagent -depth -type d -empty -delete 2>/dev/null || true
fi
exit 0
