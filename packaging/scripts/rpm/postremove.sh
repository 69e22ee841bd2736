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
exit 0
