package backend

import (
	"bytes"
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volagent/volagent/qcow2"
)

// syncBuffer is a log destination the Manager's goroutines share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// count is how many lines hold every one of parts.
func (b *syncBuffer) count(parts ...string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, line := range strings.Split(b.buf.String(), "\n") {
		all := line != ""
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			n++
		}
	}
	return n
}

func maxImage(t *testing.T, virtualSize, clusterSize int64) int64 {
	t.Helper()
	n, err := qcow2.MaxImageSize(qcow2.CreateOptions{VirtualSize: virtualSize, ClusterSize: int(clusterSize)})
	if err != nil {
		t.Fatal(err)
	}
	return roundUp(n, sizeAlignment)
}

// TestSpaceNeeded: a pool needs, for each volume of it a running domain
// uses, the chunk it grows by next (the largest any domain reported), at
// most what separates its device from the largest size its image can
// reach; volumes of other pools, raw volumes, fully grown devices and
// unknown volumes need nothing.
func TestSpaceNeeded(t *testing.T) {
	const c = 64 << 10
	vol := func(id, pool string, virtual, device int64) *volume {
		return &volume{info: VolumeInfo{ID: id, Pool: pool, Format: "qcow2", VirtualSize: virtual, DeviceSize: device}, clusterSize: c}
	}
	full := maxImage(t, 1<<30, c)
	m := &Manager{volumes: map[string]*volume{
		"a":     vol("a", "p", 10<<30, 64<<20),       // far from full: the chunk
		"b":     vol("b", "p", 1<<30, full-(16<<20)), // 16 MiB from full: capped
		"c":     vol("c", "p", 1<<30, full),          // holds its whole image: not thin
		"other": vol("other", "q", 10<<30, 64<<20),   // another pool
		"raw":   {info: VolumeInfo{ID: "raw", Pool: "p", Format: "raw", VirtualSize: 1 << 30, DeviceSize: 1 << 30}},
		"odd":   vol("odd", "p", 10<<30+100, 64<<20), // a virtual size not in sectors still counts
	}}
	if got := m.spaceNeededLocked("p"); got != 0 {
		t.Fatalf("need with no running domain = %d, want 0", got)
	}
	m.growth = map[string][]GrowthNeed{
		"vm1": {{Volume: "a", Chunk: 256 << 20}, {Volume: "b", Chunk: 256 << 20}, {Volume: "c", Chunk: 256 << 20}},
		"vm2": {{Volume: "a", Chunk: 1 << 30}, {Volume: "other", Chunk: 256 << 20}, {Volume: "raw", Chunk: 256 << 20}},
		"vm3": {{Volume: "gone", Chunk: 1 << 30}, {Volume: "odd", Chunk: 128 << 20}},
	}
	// a: the larger of two domains' chunks; b: capped at its 16 MiB.
	if got, want := m.spaceNeededLocked("p"), int64(1<<30+16<<20+128<<20); got != want {
		t.Fatalf("pool p needs %d, want %d (1 GiB for a, 16 MiB for b, 128 MiB for odd)", got, want)
	}
	if got, want := m.spaceNeededLocked("q"), int64(256<<20); got != want {
		t.Fatalf("pool q needs %d, want %d", got, want)
	}
	// A reported chunk larger than any device (a fast guest) stays within
	// what the image can still take, and sums never overflow.
	m.growth = map[string][]GrowthNeed{"vm": {{Volume: "a", Chunk: 1 << 62}, {Volume: "other", Chunk: 1 << 62}}}
	if got, want := m.spaceNeededLocked("p"), maxImage(t, 10<<30, c)-64<<20; got != want {
		t.Fatalf("need with a huge chunk = %d, want %d (what a can still grow)", got, want)
	}
}

// TestPoolFillTransitions: a pool becomes low when free space falls below
// its need, with one warning naming the pool, the figures and what to do;
// staying low logs nothing more; recovering logs one info line; falling
// low again warns again. An unknown free space keeps the last verdict.
func TestPoolFillTransitions(t *testing.T) {
	var logs syncBuffer
	m := &Manager{
		log:     slog.New(slog.NewTextHandler(&logs, nil)),
		volumes: map[string]*volume{"v": {info: VolumeInfo{ID: "v", Pool: "vg0", Format: "qcow2", VirtualSize: 100 << 30, DeviceSize: 1 << 30}, clusterSize: 64 << 10}},
	}
	p := &pool{cfg: PoolConfig{Name: "vg0", Type: PoolLVM, VolumeGroup: "vgdata"}}
	step := func(free int64, known bool, wantNeeded int64, wantLow, wantChanged bool) {
		t.Helper()
		needed, low, changed := m.updateFill(p, free, known)
		if needed != wantNeeded || low != wantLow || changed != wantChanged {
			t.Fatalf("free %d (known %v): needed %d low %v changed %v, want %d %v %v", free, known, needed, low, changed, wantNeeded, wantLow, wantChanged)
		}
	}
	warn := func() int {
		return logs.count("level=WARN", `pool \"vg0\" is low on space`, "extend volume group", "vgdata", "free=", "needed=")
	}
	info := func() int { return logs.count("level=INFO", `pool \"vg0\" has space again`, "free=", "needed=") }

	step(1<<30, true, 0, false, false) // no domain: nothing needed
	m.NoteGrowthNeeds("vm", []GrowthNeed{{Volume: "v", Chunk: 2 << 30}})
	step(1<<30, true, 2<<30, true, true)
	if warn() != 1 {
		t.Fatalf("%d warnings on becoming low, want 1:\n%s", warn(), logs.buf.String())
	}
	step(1<<29, true, 2<<30, true, false) // lower still: no new warning
	step(0, false, 2<<30, true, false)    // unknown: still low
	if warn() != 1 || info() != 0 {
		t.Fatalf("staying low logged again (%d warnings, %d notes)", warn(), info())
	}
	step(3<<30, true, 2<<30, false, true)
	if info() != 1 {
		t.Fatalf("%d notes on recovering, want 1:\n%s", info(), logs.buf.String())
	}
	step(0, false, 2<<30, false, false) // unknown: still fine
	step(1<<30, true, 2<<30, true, true)
	if warn() != 2 {
		t.Fatalf("%d warnings after falling low a second time, want 2", warn())
	}
	// The domain stops: nothing is needed, and the pool is fine again.
	m.NoteGrowthNeeds("vm", nil)
	step(1<<30, true, 0, false, true)
	if info() != 2 {
		t.Fatalf("%d notes, want 2", info())
	}
	if loop := fillAdvice(&pool{cfg: PoolConfig{Type: PoolLoop, Directory: "/srv/pool"}}); !strings.Contains(loop, "/srv/pool") {
		t.Errorf("a loop pool's advice %q does not name its directory", loop)
	}
}

// TestPoolFillEvents: on a real loop pool, a running domain's overlay
// whose next growth is more than the filesystem has free (a 64 TiB overlay
// growing by whole-image chunks) makes the pool low: an EventPoolChanged
// with SpaceLow and the need, and Pool says so. The domain stopping, or
// the volume's deletion, clears it with another event.
func TestPoolFillEvents(t *testing.T) {
	e := newEnv(t, PoolLoop, PolicyEnforce)
	var logs syncBuffer
	m, err := NewManager(e.cfg, ManagerOptions{LVM: e.lvm, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := m.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(e.roots, "base.raw")
	writeFile(t, base, 1<<20, nil)
	events, cancel := m.Subscribe()
	defer cancel()
	waitPool := func(what string, match func(PoolInfo) bool) PoolInfo {
		t.Helper()
		timeout := time.After(30 * time.Second)
		for {
			select {
			case ev := <-events:
				if ev.Kind == EventPoolChanged && ev.Pool != nil && ev.Pool.Name == "p" && match(*ev.Pool) {
					return *ev.Pool
				}
			case <-timeout:
				t.Fatalf("no pool event with %s within 30 s", what)
			}
		}
	}
	overlay := func(name string) VolumeInfo {
		v, err := m.CreateOverlay(context.Background(), Caller{}, OverlayRequest{Pool: "p", Name: name, BackingPath: base, BackingFormat: "raw", VirtualSize: 64 << 40})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	v := overlay("big")
	want := maxImage(t, 64<<40, qcow2.DefaultClusterSize) - v.DeviceSize

	m.NoteGrowthNeeds("vm", []GrowthNeed{{Volume: v.ID, Chunk: 1 << 50}})
	got := waitPool("SpaceLow", func(p PoolInfo) bool { return p.SpaceLow })
	if got.SpaceNeeded != want || got.Free >= got.SpaceNeeded {
		t.Fatalf("low pool: needed %d (want %d), free %d", got.SpaceNeeded, want, got.Free)
	}
	if p, err := m.Pool("p"); err != nil || !p.SpaceLow || p.SpaceNeeded != want {
		t.Fatalf("Pool: %+v, %v", p, err)
	}
	if n := logs.count("level=WARN", "is low on space", "free space in the filesystem of "+e.poolDir); n != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", n, logs.buf.String())
	}

	m.NoteGrowthNeeds("vm", nil) // the domain stopped
	got = waitPool("SpaceLow cleared", func(p PoolInfo) bool { return !p.SpaceLow })
	if got.SpaceNeeded != 0 {
		t.Fatalf("after the domain stopped: needed %d, want 0", got.SpaceNeeded)
	}

	// Low again (another domain), then the volume goes: deleting it clears.
	m.SetGrowthNeeds(map[string][]GrowthNeed{"vm2": {{Volume: v.ID, Chunk: 1 << 50}}})
	waitPool("SpaceLow again", func(p PoolInfo) bool { return p.SpaceLow && p.SpaceNeeded == want })
	if err := m.Delete(context.Background(), Caller{}, v.ID); err != nil {
		t.Fatal(err)
	}
	waitPool("SpaceLow cleared by the deletion", func(p PoolInfo) bool { return !p.SpaceLow && p.SpaceNeeded == 0 })
	if warn, info := logs.count("level=WARN", "is low on space"), logs.count("level=INFO", "has space again"); warn != 2 || info != 2 {
		t.Fatalf("%d warnings and %d notes, want 2 each:\n%s", warn, info, logs.buf.String())
	}
}
