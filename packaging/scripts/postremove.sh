#!/bin/sh
# volagent postrm (deb: "remove" | "purge" ...; rpm: 0 erase, 1 upgrade).
set -e

case "$1" in
remove | purge | 0) ;;
*) exit 0 ;;
esac

# As debhelper does: masked on remove so a leftover unit cannot start,
# forgotten on purge.
if command -v deb-systemd-helper >/dev/null 2>&1; then
	if [ "$1" = "remove" ]; then
		deb-systemd-helper mask volagent.service >/dev/null || true
	elif [ "$1" = "purge" ]; then
		deb-systemd-helper purge volagent.service >/dev/null || true
		deb-systemd-helper unmask volagent.service >/dev/null || true
	fi
elif [ -d /run/systemd/system ]; then
	systemctl disable volagent.service >/dev/null 2>&1 || true
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi

if [ -S /run/dbus/system_bus_socket ] && command -v dbus-send >/dev/null 2>&1; then
	dbus-send --system --type=method_call --dest=org.freedesktop.DBus \
		/org/freedesktop/DBus org.freedesktop.DBus.ReloadConfig >/dev/null 2>&1 || true
fi

# On purge, remove volagent's empty state directories. Volumes in loop
# pools are guests' disks: never deleted by a package operation.
if [ "$1" = "purge" ] && [ -d /var/lib/volagent ]; then
	find /var/lib/volagent -depth -type d -empty -delete 2>/dev/null || true
	if [ -d /var/lib/volagent ]; then
		echo "volagent: /var/lib/volagent still holds volumes; remove them by hand if no guest needs them" >&2
	fi
fi
exit 0
