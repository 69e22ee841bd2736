#!/usr/bin/env bash
# Installs what volagent's build, demo and tests need on a Debian 12 host.
# Idempotent and quiet when everything is already there.
set -euo pipefail

need_pkgs=()
want() { # want COMMAND PACKAGE
	command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2")
}
want qemu-img qemu-utils
want qemu-io qemu-utils
want strace strace
want lvm lvm2
want losetup mount
want busctl systemd
want dbus-daemon dbus-daemon
want zstd zstd
want gcc gcc
want make make
# libvirt integration (virt/, `volagent hook qemu`): the daemon with its QEMU
# driver (the dir and logical storage backends are in libvirt-daemon on
# Debian 12), virsh, the cgo headers for libvirt.org/go/libvirt, and qemu
# with SeaBIOS for the KVM domain tests. libvirt-daemon-system is left out
# on purpose: its maintainer scripts start services; the tests configure
# and start libvirtd themselves (internal/testutil/libvirtd.go).
want libvirtd libvirt-daemon
[ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] || need_pkgs+=(libvirt-daemon-driver-qemu)
want virsh libvirt-clients
want pkg-config pkg-config
pkg-config --exists libvirt 2>/dev/null || need_pkgs+=(libvirt-dev)
want qemu-system-x86_64 qemu-system-x86
[ -e /usr/share/seabios/bios-256k.bin ] || need_pkgs+=(seabios)
want lintian lintian
want rpm rpm
want objdump binutils
want setpriv util-linux
# gdbus: a GLib client's view of the D-Bus errors (dbusapi tests).
want gdbus libglib2.0-bin
# The polkit rules test runs the shipped rules file in a JavaScript engine.
want node nodejs
# The Cockpit page: npm builds it (cockpit/package-lock.json); its browser
# test (scripts/cockpit-test.sh) runs cockpit-ws with a local bridge and
# Debian's chromium headless; the page inspects images through gdbus.
want npm npm
[ -x /usr/lib/cockpit/cockpit-ws ] || need_pkgs+=(cockpit-ws)
want cockpit-bridge cockpit-bridge
want chromium chromium
# The VM tests (scripts/vm): the guest image and its disks.
want mmdebstrap mmdebstrap
want mkfs.ext4 e2fsprogs
want debugfs e2fsprogs

if [ "${#need_pkgs[@]}" -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "install-deps: missing packages ${need_pkgs[*]}; run as root so they can be installed with apt-get" >&2
		exit 1
	fi
	echo "install-deps: installing ${need_pkgs[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# Go: the machine's toolchain, or Debian's; go.mod's go line makes go >= 1.21
# fetch the exact toolchain it needs through the module proxy.
if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
	echo "install-deps: no Go toolchain; installing golang-go" >&2
	apt-get install -y -qq golang-go >/dev/null
fi
