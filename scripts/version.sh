#!/usr/bin/env bash
# Prints volagent's version, read from internal/version/version.go.
set -euo pipefail
cd "$(dirname "$0")/.."
sed -n 's/^const Version = "\(.*\)"$/\1/p' internal/version/version.go
