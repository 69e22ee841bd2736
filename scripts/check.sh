#!/usr/bin/env bash
# make check: the tests anyone can run, with the race detector, as an
# ordinary user, with no system tools: the parsers (qcow2 header, LVM
# reports, tags), the gate, the configuration, names, and the D-Bus
# adapter's tests that need no bus.
#
# Which tests: every test of PKGS except those named in
# scripts/check-needs-root.txt. Nothing is skipped silently:
#   - the test binaries run as an ordinary user (nobody when make check
#     runs as root) with an empty PATH, so a test that needs root or a tool
#     and is not named in the list fails here (testutil.RequireRoot and
#     RequireTool fail, never skip);
#   - a name in the list that is not a test of its package fails;
#   - a test that skips itself (--- SKIP) fails make check.
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
PKGS=(qcow2 hostblk backend dbusapi systemd internal/bytesize internal/testguest cmd/volagentd)
LIST=scripts/check-needs-root.txt

work=$(mktemp -d /tmp/volagent-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir -p "$work/bin" "$work/src" "$work/empty-path" "$work/home" "$work/tmp"

# Build as the caller (their module and build caches), run as someone else.
for p in "${PKGS[@]}"; do
	"$GO" test -race -c -o "$work/bin/${p//\//_}.test" "./$p"
done

# The files tests read (testdata, ../packaging/...), where the test user
# can read them: the tree itself may be private to the caller.
if git rev-parse --git-dir >/dev/null 2>&1; then
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work/src"
else
	tar --exclude=./.git -cf - . | tar -xf - -C "$work/src"
fi
chmod -R a+rX "$work/src" "$work/bin"

as=()
if [ "$(id -u)" = 0 ]; then
	as=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
	chown nobody:nogroup "$work/home" "$work/tmp"
fi
chmod 1777 "$work/tmp"

status=0
for p in "${PKGS[@]}"; do
	bin="$work/bin/${p//\//_}.test"
	mapfile -t skipped < <(awk -v p="$p" '!/^#/ && $1 == p { print $2 }' "$LIST")
	tests=$("$bin" -test.list '.*')
	for name in "${skipped[@]}"; do
		if ! grep -qx -- "$name" <<<"$tests"; then
			echo "make check: $LIST names $p $name, which is not a test of ./$p; remove or rename the line" >&2
			status=1
		fi
	done
	args=(-test.count=1 -test.v -test.timeout=110s)
	if [ "${#skipped[@]}" -gt 0 ]; then
		args+=(-test.skip "^($(IFS='|'; echo "${skipped[*]}"))\$")
	fi
	log="$work/${p//\//_}.log"
	start=$SECONDS
	if (cd "$work/src/$p" && "${as[@]}" env -i HOME="$work/home" TMPDIR="$work/tmp" PATH="$work/empty-path" "$bin" "${args[@]}") >"$log" 2>&1 &&
		! grep -q -- '^\s*--- SKIP' "$log"; then
		echo "ok    ./$p  $(grep -c -- '^--- PASS' "$log") tests passed, ${#skipped[@]} left to make test  ($((SECONDS - start))s)"
	else
		status=1
		echo "FAIL  ./$p" >&2
		grep -E -- '^\s*--- (FAIL|SKIP)|^panic|^FAIL|WARNING: DATA RACE' "$log" >&2 || true
		echo "--- full output of ./$p:" >&2
		cat "$log" >&2
	fi
done
if [ "$status" != 0 ]; then
	echo "make check failed. A test that needs root or a system tool belongs in $LIST." >&2
fi
exit "$status"
