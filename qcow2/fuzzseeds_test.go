//go:build fuzzseeds

package qcow2_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/volagent/volagent/internal/hostile"
)

// TestWriteFuzzSeeds regenerates the FuzzReadHeader seed corpus from the
// hostile suite: `make fuzz-seeds`. The seeds are the first
// 4 KiB of each case: enough for every header rule.
func TestWriteFuzzSeeds(t *testing.T) {
	bases := hostile.MakeBases(t, t.TempDir())
	dir := filepath.Join("testdata", "fuzz", "FuzzReadHeader")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Small valid images, whole, so the fuzzer also starts from acceptance.
	valid := map[string][]string{
		"valid-512":         {"-o", "cluster_size=512", "-b", bases.BaseRaw, "-F", "raw"},
		"valid-4k-v2":       {"-o", "cluster_size=4096,compat=0.10", "-b", bases.BaseRaw, "-F", "raw"},
		"valid-16k-extl2":   {"-o", "cluster_size=16384,extended_l2=on"},
		"valid-4k-zstd-r64": {"-o", "cluster_size=4096,compression_type=zstd,refcount_bits=64"},
	}
	for name, opts := range valid {
		p := filepath.Join(bases.Dir, name)
		args := append(append([]string{"create", "-q", "-f", "qcow2"}, opts...), p, "1M")
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %q: %v\n%s", args, err, out)
		}
		writeSeed(t, dir, name, p, 1<<20)
	}
	for _, c := range hostile.Write(t, bases) {
		writeSeed(t, dir, c.Name, c.Path, 4096)
	}
	// Many extensions, violations and snapshots: the parser's caps.
	costly := filepath.Join(bases.Dir, "costly")
	if err := os.WriteFile(costly, hostile.CostlyImage(12, 200), 0o644); err != nil {
		t.Fatal(err)
	}
	writeSeed(t, dir, "costly-4k", costly, 1<<20)
}

// writeSeed writes the first limit bytes of the file at path as a seed.
func writeSeed(t *testing.T, dir, name, path string, limit int) {
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	img = img[:min(len(img), limit)]
	body := "go test fuzz v1\n[]byte(" + strconv.Quote(string(img)) + ")\n"
	if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}
