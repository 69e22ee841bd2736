# volagent — build, demo, tests, fuzzing and benchmarks.
# Every target that needs system tools runs scripts/install-deps.sh first,
# so a fresh Debian 12 machine needs nothing but `make demo` / `make test`.

export PATH := /usr/local/go/bin:$(PATH)
GO       ?= go
BIN      := bin/volagent
PKGS     := ./...
# Seconds each fuzz target runs in `make test`; `make fuzz` runs longer.
FUZZTIME ?= 10s
FUZZTIME_LONG ?= 10m

.PHONY: all deps build demo test unit lint fuzz fuzz-short bench clean fuzz-seeds packages package-test vm-test vm-shell

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(GO) build -o $(BIN) ./cmd/volagent

# The main job: build, make a demo image with volagent itself, inspect it.
demo: build
	@scripts/demo.sh $(BIN)

lint: deps
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

unit: deps
	$(GO) test -count=1 -timeout 45m $(PKGS)

# Each fuzz target runs briefly on top of its seed corpus in testdata/.
fuzz-short: deps
	@scripts/fuzz.sh $(FUZZTIME)

fuzz: deps
	@scripts/fuzz.sh $(FUZZTIME_LONG)

test: lint build unit fuzz-short package-test vm-test

bench: build
	@scripts/bench.sh $(BIN)

clean:
	rm -rf bin dist

# Regenerates the header fuzzer's seed corpus from the hostile-image suite.
fuzz-seeds: deps
	$(GO) test -count=1 -tags fuzzseeds -run TestWriteFuzzSeeds ./qcow2/

# The .deb and the .rpm, into dist/.
packages: deps
	@scripts/packages.sh

# Builds, lints and installs the packages, then purges them (needs root).
package-test: deps
	@scripts/test-packages.sh

# The checks of a real host: a Debian 12 guest (built with mmdebstrap and
# cached in /var/cache/volagent-vmtest) boots under qemu, installs the .deb
# and runs scripts/vm/guest-tests.sh (needs root).
vm-test: deps
	@scripts/vm/run.sh test

# The same guest with root logged in on this terminal (Ctrl-A X quits).
vm-shell: deps
	@scripts/vm/run.sh shell
