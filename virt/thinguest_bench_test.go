package virt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testguest"
	"github.com/volagent/volagent/internal/testutil"
)

// guestGrowthBytes is what the guest of BenchmarkGuestGrowth writes: at
// the pools' defaults (1 GiB initial size and chunk, thresholds half a
// chunk below the end) it crosses thresholds at 0.5, 1.5 and 2.5 GiB:
// three growths at least.
const guestGrowthBytes = 2560<<20 + 64<<20

// BenchmarkGuestGrowth runs the virtio writer guest under KVM, writing
// guestGrowthBytes sequentially as fast as the host takes it (16 requests
// of 1 MiB in flight on its virtio-blk disk), on a thin overlay in a loop
// pool and in an LVM pool (loop activation, a volume group on a loop
// device), both at the pools' default initial_size and chunk_size, under
// a ThinController with block thresholds. It reports the guest's write
// rate (bytes over the time from the guest's WRITING to its DONE on its
// serial port), the pauses on ENOSPC (goal: none), the growths and the
// final device size, and checks what the guest wrote reads back.
// scripts/bench.sh runs it (bench_guest_growth) with
// VOLAGENT_BENCH_RESULT naming the file the figures go to, one line a
// pool: NAME MiB/s PAUSES ENOSPC-EVENTS GROWTHS THRESHOLD-EVENTS DEVICE-MiB.
func BenchmarkGuestGrowth(b *testing.B) {
	testutil.RequireRoot(b)
	testutil.RequireTool(b, "qemu-img", "lvm")
	dir := looptest.Dir(b, "volagent-guestgrowth-")
	testutil.StartLibvirtd(b, testutil.LibvirtdOptions{})
	images := filepath.Join(dir, "images")
	if err := os.Mkdir(images, 0o755); err != nil {
		b.Fatal(err)
	}
	base := filepath.Join(images, "base.raw")
	testutil.QemuImg(b, "create", "-q", "-f", "raw", base, fmt.Sprint(2*guestGrowthBytes))
	writer := testguest.Writer{Sectors: guestGrowthBytes / testguest.SectorSize, DoneLBA: (guestGrowthBytes + 1<<20) / testguest.SectorSize, Virtio: true}
	bootDisk := writer.BootDisk(b, b.TempDir())

	// Room for the device to grow by several chunks past what is written.
	lvm, vg := benchVG(b, dir, 4*guestGrowthBytes)
	cfg, err := backend.ParseConfig([]byte(fmt.Sprintf(`[[pool]]
name = "loop"
type = "loop"
directory = %q
backing_roots = [%q]

[[pool]]
name = "lvm"
type = "lvm"
volume_group = %q
activation = "loop"
backing_roots = [%q]
`, filepath.Join(dir, "pool"), images, vg, images)), "bench")
	if err != nil {
		b.Fatal(err)
	}
	mgr, err := backend.NewManager(cfg, backend.ManagerOptions{Logger: testLogger(b), LVM: lvm})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = mgr.Close() })
	if err := mgr.Load(context.Background()); err != nil {
		b.Fatal(err)
	}

	var result strings.Builder
	for range b.N { // -benchtime 1x: once
		result.Reset()
		for _, pool := range []string{"loop", "lvm"} {
			settings, err := mgr.PoolSettings(pool)
			if err != nil {
				b.Fatal(err)
			}
			if settings.InitialSize != backend.DefaultInitialSize || settings.ChunkSize != backend.DefaultChunkSize {
				b.Fatalf("pool %s: initial size %d, chunk %d: want the defaults", pool, settings.InitialSize, settings.ChunkSize)
			}
			run := runThinGuest(b, mgr, guestRun{pool: pool, name: fmt.Sprintf("growth-%s-%d", pool, os.Getpid()), base: base, bootDisk: bootDisk, writer: writer, thresholds: true, cache: "unsafe"})
			mibs := run.rate() / (1 << 20)
			b.Logf("%s pool: guest wrote %d MiB in %v (%.0f MiB/s): %d pauses, %d enospc events, %d growths, %d threshold events, device %d MiB",
				pool, run.written>>20, run.writing, mibs, run.ioErrorPauses, run.enospc, run.growths(), run.thresholds, run.deviceSize>>20)
			b.ReportMetric(mibs, "MiB/s-"+pool)
			b.ReportMetric(float64(run.ioErrorPauses), "pauses-"+pool)
			b.ReportMetric(float64(run.growths()), "growths-"+pool)
			fmt.Fprintf(&result, "%s %.1f %d %d %d %d %d\n", pool, mibs, run.ioErrorPauses, run.enospc, run.growths(), run.thresholds, run.deviceSize>>20)
		}
	}
	if out := os.Getenv("VOLAGENT_BENCH_RESULT"); out != "" {
		if err := os.WriteFile(out, []byte(result.String()), 0o600); err != nil {
			b.Fatal(err)
		}
	}
}

// benchVG makes a volume group on a loop device over a sparse file of
// size bytes in dir, with 4 MiB extents, and an LVM that sees only it;
// at cleanup the loop devices of its LVs are detached and the VG, the PV
// label and the PV's loop device removed.
func benchVG(t testing.TB, dir string, size int64) (*hostblk.LVM, string) {
	t.Helper()
	file := filepath.Join(dir, "pv.img")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, size); err != nil {
		t.Fatal(err)
	}
	pv, err := hostblk.AttachLoop(file, hostblk.LoopOptions{SectorSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	lvm := &hostblk.LVM{NoDeviceMapper: true, Devices: []string{pv.Path}}
	vg := fmt.Sprintf("vbg%d", os.Getpid())
	t.Cleanup(func() {
		if uppers, err := hostblk.FindLoops(pv.Path); err == nil {
			for _, u := range uppers {
				if err := hostblk.DetachLoop(u.Path); err != nil {
					t.Errorf("cleanup: %v", err)
				}
			}
		}
		if _, err := lvm.Run(context.Background(), "vgremove", "-ff", "-y", vg); err != nil && !errors.Is(err, hostblk.ErrVGNotFound) {
			t.Errorf("cleanup: %v", err)
		}
		_, _ = lvm.Run(context.Background(), "pvremove", "-ff", "-y", pv.Path)
		looptest.DetachUnder(t, dir) // the PV's loop, by its backing file
	})
	if _, err := lvm.Run(context.Background(), "pvcreate", "-y", pv.Path); err != nil {
		t.Fatalf("pvcreate: %v", err)
	}
	if _, err := lvm.Run(context.Background(), "vgcreate", "-y", "-s", "4m", vg, pv.Path); err != nil {
		t.Fatalf("vgcreate: %v", err)
	}
	return lvm, vg
}
