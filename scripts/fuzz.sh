#!/usr/bin/env bash
# Runs every Fuzz* target of every package for the given time each.
set -euo pipefail
fuzztime=${1:-10s}
cd "$(dirname "$0")/.."
for pkg in $(go list ./...); do
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		echo "fuzz: $pkg $target for $fuzztime"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 2s "$pkg"
	done
done
# The writer's differential test against qemu-io over the whole geometry
# matrix (every pair of axis values; needs root). VOLAGENT_DIFF_SEED=n
# reproduces a logged run.
echo "fuzz: qcow2 writer differential matrix (long)"
VOLAGENT_DIFF_LONG=1 go test -count=1 -timeout 60m -run '^TestWriterDifferentialMatrix$' ./qcow2/
