package backend

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// TestLoadDefersFullCheck: Load reads headers and refcounts only, so a
// volume whose corruption lies in an L2 table is listed without a problem
// (and no check ran before the daemon would be ready); the background
// check then finds it, gives the volume its Problem and tells subscribers.
func TestLoadDefersFullCheck(t *testing.T) {
	e := newEnv(t, PoolLoop, PolicyEnforce)
	ctx := context.Background()
	base := filepath.Join(e.roots, "base.raw")
	writeFile(t, base, 1<<20, nil)
	m1 := e.manager()
	v, err := m1.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "vm", BackingPath: base, BackingFormat: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	if err := m1.Write(ctx, Caller{}, v.ID, 0, pattern(0x5a, 4096)); err != nil {
		t.Fatal(err)
	}
	clean, err := m1.Volume(v.ID)
	if err != nil {
		t.Fatal(err)
	}
	m1.Close()
	corruptFirstL2Entry(t, v.DevicePath)

	m2 := e.manager()
	got, err := m2.Volume(v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Problem != "" || got.HighestAllocated != clean.HighestAllocated {
		t.Fatalf("after Load: %+v; want no problem yet (the L2 tables are not read at Load) and HighestAllocated %d from the refcounts", got, clean.HighestAllocated)
	}
	if n := m2.BackgroundChecksPending(); n != 1 {
		t.Fatalf("BackgroundChecksPending after Load = %d, want 1", n)
	}
	events, cancel := m2.Subscribe()
	defer cancel()
	m2.StartBackgroundChecks()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Kind != EventVolumeChanged || ev.Volume == nil || ev.Volume.ID != v.ID || ev.Volume.Problem == "" {
				continue
			}
			if !strings.Contains(ev.Volume.Problem, "corruption") {
				t.Fatalf("problem %q: want it to name the corruption", ev.Volume.Problem)
			}
			got, err := m2.Volume(v.ID)
			if err != nil || got.Problem != ev.Volume.Problem {
				t.Fatalf("Volume after the check: %+v, %v", got, err)
			}
			if n := m2.BackgroundChecksPending(); n != 0 {
				t.Fatalf("BackgroundChecksPending after the check = %d", n)
			}
			// A Rescan keeps what the check found.
			if err := m2.Rescan(ctx); err != nil {
				t.Fatal(err)
			}
			if got, _ := m2.Volume(v.ID); got.Problem == "" {
				t.Fatalf("Rescan cleared the problem the background check found")
			}
			return
		case <-deadline:
			t.Fatal("the background check did not mark the corrupt volume within 30 s")
		}
	}
}

// corruptFirstL2Entry sets a reserved bit in the L2 entry of guest
// cluster 0, which only a walk of the L2 tables finds.
func corruptFirstL2Entry(t *testing.T, dev string) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := f.Seek(0, 2)
	if err != nil {
		t.Fatal(err)
	}
	h, err := qcow2.ReadHeader(f, size)
	if err != nil {
		t.Fatal(err)
	}
	var b [8]byte
	if _, err := f.ReadAt(b[:], int64(h.L1TableOffset)); err != nil {
		t.Fatal(err)
	}
	l2 := int64(binary.BigEndian.Uint64(b[:]) & 0x00ff_ffff_ffff_fe00)
	if l2 == 0 {
		t.Fatal("guest cluster 0 has no L2 table")
	}
	if _, err := f.ReadAt(b[:], l2); err != nil {
		t.Fatal(err)
	}
	e := binary.BigEndian.Uint64(b[:])
	if e&0x00ff_ffff_ffff_fe00 == 0 {
		t.Fatalf("guest cluster 0 is not allocated (L2 entry %#x)", e)
	}
	binary.BigEndian.PutUint64(b[:], e|0x2) // bit 1: reserved
	if _, err := f.WriteAt(b[:], l2); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// TestBackgroundCheckSkipsImagesInUse: an image a qemu holds (its
// metadata may be mid-change) is not checked, so it cannot be marked
// corrupt from a torn read; once qemu lets go it is checked.
func TestBackgroundCheckSkipsImagesInUse(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "qemu-img", "qemu-storage-daemon")
	dev := looptest.Device(t, 64<<20, 512)
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", dev, "32M")
	h := testutil.HoldImageWithStorageDaemon(t, dev)
	problem, _, inUse := checkDevice(context.Background(), dev)
	if !inUse || problem != "" {
		t.Fatalf("held by %s: inUse %v, problem %q; want skipped", h.Name, inUse, problem)
	}
	h.Stop(t)
	problem, end, inUse := checkDevice(context.Background(), dev)
	if inUse || problem != "" || end <= 0 {
		t.Fatalf("released: inUse %v, problem %q, end %d; want checked and sound", inUse, problem, end)
	}
}
