package qcow2

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/testutil"
)

// resizeFile runs Resize on a qcow2 file opened as volagent opens targets
// (exclusive, direct I/O).
func resizeFile(t *testing.T, image string, newSize int64) error {
	t.Helper()
	tgt, err := hostblk.OpenTarget(image, false)
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Close()
	return Resize(tgt, tgt.Size, WriterOptions{BlockSize: tgt.BlockSize, ContainerSize: tgt.ContainerSize()}, newSize)
}

// TestResizeJudgedByQemu grows images with qemu as the judge: qemu-img
// check finds them clean, qemu-img info shows the new virtual size,
// qemu-img compare finds the old data unchanged and the new area zero, and
// qemu can then write past the old end. The L1 table grows in place when
// its cluster has room, and moves when it needs more clusters.
func TestResizeJudgedByQemu(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	testutil.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", base, "64M")
	testutil.QemuIO(t, "raw", base, "write -P 0x5a 0 64k")
	cases := []struct {
		name          string
		options, size string
		backing       string
		newSize       int64
		l1Moves       bool
	}{
		{name: "l1 unchanged", options: "cluster_size=65536", size: "16M", newSize: 256 << 20},
		{name: "l1 grows in place", options: "cluster_size=65536", size: "16M", newSize: 3 << 30},
		// 512-byte clusters: one L1 cluster maps 64 * 64 * 512 = 2 MiB;
		// 16 KiB extended clusters: 2048 * 1024 * 16 KiB = 32 GiB.
		{name: "l1 moves", options: "cluster_size=512", size: "1M", newSize: 64 << 20, l1Moves: true},
		{name: "l1 moves over a backing file", options: "cluster_size=512", size: "1M", backing: base, newSize: 40<<20 + 512, l1Moves: true},
		{name: "l1 moves, extended l2", options: "cluster_size=16384,extended_l2=on", size: "1M", newSize: 64 << 30, l1Moves: true},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			image := filepath.Join(dir, fmt.Sprintf("img%d.qcow2", i))
			before := filepath.Join(dir, fmt.Sprintf("img%d-before.qcow2", i))
			fmtOpt := ""
			if tc.backing != "" {
				fmtOpt = "raw"
			}
			testutil.MakeQcow2(t, image, tc.options, tc.size, tc.backing, fmtOpt)
			testutil.QemuIO(t, "qcow2", image, "write -P 0xa5 4k 60k", "write -P 0x3c 700k 100k")
			testutil.QemuImg(t, "convert", "-q", "-f", "qcow2", "-O", "qcow2", image, before)
			l1Before := readHeaderFile(t, image)

			if err := resizeFile(t, image, tc.newSize); err != nil {
				t.Fatal(err)
			}

			requireClean(t, image)
			if got := qemuVirtualSize(t, image); got != tc.newSize {
				t.Fatalf("qemu-img info: virtual size %d, want %d", got, tc.newSize)
			}
			h := readHeaderFile(t, image)
			if moved := h.L1TableOffset != l1Before.L1TableOffset; moved != tc.l1Moves {
				t.Errorf("L1 table moved %v (offset %d -> %d), want %v", moved, l1Before.L1TableOffset, h.L1TableOffset, tc.l1Moves)
			}
			if uint64(h.L1Size) < h.requiredL1Entries() {
				t.Errorf("l1_size %d, the size needs %d", h.L1Size, h.requiredL1Entries())
			}
			// Old data as it was, the new area reads as zeros.
			if out, err := exec.Command("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", before, image).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img compare: %v\n%s", err, out)
			}
			// qemu can use the new L1 entries.
			end := tc.newSize - 64<<10
			testutil.QemuIO(t, "qcow2", image, fmt.Sprintf("write -P 0x77 %d 64k", end))
			requireClean(t, image)
			if out := string(testutil.QemuIO(t, "qcow2", image, fmt.Sprintf("read -P 0x77 %d 64k", end), "read -P 0xa5 4k 60k")); strings.Contains(out, "Pattern verification failed") {
				t.Fatal(out)
			}
		})
	}
}

// TestResizeRefusals: shrinking and sizes that are not whole sectors are
// refused, and the image is left as it was.
func TestResizeRefusals(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	image := filepath.Join(t.TempDir(), "img.qcow2")
	testutil.MakeQcow2(t, image, "", "16M", "", "")
	for _, size := range []int64{8 << 20, 0, 16<<20 + 100} {
		if err := resizeFile(t, image, size); err == nil {
			t.Errorf("Resize to %d succeeded", size)
		}
	}
	if got := qemuVirtualSize(t, image); got != 16<<20 {
		t.Fatalf("virtual size %d after refused resizes, want %d", got, 16<<20)
	}
	requireClean(t, image)
}

func qemuVirtualSize(t *testing.T, image string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(testutil.QemuImg(t, "info", "-U", "-f", "qcow2", "--output=json", image), &info); err != nil {
		t.Fatal(err)
	}
	return info.VirtualSize
}

func readHeaderFile(t *testing.T, image string) *Header {
	t.Helper()
	f, err := OpenImageFile(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	h, err := ReadHeader(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	return h
}
