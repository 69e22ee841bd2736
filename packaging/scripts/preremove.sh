#!/bin/sh
# volagent prerm (deb: "remove" | "upgrade" ...; rpm: 0 erase, 1 upgrade).
set -e

case "$1" in
remove | 0) ;;
*) exit 0 ;;
esac

# Stop the daemon before its files go; running jobs are cancelled cleanly.
if [ -d /run/systemd/system ]; then
	if command -v deb-systemd-invoke >/dev/null 2>&1; then
		deb-systemd-invoke stop volagent.service >/dev/null || true
	else
		systemctl stop volagent.service >/dev/null 2>&1 || true
	fi
fi
exit 0
