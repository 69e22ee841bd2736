package virt

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/internal/testutil"
)

// fakeVolumes records what the watcher asks of the backend.
type fakeVolumes struct {
	mu         sync.Mutex
	roots      []string
	volumes    map[string]backend.VolumeInfo // by ID
	creates    int
	deletes    int
	deleteErr  error
	violations []string // code: subject
}

func (f *fakeVolumes) PoolSettings(name string) (backend.PoolConfig, error) {
	return backend.PoolConfig{Name: name, Type: backend.PoolLoop, BackingRoots: f.roots, InitialSize: 4 << 20, ChunkSize: 4 << 20}, nil
}

func (f *fakeVolumes) Volume(id string) (backend.VolumeInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.volumes[id]
	if !ok {
		return v, fmt.Errorf("%w: volume %q", backend.ErrNotFound, id)
	}
	return v, nil
}

func (f *fakeVolumes) VolumeByDevice(path string) (backend.VolumeInfo, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, v := range f.volumes {
		if v.DevicePath == path {
			return v, true
		}
	}
	return backend.VolumeInfo{}, false
}

func (f *fakeVolumes) CreateOverlay(_ context.Context, _ backend.Caller, req backend.OverlayRequest) (backend.VolumeInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.creates++
	id := backend.VolumeID(req.Pool, req.Name)
	if _, taken := f.volumes[id]; taken {
		return backend.VolumeInfo{}, fmt.Errorf("%w: pool %q already has a volume named %q", backend.ErrInvalidArgument, req.Pool, req.Name)
	}
	v := backend.VolumeInfo{ID: id, Name: req.Name, Pool: req.Pool, Format: "qcow2", Origin: req.Origin,
		DevicePath: "/dev/fake-" + req.Name, BackingName: req.BackingPath, BackingFormat: req.BackingFormat, VirtualSize: req.VirtualSize}
	f.volumes[v.ID] = v
	return v, nil
}

func (f *fakeVolumes) Delete(_ context.Context, _ backend.Caller, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.deletes++
	if f.deleteErr != nil {
		return f.deleteErr
	}
	delete(f.volumes, id)
	return nil
}

func (f *fakeVolumes) GrowVolume(context.Context, backend.Caller, string, int64) (backend.VolumeInfo, error) {
	return backend.VolumeInfo{}, fmt.Errorf("%w: not in this fake", backend.ErrFailed)
}

func (f *fakeVolumes) SignalPolicyViolation(subject, code, message string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.violations = append(f.violations, code+": "+subject)
}

func (f *fakeVolumes) counts() (creates, deletes int, violations []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.creates, f.deletes, append([]string(nil), f.violations...)
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitFreshScan asks for a rescan and waits until a scan that began after
// this call has completed: whatever it was to do about the state before
// the call, it has done.
func waitFreshScan(t *testing.T, w *RequestWatcher) {
	t.Helper()
	// Scans running now may have begun before the call and complete up to
	// one pass over the pools; the kicked pass after them began after.
	n := uint64(len(w.opts.Pools))
	start := w.scans.Load()
	w.trigger("")
	eventually(t, "a complete rescan of the request pools", func() bool { return w.scans.Load() >= start+2*n })
}

func linkTarget(path string) string {
	target, _ := os.Readlink(path)
	return target
}

// TestRequestWatcher: requests already in the directory at start (one
// whose overlay exists already), stale links, a vol-create while
// watching, rescans that must not repeat work, and a vol-delete the
// backend refuses.
func TestRequestWatcher(t *testing.T) {
	testutil.StartLibvirtd(t, testutil.LibvirtdOptions{})
	dir := t.TempDir()
	roots, base := filepath.Join(dir, "images"), filepath.Join(dir, "images", "base.raw")
	if err := os.Mkdir(roots, 0o755); err != nil {
		t.Fatal(err)
	}
	testutil.QemuImg(t, "create", "-q", "-f", "raw", base, "16M")
	pool := testutil.TestDomainPrefix + "watch"
	t.Cleanup(func() {
		_, _, _ = testutil.Virsh("pool-destroy", pool)
		_, _, _ = testutil.Virsh("pool-undefine", pool)
	})
	fake := &fakeVolumes{roots: []string{roots}, volumes: map[string]backend.VolumeInfo{}}
	w := NewRequestWatcher(fake, RequestWatcherOptions{Pools: []string{pool}, BaseDir: filepath.Join(dir, "requests"), ReconcileInterval: time.Second, Logger: testLogger(t)})
	reqDir := w.Dir(pool)
	if err := os.MkdirAll(reqDir, 0o700); err != nil {
		t.Fatal(err)
	}

	// Made from this request before a crash that came before the link
	// (the request carries the claim the volume records): only linked.
	pre := backend.VolumeInfo{ID: backend.VolumeID(pool, "pre"), Name: "pre", Pool: pool, Format: "qcow2", DevicePath: "/dev/fake-pre", BackingName: base, BackingFormat: "raw",
		Origin: "request:0123456789abcdef0123456789abcdef"}
	fake.volumes[pre.ID] = pre
	testutil.MakeQcow2(t, filepath.Join(reqDir, "pre.qcow2"), "", "32M", base, "raw")
	if err := unix.Setxattr(filepath.Join(reqDir, "pre.qcow2"), claimXattr, []byte(pre.Origin), 0); err != nil {
		t.Fatal(err)
	}
	// A link to a device the volume no longer has (loop devices are
	// renumbered at boot): re-pointed.
	moved := backend.VolumeInfo{ID: backend.VolumeID(pool, "moved"), Name: "moved", Pool: pool, Format: "qcow2", DevicePath: "/dev/fake-moved-now"}
	fake.volumes[moved.ID] = moved
	if err := os.Symlink("/dev/fake-moved-before", filepath.Join(reqDir, "moved.qcow2")); err != nil {
		t.Fatal(err)
	}

	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if got := linkTarget(filepath.Join(reqDir, "pre.qcow2")); got != pre.DevicePath {
		t.Fatalf("pre.qcow2 -> %q, want %q", got, pre.DevicePath)
	}
	if got := linkTarget(filepath.Join(reqDir, "moved.qcow2")); got != moved.DevicePath {
		t.Fatalf("moved.qcow2 -> %q, want %q", got, moved.DevicePath)
	}
	if creates, _, _ := fake.counts(); creates != 0 {
		t.Fatalf("%d overlays created for a request whose overlay exists", creates)
	}

	c, err := Dial(Options{URI: testutil.LibvirtURI, Logger: testLogger(t)}, w.Handlers(Handlers{}))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	w.Bind(c)
	eventually(t, "the request pool in libvirt", func() bool {
		out, _, err := testutil.Virsh("pool-info", pool)
		return err == nil && len(out) > 0
	})

	xml := filepath.Join(dir, "vm1.xml")
	if err := os.WriteFile(xml, []byte(fmt.Sprintf("<volume><name>vm1.qcow2</name><capacity unit='MiB'>32</capacity><target><format type='qcow2'/></target><backingStore><path>%s</path><format type='raw'/></backingStore></volume>", base)), 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.MustVirsh(t, "vol-create", pool, xml)
	vm1 := filepath.Join(reqDir, "vm1.qcow2")
	eventually(t, "vm1.qcow2 linked", func() bool { return linkTarget(vm1) == "/dev/fake-vm1" })
	// Pool refreshes and periodic scans repeat nothing.
	testutil.MustVirsh(t, "pool-refresh", pool)
	waitFreshScan(t, w)
	if creates, _, _ := fake.counts(); creates != 1 {
		t.Fatalf("%d overlays created for one request", creates)
	}

	// The backend refuses the deletion: the link comes back.
	fake.mu.Lock()
	fake.deleteErr = fmt.Errorf("%w: it backs another volume", backend.ErrBusy)
	fake.mu.Unlock()
	if err := os.Remove(vm1); err != nil { // what vol-delete does in a dir pool
		t.Fatal(err)
	}
	eventually(t, "the refused deletion", func() bool {
		_, deletes, violations := fake.counts()
		return deletes == 1 && len(violations) == 1 && violations[0] == "delete-refused: volume "+pool+"/vm1"
	})
	eventually(t, "vm1.qcow2 linked again", func() bool { return linkTarget(vm1) == "/dev/fake-vm1" })

	// Accepted: the volume goes and the link stays gone.
	fake.mu.Lock()
	fake.deleteErr = nil
	fake.mu.Unlock()
	if err := os.Remove(vm1); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the deletion", func() bool { _, err := fake.Volume(backend.VolumeID(pool, "vm1")); return err != nil })
	waitFreshScan(t, w)
	if _, err := os.Lstat(vm1); err == nil {
		t.Fatal("the link of a deleted volume came back")
	}
}

func TestThinThresholdFor(t *testing.T) {
	for _, c := range []struct{ size, chunk, want int64 }{
		{64 << 20, 64 << 20, 32 << 20},
		{128 << 20, 64 << 20, 96 << 20},
		{8 << 20, 64 << 20, 4 << 20},
	} {
		if got := ThresholdFor(c.size, c.chunk); got != c.want {
			t.Errorf("ThresholdFor(%d, %d) = %d, want %d", c.size, c.chunk, got, c.want)
		}
	}
}
