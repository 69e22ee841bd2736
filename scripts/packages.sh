#!/usr/bin/env bash
# Builds dist/volagent_<version>-1_amd64.deb and dist/volagent-<version>-1.x86_64.rpm
# with nfpm from packaging/nfpm.yaml: the daemon volagentd (a stripped PIE
# binary linking libvirt), the static volagent command, man pages, the
# changelog, the Cockpit page, and shared-library dependencies read from the
# daemon itself.
set -euo pipefail
cd "$(dirname "$0")/.."

NFPM=(go run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2)
version=$(scripts/version.sh)
staging=$PWD/dist/staging
rm -rf dist
mkdir -p "$staging"

# Reproducible: dates come from the last commit.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

CGO_ENABLED=1 go build -trimpath -buildmode=pie -ldflags "-s -w" -o "$staging/volagentd" ./cmd/volagentd
# Static: no dynamic loader, no libvirt, so the hook starts in a millisecond.
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$staging/volagent" ./cmd/volagent

# The Cockpit page (/usr/share/cockpit/volagent), built from source with the
# pinned lockfile; no browser is downloaded (playwright-core is only the
# test driver).
(cd cockpit && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error && npm run build --silent) >&2
cp -r cockpit/dist "$staging/cockpit"

for page in packaging/man/volagent.8 packaging/man/volagentd.8 packaging/man/volagent.toml.5; do
	gzip -9n <"$page" >"$staging/$(basename "$page").gz"
done

changelog_date=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
cat >"$staging/changelog.Debian" <<CHANGES
volagent ($version-1) unstable; urgency=medium

  * Release $version.

 -- volagent maintainers <maintainers@volagent.invalid>  $changelog_date
CHANGES
gzip -9n <"$staging/changelog.Debian" >"$staging/changelog.Debian.gz"
cp "$staging/changelog.Debian.gz" "$staging/changelog.gz"

# Shared-library dependencies, per format: Debian packages that ship the
# libraries the binary needs (libc6 with the newest GLIBC symbol version it
# uses), and RPM's own soname dependencies.
needed=$(objdump -p "$staging/volagentd" | awk '$1 == "NEEDED" { print $2 }')
deb_depends=(lvm2 dbus)
rpm_depends=(lvm2 dbus)
for lib in $needed; do
	path=$(ldconfig -p | awk -v lib="$lib" '$1 == lib && /x86-64/ && !found { print $NF; found = 1 }')
	[ -n "$path" ] || { echo "packages: cannot find $lib" >&2; exit 1; }
	# awk reads all its input: head would make dpkg -S die of SIGPIPE under pipefail.
	# dpkg knows a library by the path its package ships (with usrmerge,
	# /lib/... or /usr/lib/...), so ask for both.
	pkg=$( (dpkg -S "$(readlink -f "$path")" 2>/dev/null || dpkg -S "$path") | awk -F: 'NR == 1 { print $1 }')
	if [ "$pkg" = libc6 ]; then
		glibc=$(objdump -T "$staging/volagentd" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
		pkg="libc6 (>= $glibc)"
	fi
	deb_depends+=("$pkg")
	rpm_depends+=("$lib()(64bit)")
done
# One Debian package can ship several of the libraries (libvirt0).
mapfile -t deb_depends < <(printf '%s\n' "${deb_depends[@]}" | awk '!seen[$0]++')

join() { local IFS=,; echo "$*"; }
quote() { local out=() d; for d in "$@"; do out+=("\"$d\""); done; join "${out[@]}"; }
sed -e "s|\${VOLAGENT_VERSION}|$version|g" \
	-e "s|\${VOLAGENT_STAGING}|$staging|g" \
	-e "s|\${VOLAGENT_DEB_DEPENDS}|$(quote "${deb_depends[@]}" | sed 's/[&|]/\\&/g')|g" \
	-e "s|\${VOLAGENT_RPM_DEPENDS}|$(quote "${rpm_depends[@]}" | sed 's/[&|]/\\&/g')|g" \
	packaging/nfpm.yaml >"$staging/nfpm.yaml"

for packager in deb rpm; do
	"${NFPM[@]}" package --config "$staging/nfpm.yaml" --packager "$packager" --target dist/ >&2
done
ls dist/*.deb dist/*.rpm
