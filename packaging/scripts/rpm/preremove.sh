#!/bin/sh
# volagent %preun for RPM: $1 is 0 on erase, 1 on upgrade. As
# %systemd_preun does: stop and disable on erase; running jobs are
# cancelled cleanly.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
	systemctl --no-reload disable --now volagent.service >/dev/null 2>&1 || true
fi
exit 0
