package hostblk

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// newTestPool opens a pool in a fresh directory; every loop device over a
// pool file is detached when the test ends.
func newTestPool(t *testing.T) *LoopPool {
	t.Helper()
	testRoot(t)
	dir := filepath.Join(testDir(t), "pool")
	p, err := OpenLoopPool(dir, LoopOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		matches, _ := filepath.Glob(filepath.Join(dir, "*"))
		for _, m := range matches {
			detachAllOver(t, m)
		}
	})
	return p
}

func TestLoopPoolLifecycle(t *testing.T) {
	p := newTestPool(t)
	meta := VolumeMeta{Role: "overlay", BackingName: "/images/base.qcow2", BackingFormat: "qcow2"}

	vol, err := p.Create("vm1-disk0", 8<<20, meta)
	if err != nil {
		t.Fatal(err)
	}
	if vol.Name != "vm1-disk0" || vol.File != filepath.Join(p.Dir(), "vm1-disk0.img") || vol.Size != 8<<20 || vol.Meta != meta || vol.Device == "" {
		t.Errorf("Create = %+v", vol)
	}
	loop, err := loopByPath(vol.Device)
	if err != nil {
		t.Fatal(err)
	}
	if !loop.DirectIO || loop.SectorSize != DefaultLoopSectorSize || loop.BackingFile != vol.File {
		t.Errorf("pool loop device %+v: want direct I/O, 4096-byte sectors, backing %s", loop, vol.File)
	}
	if _, err := p.Create("vm1-disk0", 8<<20, meta); !errors.Is(err, ErrVolumeExists) {
		t.Errorf("Create(duplicate) = %v, want ErrVolumeExists", err)
	}
	for _, bad := range []struct {
		name string
		size int64
	}{{"../escape", 4096}, {".hidden", 4096}, {"", 4096}, {"ok", 0}, {"ok", 1000}} {
		if _, err := p.Create(bad.name, bad.size, meta); err == nil {
			t.Errorf("Create(%q, %d) succeeded", bad.name, bad.size)
		}
	}
	if _, err := p.Create("vm2-disk0", 4<<20, VolumeMeta{Role: "scratch"}); err != nil {
		t.Fatal(err)
	}

	vols, err := p.Volumes()
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 2 || vols[0] != vol || vols[1].Name != "vm2-disk0" || vols[1].Meta.Role != "scratch" {
		t.Errorf("Volumes = %+v", vols)
	}

	grown, err := p.Grow("vm1-disk0", 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	if grown.Size != 16<<20 || grown.Device != vol.Device {
		t.Errorf("Grow = %+v", grown)
	}
	if info, err := Inspect(vol.Device); err != nil || info.Size != 16<<20 {
		t.Errorf("device size after Grow = %d, %v", info.Size, err)
	}
	if _, err := p.Grow("vm1-disk0", 8<<20); err == nil {
		t.Error("shrinking Grow succeeded")
	}
	if _, err := p.Grow("nope", 8<<20); !errors.Is(err, ErrVolumeNotFound) {
		t.Errorf("Grow(missing) = %v, want ErrVolumeNotFound", err)
	}

	// Metadata too large for an xattr is refused with a clear error; a
	// long but storable backing name survives.
	tooLong := VolumeMeta{BackingName: strings.Repeat("x", 4000)}
	if err := p.SetMeta("vm1-disk0", tooLong); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Errorf("SetMeta(4000-byte name) = %v, want a size error", err)
	}
	if _, err := p.Create("big-meta", 4096, tooLong); err == nil {
		t.Error("Create with too large metadata succeeded")
	}
	newMeta := VolumeMeta{Role: "overlay", BackingName: "/images/" + strings.Repeat("x", 2500) + ".qcow2", BackingFormat: "raw"}
	if err := p.SetMeta("vm1-disk0", newMeta); err != nil {
		t.Fatal(err)
	}
	if got, err := p.Volume("vm1-disk0"); err != nil || got.Meta != newMeta {
		t.Errorf("Volume after SetMeta = %+v, %v", got, err)
	}

	if err := p.Remove("vm1-disk0"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(vol.File); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("backing file after Remove: %v", err)
	}
	// Another test may attach the freed device to a file of its own.
	if l, err := loopByPath(vol.Device); err == nil && l.BackingFile == vol.File {
		t.Errorf("%s still attached to %s after Remove", vol.Device, vol.File)
	}
	if err := p.Remove("vm1-disk0"); !errors.Is(err, ErrVolumeNotFound) {
		t.Errorf("second Remove = %v, want ErrVolumeNotFound", err)
	}
	if _, err := p.Volume("vm1-disk0"); !errors.Is(err, ErrVolumeNotFound) {
		t.Errorf("Volume(removed) = %v, want ErrVolumeNotFound", err)
	}
}

// TestLoopPoolAttachAllAfterRestart simulates a reboot (loop devices gone)
// and a crash in the middle of Create (a temporary file left behind).
func TestLoopPoolAttachAllAfterRestart(t *testing.T) {
	p := newTestPool(t)
	metas := map[string]VolumeMeta{
		"a": {Role: "overlay", BackingName: "/img/a b.qcow2", BackingFormat: "qcow2"},
		"b": {Role: "overlay", BackingName: "/img/b.qcow2", BackingFormat: "qcow2"},
		"c": {Role: "scratch"},
	}
	for name, meta := range metas {
		if _, err := p.Create(name, 4<<20, meta); err != nil {
			t.Fatal(err)
		}
	}
	// "a" keeps its loop device (daemon restart without reboot); "b" and
	// "c" lose theirs (reboot).
	kept, err := p.Volume("a")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"b", "c"} {
		vol, err := p.Volume(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := DetachLoop(vol.Device); err != nil {
			t.Fatal(err)
		}
	}
	stale := filepath.Join(p.Dir(), ".d.123.tmp")
	if err := os.WriteFile(stale, nil, 0o600); err != nil {
		t.Fatal(err)
	}

	restarted, err := OpenLoopPool(p.Dir(), LoopOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var readyMu sync.Mutex
	readied := map[string]PoolVolume{}
	vols, err := restarted.AttachAll(func(v PoolVolume) {
		readyMu.Lock()
		defer readyMu.Unlock()
		if _, twice := readied[v.Name]; twice {
			t.Errorf("ready called twice for %s", v.Name)
		}
		readied[v.Name] = v
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 3 {
		t.Fatalf("AttachAll = %+v, want 3 volumes", vols)
	}
	// ready saw each volume, kept or newly attached, with its device.
	for _, vol := range vols {
		if readied[vol.Name] != vol {
			t.Errorf("ready got %+v for %s, want %+v", readied[vol.Name], vol.Name, vol)
		}
	}
	if len(readied) != len(vols) {
		t.Errorf("ready called for %d volumes, want %d", len(readied), len(vols))
	}
	for _, vol := range vols {
		if vol.Meta != metas[vol.Name] || vol.Device == "" || vol.Size != 4<<20 {
			t.Errorf("volume after AttachAll: %+v, want meta %+v and a device", vol, metas[vol.Name])
		}
		if found, err := FindLoops(vol.File); err != nil || len(found) != 1 || found[0].Path != vol.Device || !found[0].DirectIO {
			t.Errorf("loops over %s: %+v, %v; want exactly %s with direct I/O", vol.File, found, err, vol.Device)
		}
	}
	if vols[0].Name != "a" || vols[0].Device != kept.Device {
		t.Errorf("volume a: device %s, want the kept %s", vols[0].Device, kept.Device)
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale temporary file survived AttachAll: %v", err)
	}
	// AttachAll is idempotent.
	again, err := restarted.AttachAll(nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range again {
		if again[i] != vols[i] {
			t.Errorf("second AttachAll: %+v, want %+v", again[i], vols[i])
		}
	}
}

func TestLoopPoolReportsBrokenVolume(t *testing.T) {
	p := newTestPool(t)
	if _, err := p.Create("good", 4<<20, VolumeMeta{Role: "overlay"}); err != nil {
		t.Fatal(err)
	}
	// A file without volagent's metadata is not silently adopted.
	if err := os.WriteFile(filepath.Join(p.Dir(), "foreign.img"), make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	vols, err := p.AttachAll(nil)
	if err == nil {
		t.Error("AttachAll accepted a file without metadata")
	}
	if len(vols) != 1 || vols[0].Name != "good" || vols[0].Device == "" {
		t.Errorf("AttachAll = %+v, want the good volume attached despite the bad one", vols)
	}
}

// qemu runs as its own user and must reach a pool volume's file when an
// overlay names it as backing: the pool directory is searchable by others
// but not listable, also under a restrictive umask and when an older
// version left it 0700.
func TestLoopPoolDirTraversable(t *testing.T) {
	testRoot(t)
	dir := filepath.Join(testDir(t), "pool")
	old := unix.Umask(0o077)
	_, err := OpenLoopPool(dir, LoopOptions{})
	unix.Umask(old)
	if err != nil {
		t.Fatal(err)
	}
	assertMode := func(when string) {
		t.Helper()
		st, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.Mode().Perm(); got != 0o711 {
			t.Errorf("%s: pool directory mode %#o, want 0711", when, got)
		}
	}
	assertMode("created under umask 0077")
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenLoopPool(dir, LoopOptions{}); err != nil {
		t.Fatal(err)
	}
	assertMode("reopened after an older version left it 0700")
}
