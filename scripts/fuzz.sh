#!/usr/bin/env bash
# Runs every Fuzz* target of every package for the given time each; with
# "matrix" as second argument (make fuzz), then the writer's long
# differential test too (make test runs a sample of it with the unit tests).
set -euo pipefail
fuzztime=${1:-10s}
matrix=${2:-}
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
[ "$matrix" = matrix ] || exit 0
echo "fuzz: qcow2 writer differential matrix (long)"
VOLAGENT_DIFF_LONG=1 go test -count=1 -timeout 60m -run '^TestWriterDifferentialMatrix$' ./qcow2/
