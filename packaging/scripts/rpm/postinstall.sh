#!/bin/sh
# volagent %post for RPM: $1 is 1 on install, 2 on upgrade.

# Members of this group may call volagent's mutating D-Bus methods.
if ! getent group volagent >/dev/null 2>&1; then
	groupadd --system volagent
fi

# The system bus reads the new policy file on reload.
if [ -S /run/dbus/system_bus_socket ] && command -v dbus-send >/dev/null 2>&1; then
	dbus-send --system --type=method_call --dest=org.freedesktop.DBus \
		/org/freedesktop/DBus org.freedesktop.DBus.ReloadConfig >/dev/null 2>&1 || true
fi

# As %systemd_post does: apply the preset on first install; start only
# where systemd runs.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
	if [ "$1" -eq 1 ]; then
		systemctl preset volagent.service >/dev/null 2>&1 || true
		systemctl start volagent.service >/dev/null 2>&1 || true
	fi
fi
exit 0
