package virt

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"libvirt.org/go/libvirt"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testguest"
	"github.com/volagent/volagent/internal/testutil"
)

// thinGuest writes 200 MiB over its thin overlay (a 64 MiB device growing
// by 64 MiB chunks), then the done marker 1 MiB further.
var thinGuest = testguest.Writer{Sectors: 200 << 20 / testguest.SectorSize, DoneLBA: 201 << 20 / testguest.SectorSize, PerCall: 127}

// TestThinENOSPC runs a guest's own writes (a boot sector writing through
// int 13h, whose requests obey the disk's error policy) on a thin overlay
// of a real Manager: with thresholds off, every growth must come from a
// pause on ENOSPC, grow and resume, and no write may be lost; with
// thresholds on, the volume grows ahead of the guest, which never pauses.
func TestThinENOSPC(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "qemu-img")
	dir := looptest.Dir(t, "volagent-libvirt-")
	testutil.StartLibvirtd(t, testutil.LibvirtdOptions{})
	images := filepath.Join(dir, "images")
	if err := os.Mkdir(images, 0o755); err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(images, "base.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", base, "256M")
	bootDisk := thinGuest.BootDisk(t, t.TempDir())

	cfg, err := backend.ParseConfig([]byte(fmt.Sprintf(`[[pool]]
name = "thin"
type = "loop"
directory = %q
backing_roots = [%q]
initial_size = "64M"
chunk_size = "64M"
`, filepath.Join(dir, "pool"), images)), "test")
	if err != nil {
		t.Fatal(err)
	}
	mgr, err := backend.NewManager(cfg, backend.ManagerOptions{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mgr.Close() })
	if err := mgr.Load(context.Background()); err != nil {
		t.Fatal(err)
	}

	t.Run("thresholds off: pause on ENOSPC, grow, resume", func(t *testing.T) {
		run := runThinGuest(t, mgr, guestRun{pool: "thin", name: "enospc", base: base, bootDisk: bootDisk, writer: thinGuest})
		if run.enospc == 0 || run.ioErrorPauses == 0 {
			t.Fatalf("no pause on ENOSPC (%d enospc events, %d I/O error pauses): the test did not reach the path it tests", run.enospc, run.ioErrorPauses)
		}
		if run.resumedAfterGrowth < run.ioErrorPauses {
			t.Fatalf("%d pauses on I/O errors, but only %d resumes after a growth", run.ioErrorPauses, run.resumedAfterGrowth)
		}
		if run.thresholds != 0 {
			t.Fatalf("%d block threshold events with thresholds off", run.thresholds)
		}
		t.Logf("%d enospc events, %d pauses, %d resumes after growth; device %d MiB", run.enospc, run.ioErrorPauses, run.resumedAfterGrowth, run.deviceSize>>20)
	})

	t.Run("thresholds on: no pause needed", func(t *testing.T) {
		run := runThinGuest(t, mgr, guestRun{pool: "thin", name: "ahead", base: base, bootDisk: bootDisk, writer: thinGuest, thresholds: true})
		if run.enospc != 0 || run.ioErrorPauses != 0 {
			t.Fatalf("the guest paused with thresholds on: %d enospc events, %d I/O error pauses", run.enospc, run.ioErrorPauses)
		}
		if run.thresholds == 0 {
			t.Fatal("the volume grew without a block threshold event")
		}
		t.Logf("%d block threshold events; device %d MiB; HighestAllocated moved %d times", run.thresholds, run.deviceSize>>20, run.allocationSteps)
	})
}

// guestRun is what runThinGuest runs: the writer guest, booted from
// bootDisk, on a new overlay name of base in pool, under a ThinController
// with block thresholds on or off.
type guestRun struct {
	pool, name     string
	base, bootDisk string // bootDisk is writer's (writer.BootDisk)
	writer         testguest.Writer
	thresholds     bool
	// cache is the overlay disk's libvirt cache mode ("" for libvirt's
	// default). SeaBIOS negotiates no flush feature, so qemu makes the
	// disk write-through, a flush after every request; "unsafe" drops
	// them, for a guest that writes at the host's streaming speed.
	cache string
}

// cacheAttr is the driver attribute for cache mode c ("" for none).
func cacheAttr(c string) string {
	if c == "" {
		return ""
	}
	return fmt.Sprintf(" cache='%s'", c)
}

// thinRun is what happened while the guest wrote.
type thinRun struct {
	enospc             int // IO_ERROR_REASON events with reason "enospc"
	ioErrorPauses      int // SUSPENDED (I/O error) lifecycle events
	resumedAfterGrowth int // resumes by the controller after a growth
	thresholds         int // BLOCK_THRESHOLD events
	thresholdGrowths   int // growths at a block threshold
	deviceSize         int64
	allocationSteps    int           // changes of HighestAllocated seen while the guest ran
	writing            time.Duration // from the domain's start (or the guest's WRITING) to its DONE
	written            int64         // bytes the guest wrote (data and done marker)
}

// growths is how many times the controller grew the volume.
func (r thinRun) growths() int { return r.thresholdGrowths + r.resumedAfterGrowth }

// rate is the guest's write rate in bytes per second.
func (r thinRun) rate() float64 { return float64(r.written) / r.writing.Seconds() }

// runThinGuest makes an overlay of base in mgr's pool, runs the writer
// guest on it under a ThinController, waits for the guest to finish, and
// checks that the domain runs, the device grew past what was written and
// every sector the guest wrote reads back.
func runThinGuest(t testing.TB, mgr *backend.Manager, g guestRun) thinRun {
	settings, err := mgr.PoolSettings(g.pool)
	if err != nil {
		t.Fatal(err)
	}
	vol, err := mgr.CreateOverlay(context.Background(), backend.Caller{UID: 0}, backend.OverlayRequest{Pool: g.pool, Name: g.name, BackingPath: g.base, BackingFormat: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	if size := deviceSize(vol); size != settings.InitialSize {
		t.Fatalf("new overlay's device is %d bytes, want the pool's initial %d", size, settings.InitialSize)
	}

	var mu sync.Mutex
	var run thinRun
	counted := func(f func()) { mu.Lock(); f(); mu.Unlock() }
	log := slog.New(&logCounter{Handler: testLogger(t).Handler(), count: func(msg string) {
		switch msg {
		case "domain resumed after its volume grew":
			counted(func() { run.resumedAfterGrowth++ })
		case "volume grown at its block threshold":
			counted(func() { run.thresholdGrowths++ })
		}
	}})
	thin := NewThinController(mgr, log)
	if !g.thresholds {
		thin.DisableThresholds()
	}
	thin.SetAllocationInterval(500 * time.Millisecond)
	t.Cleanup(thin.Close)
	// HighestAllocated must follow the guest's writes while it runs.
	events, unsubscribe := mgr.Subscribe()
	defer unsubscribe()
	allocations := make(chan []int64, 1)
	go func() {
		var seen []int64
		for ev := range events {
			if ev.Kind == backend.EventVolumeChanged && ev.Volume != nil && ev.Volume.ID == vol.ID &&
				(len(seen) == 0 || ev.Volume.HighestAllocated != seen[len(seen)-1]) {
				seen = append(seen, ev.Volume.HighestAllocated)
			}
		}
		allocations <- seen
	}()
	domain := testutil.TestDomainPrefix + "thin-" + g.name
	var started time.Time // the domain's STARTED event
	c, err := Dial(Options{URI: testutil.LibvirtURI, Logger: log}, thin.Handlers(Handlers{
		DomainLifecycle: func(d string, event libvirt.DomainEventType, detail int) {
			if d == domain && event == libvirt.DOMAIN_EVENT_STARTED {
				counted(func() { started = time.Now() })
			}
			if d == domain && event == libvirt.DOMAIN_EVENT_SUSPENDED && libvirt.DomainEventSuspendedDetailType(detail) == libvirt.DOMAIN_EVENT_SUSPENDED_IOERROR {
				counted(func() { run.ioErrorPauses++ })
			}
		},
		BlockThreshold: func(d, _, _ string, _, _ uint64) {
			if d == domain {
				counted(func() { run.thresholds++ })
			}
		},
		IOError: func(d, _, _ string, _ libvirt.DomainEventIOErrorAction, reason string) {
			if d == domain && reason == "enospc" {
				counted(func() { run.enospc++ })
			}
		},
	}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	thin.Bind(c)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}

	// The boot disk first, so SeaBIOS makes it drive 0x80 and the overlay
	// 0x81 (libvirt runs qemu with -boot strict=on: SeaBIOS gives a drive
	// without a boot index no BIOS number at all). virtio-blk, not IDE: SeaBIOS writes IDE by PIO, a sector per
	// request, far too slow for 200 MiB under nested KVM. error_policy
	// 'stop' is qemu's default (werror=enospc) made explicit.
	serial := filepath.Join(t.TempDir(), "serial.log")
	created := time.Now()
	startDomain(t, domain,
		fmt.Sprintf("<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='%s'/><target dev='vda' bus='virtio'/><boot order='1'/></disk>", g.bootDisk),
		fmt.Sprintf("<disk type='block' device='disk'><driver name='qemu' type='qcow2' error_policy='stop'%s/><source dev='%s'/><target dev='vdb' bus='virtio'/><boot order='2'/></disk>", cacheAttr(g.cache), vol.DevicePath),
		fmt.Sprintf("<serial type='file'><source path='%s'/><target port='0'/></serial>", serial))

	// The guest's speed varies with the host's load: it fails when its
	// writes (the allocation the controller reads every 500 ms) stop
	// moving for two minutes, not at a fixed time.
	written := int64(g.writer.DoneLBA+1) * testguest.SectorSize
	const stall = 2 * time.Minute
	var progress int64
	var writingFrom time.Time // the serial file's last write when it said WRITING
	deadline := time.Now().Add(stall)
	for {
		out, _ := os.ReadFile(serial)
		if strings.Contains(string(out), testguest.SerialDone) {
			break
		}
		if writingFrom.IsZero() && strings.Contains(string(out), testguest.SerialStart) {
			if fi, err := os.Stat(serial); err == nil {
				writingFrom = fi.ModTime() // nothing follows WRITING until DONE
			}
		}
		if v, err := mgr.Volume(vol.ID); err == nil && v.HighestAllocated > progress {
			progress, deadline = v.HighestAllocated, time.Now().Add(stall)
		}
		state, _, _ := testutil.Virsh("domstate", "--reason", domain)
		if strings.Contains(string(out), testguest.SerialError) || strings.Contains(string(out), testguest.SerialNoExt) || time.Now().After(deadline) {
			t.Fatalf("the guest did not finish (no progress for %v after %d bytes): serial %q, domain %s, device %d bytes", stall, progress, out, strings.TrimSpace(state), deviceSize(vol))
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The guest's DONE is the serial file's last write.
	fi, err := os.Stat(serial)
	if err != nil {
		t.Fatal(err)
	}
	counted(func() {
		if started.IsZero() {
			started = created // no STARTED event seen: from the create call
		}
		if !writingFrom.IsZero() {
			started = writingFrom // the virtio writer's boot is not its writing
		}
		run.writing, run.written = fi.ModTime().Sub(started), int64(g.writer.Sectors)*testguest.SectorSize
	})
	if state := strings.TrimSpace(testutil.MustVirsh(t, "domstate", domain)); state != "running" {
		t.Fatalf("domain is %q after the guest finished", state)
	}
	run.deviceSize = deviceSize(vol)
	// Past what the guest wrote, but not by much: a threshold grows the
	// device at half a chunk before its end, by one chunk (1 MiB more
	// for the qcow2 metadata).
	chunk := max(settings.ChunkSize, thin.largestChunk(vol.ID)) // larger for a fast guest
	if run.deviceSize < written || run.deviceSize > max(settings.InitialSize, written+chunk+chunk/2+1<<20) {
		t.Fatalf("device is %d bytes after the guest wrote %d: want more, by at most 1.5 chunks of %d", run.deviceSize, written, chunk)
	}

	// The guest's writes reached the volume's HighestAllocated, in steps
	// (threshold events and periodic reads), while the domain ran: the
	// image holds at least the sectors the guest wrote.
	// libvirt's allocation is read at threshold events and every few
	// seconds: the last of the guest's writes shows at the next reading.
	data := int64(g.writer.Sectors) * testguest.SectorSize
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		got, err := mgr.Volume(vol.ID)
		if err == nil && got.HighestAllocated >= data {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume a minute after the guest wrote %d bytes: HighestAllocated %d, %v", data, got.HighestAllocated, err)
		}
	}
	unsubscribe()
	if seen := <-allocations; len(seen) < 2 || seen[len(seen)-1] < data {
		t.Fatalf("HighestAllocated moved through %v while the guest wrote %d bytes: want several steps up to at least that", seen, data)
	} else {
		run.allocationSteps = len(seen)
	}

	// A graceful stop: qemu flushes its qcow2 metadata caches on the way out.
	testutil.MustVirsh(t, "destroy", "--graceful", domain)
	image := filepath.Join(t.TempDir(), "guest.raw")
	testutil.QemuImg(t, "convert", "-f", "qcow2", "-O", "raw", vol.DevicePath, image)
	f, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(image) // as large as what the guest wrote
	defer f.Close()
	if err := g.writer.Verify(f); err != nil {
		t.Fatalf("what the guest wrote does not read back: %v", err)
	}
	if out, err := exec.Command("qemu-img", "check", "-f", "qcow2", vol.DevicePath).CombinedOutput(); err != nil || !strings.Contains(string(out), "No errors") {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
	c.Close()
	mu.Lock()
	defer mu.Unlock()
	return run
}

// logCounter calls count with the message of every record.
type logCounter struct {
	slog.Handler
	count func(msg string)
}

func (h *logCounter) Handle(ctx context.Context, r slog.Record) error {
	h.count(r.Message)
	return h.Handler.Handle(ctx, r)
}

func (h *logCounter) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &logCounter{Handler: h.Handler.WithAttrs(attrs), count: h.count}
}

func (h *logCounter) WithGroup(name string) slog.Handler {
	return &logCounter{Handler: h.Handler.WithGroup(name), count: h.count}
}
