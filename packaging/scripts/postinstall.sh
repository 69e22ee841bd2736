#!/bin/sh
# volagent postinst (deb: "configure" [old-version]; rpm: 1 install, 2 upgrade).
set -e

case "$1" in
configure | 1 | 2) ;;
*) exit 0 ;;
esac

# Members of this group may call volagent's mutating D-Bus methods.
if ! getent group volagent >/dev/null 2>&1; then
	groupadd --system volagent
fi

# The system bus reads the new policy file on reload.
if [ -S /run/dbus/system_bus_socket ] && command -v dbus-send >/dev/null 2>&1; then
	dbus-send --system --type=method_call --dest=org.freedesktop.DBus \
		/org/freedesktop/DBus org.freedesktop.DBus.ReloadConfig >/dev/null 2>&1 || true
fi

# Enable (recorded even without systemd, as debhelper does) and (re)start
# only where systemd runs (not in chroots or containers without it).
if command -v deb-systemd-helper >/dev/null 2>&1; then
	deb-systemd-helper unmask volagent.service >/dev/null || true
	if deb-systemd-helper --quiet was-enabled volagent.service; then
		deb-systemd-helper enable volagent.service >/dev/null || true
	else
		deb-systemd-helper update-state volagent.service >/dev/null || true
	fi
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
	if ! command -v deb-systemd-helper >/dev/null 2>&1; then
		systemctl enable volagent.service >/dev/null 2>&1 || true
	fi
	systemctl restart volagent.service >/dev/null 2>&1 || true
fi
exit 0
