//go:build fuzzseeds

package qcow2_test

import (
	"os"
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
	for _, c := range hostile.Write(t, bases) {
		img, err := os.ReadFile(c.Path)
		if err != nil {
			t.Fatal(err)
		}
		img = img[:min(len(img), 4096)]
		body := "go test fuzz v1\n[]byte(" + strconv.Quote(string(img)) + ")\n"
		if err := os.WriteFile(filepath.Join(dir, c.Name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
