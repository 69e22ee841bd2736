#!/bin/bash
# The command agent of the shared-pool VM tests (scripts/vm/run-shared.sh):
# vmtest.service runs it in each of the two guests (as guest-tests.sh on
# the disk labelled "vmtest"). It reads one command per line from the
# virtio-serial port vmtest.ctl (base64 of a bash script), runs it, and
# answers one line: "RC <exit status> <base64 of its output>". The host
# script decides everything; the guests only run what they are told, so the
# two hosts' steps are ordered by the host, never by sleeps in a guest.
set -u
export LC_ALL=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive
port=/dev/virtio-ports/vmtest.ctl
for _ in $(seq 600); do
	[ -e "$port" ] && break
	sleep 0.1
done
exec 4<>"$port"
echo "READY $(cat /vmtest/host_id)" >&4
while IFS= read -r line <&4; do
	line=${line%$'\r'}
	[ -n "$line" ] || continue
	printf '%s' "$line" | base64 -d >/tmp/agent-cmd.sh 2>/dev/null || { echo "RC 127 $(echo 'bad command encoding' | base64 -w0)" >&4; continue; }
	bash /tmp/agent-cmd.sh >/tmp/agent-out 2>&1 </dev/null 4>&-
	rc=$?
	echo "RC $rc $(base64 -w0 </tmp/agent-out)" >&4
done
