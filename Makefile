# volagent — build, demo, tests, fuzzing and benchmarks.
# Every target that needs system tools runs scripts/install-deps.sh first,
# so a fresh Debian 12 machine needs nothing but `make demo` / `make test`.

export PATH := /usr/local/go/bin:$(PATH)
GO       ?= go
BIN      := bin/volagent
DAEMON   := bin/volagentd
PKGS     := ./...
# Seconds each fuzz target runs in `make test`; `make fuzz` runs longer.
FUZZTIME ?= 10s
FUZZTIME_LONG ?= 10m

# The daemon's packages: make test runs them with the race detector.
RACE_PKGS := ./backend ./dbusapi ./virt

.PHONY: all deps build demo test check unit lint fuzz fuzz-short bench clean fuzz-seeds packages package-test cockpit cockpit-test vm-test vm-test-shared vm-shell

all: build

deps:
	@scripts/install-deps.sh

# volagent is static (no cgo: it starts in a millisecond, and the hook runs
# it at every domain start); volagentd links libvirt.
build: deps
	CGO_ENABLED=0 $(GO) build -o $(BIN) ./cmd/volagent
	CGO_ENABLED=1 $(GO) build -o $(DAEMON) ./cmd/volagentd

# The main job: build, make a demo image with volagent itself, inspect it.
demo: build
	@scripts/demo.sh $(BIN) $(DAEMON)

lint: deps
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod/go.sum are not tidy: run go mod tidy"; $(GO) mod tidy -diff; exit 1; }

# The tests anyone can run: no root, no system tools, with -race, as an
# ordinary user (nobody when run as root). scripts/check-needs-root.txt
# names the tests left to make test.
check:
	@scripts/check.sh

# Every test; the daemon's packages with the race detector.
unit: deps
	$(GO) test -count=1 -timeout 45m $$($(GO) list $(PKGS) | grep -v -x -F $(foreach p,$(RACE_PKGS),-e $$($(GO) list $(p))))
	$(GO) test -race -count=1 -timeout 45m $(RACE_PKGS)

# Each fuzz target runs briefly on top of its seed corpus in testdata/.
fuzz-short: deps
	@scripts/fuzz.sh $(FUZZTIME)

fuzz: deps
	@scripts/fuzz.sh $(FUZZTIME_LONG) matrix

test: lint build check unit fuzz-short package-test cockpit-test vm-test vm-test-shared

bench: build
	@scripts/bench.sh $(BIN) $(DAEMON)

clean:
	rm -rf bin dist cockpit/dist

# Regenerates the header fuzzer's seed corpus from the hostile-image suite.
fuzz-seeds: deps
	$(GO) test -count=1 -tags fuzzseeds -run TestWriteFuzzSeeds ./qcow2/

# The .deb and the .rpm, into dist/.
packages: deps
	@scripts/packages.sh

# Builds, lints and installs the packages, then purges them (needs root).
package-test: deps
	@scripts/test-packages.sh

# The Cockpit page into cockpit/dist: npm ci with the pinned lockfile, esbuild.
cockpit: deps
	cd cockpit && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund && npm run build

# The page in Debian's chromium (headless, playwright-core) against
# cockpit-ws and volagentd on a private bus, as root and as nobody;
# screenshots in dist/cockpit-test (needs root).
cockpit-test: build cockpit
	@scripts/cockpit-test.sh

# The checks of a real host: a Debian 12 guest (built with mmdebstrap and
# cached in /var/cache/volagent-vmtest) boots under qemu, installs the .deb
# and runs scripts/vm/guest-tests.sh (needs root).
vm-test: deps
	@scripts/vm/run.sh test

# Shared pools (issue 13): two such guests share one raw disk, with
# lvmlockd and sanlock, and volagentd on both (needs root).
vm-test-shared: deps
	@scripts/vm/run-shared.sh test

# The same guest with root logged in on this terminal (Ctrl-A X quits).
vm-shell: deps
	@scripts/vm/run.sh shell
