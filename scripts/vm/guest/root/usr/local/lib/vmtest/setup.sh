#!/bin/sh
# Runs inside the guest's root at image build time (build-image.sh):
# the guest's own configuration. $1 is the root file system's UUID.
set -e
uuid=$1
echo "UUID=$uuid / ext4 defaults,errors=remount-ro 0 1" >/etc/fstab
echo vmtest >/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 vmtest\n' >/etc/hosts
# A test guest: root without password, logged in on the serial console.
passwd -d root >/dev/null
# The journal survives the reboot check, and is saved when a check fails.
mkdir -p /var/log/journal
# No hardware watchdog in the guest: sanlock must not need one.
mkdir -p /etc/sanlock
echo "use_watchdog = 0" >/etc/sanlock/sanlock.conf
systemctl enable vmtest.service >/dev/null 2>&1
# Nothing the tests do not need slows the boot down.
systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
	fstrim.timer man-db.timer dpkg-db-backup.timer >/dev/null 2>&1 || true
rm -f /etc/machine-id && touch /etc/machine-id
