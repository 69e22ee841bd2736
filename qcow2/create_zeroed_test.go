package qcow2_test

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// TestCreateTargetZeroed: with TargetZeroed, Create writes only the blocks
// that hold non-zero bytes, onto a loop device over a new sparse file (the
// loop pools' case), and the result is byte-identical to the full write
// onto a file and clean for qemu-img check.
func TestCreateTargetZeroed(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	rawBase, _ := makeCreateBackings(t, dir, 4*createMiB)
	const devSize = 64 << 20
	for _, sector := range []int{512, 4096} {
		for _, cs := range []int{512, 4096, 64 << 10, 2 << 20} {
			for _, backing := range []string{"", "raw"} {
				t.Run(fmt.Sprintf("sector%d/cluster%d/%s", sector, cs, createBackingLabel(backing)), func(t *testing.T) {
					opts := qcow2.CreateOptions{VirtualSize: 64 * createMiB, ClusterSize: cs, BlockSize: sector}
					if backing != "" {
						opts.BackingFile, opts.BackingFormat = rawBase, backing
					}
					if cs == 64<<10 {
						opts.VirtualSize = 16 * createTiB // L1 spans 4 clusters
					}

					// The reference: every metadata byte written, onto a file.
					refPath := filepath.Join(t.TempDir(), "full.qcow2")
					ref, err := os.OpenFile(refPath, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
					if err != nil {
						t.Fatal(err)
					}
					full, err := qcow2.Create(ref, devSize, opts)
					if cerr := ref.Close(); err == nil {
						err = cerr
					}
					if err != nil {
						t.Fatal(err)
					}
					want, err := os.ReadFile(refPath)
					if err != nil {
						t.Fatal(err)
					}

					dev := looptest.Device(t, devSize, sector)
					f := openCreateTargetDirect(t, dev)
					w := &createAlignedWriter{f: f, align: sector}
					zeroed := opts
					zeroed.TargetZeroed = true
					cw := &countingWriter{createAlignedWriter: w}
					l, err := qcow2.Create(cw, devSize, zeroed)
					if cerr := f.Close(); err == nil {
						err = cerr
					}
					if err != nil {
						t.Fatal(err)
					}
					if *l != *full {
						t.Errorf("layout %+v, want the full write's %+v", *l, *full)
					}
					written := cw.written
					if w.syncs != 1 || written <= 0 || written >= l.WriteSize && l.WriteSize > int64(sector) {
						t.Errorf("%d writes of %d bytes in all, %d syncs; want fewer bytes than the %d of the metadata and one sync",
							w.writes, written, w.syncs, l.WriteSize)
					}
					got := readCreatedPrefix(t, dev, int64(len(want)))
					if !bytes.Equal(got, want) {
						i := 0
						for i < len(got) && got[i] == want[i] {
							i++
						}
						t.Fatalf("the device differs from the full write at byte %d of %d", i, len(want))
					}
					checkCreatedWithQemu(t, dev, opts)
					checkCreatedHeader(t, dev, opts)
					writeAndReadBackCreated(t, dev, opts)
				})
			}
		}
	}
}

// countingWriter counts the bytes passed to the aligned writer.
type countingWriter struct {
	*createAlignedWriter
	written int64
}

func (c *countingWriter) WriteAt(p []byte, off int64) (int, error) {
	n, err := c.createAlignedWriter.WriteAt(p, off)
	c.written += int64(n)
	return n, err
}

func readCreatedPrefix(t *testing.T, path string, n int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := io.ReadFull(f, b); err != nil {
		t.Fatal(err)
	}
	return b
}
