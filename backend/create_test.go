package backend

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sort"
	"testing"
	"time"
)

// TestCreatedVolumeInfo: the VolumeInfo CreateOverlay returns (built from
// what it wrote, not read back) is what reading and checking the device
// finds, field for field, and what a new Manager lists after Load.
func TestCreatedVolumeInfo(t *testing.T) {
	for _, typ := range poolTypes {
		t.Run(string(typ), func(t *testing.T) {
			e := newEnv(t, typ, PolicyEnforce)
			ctx := context.Background()
			base := filepath.Join(e.roots, "base.raw")
			writeFile(t, base, 10<<20+512, nil)
			m := e.manager()
			reqs := []OverlayRequest{
				{Name: "default"},
				{Name: "small-clusters", ClusterSize: 4096, VirtualSize: 1 << 30},
				{Name: "big-clusters", ClusterSize: 2 << 20},
				{Name: "huge", VirtualSize: 16 << 40}, // several L1 clusters
			}
			var want []VolumeInfo
			for _, req := range reqs {
				req.Pool, req.BackingPath, req.BackingFormat = "p", base, "raw"
				v, err := m.CreateOverlay(ctx, Caller{}, req)
				if err != nil {
					t.Fatalf("%s: %v", req.Name, err)
				}
				want = append(want, v)
			}
			// An overlay over a managed volume records its path.
			v, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "over-volume", BackingVolume: want[0].ID})
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, v)
			for _, v := range want {
				got, p, err := m.lookup(v.ID)
				if err != nil {
					t.Fatal(err)
				}
				read := m.readVolume(p, v.Name, v.DevicePath, got.file, got.meta)
				if read.info != v || read.backingPath != got.backingPath || read.file != got.file || read.meta != got.meta {
					t.Errorf("%s: CreateOverlay made\n%+v (backing path %q)\nreading the device finds\n%+v (backing path %q)",
						v.Name, v, got.backingPath, read.info, read.backingPath)
				}
				if v.HighestAllocated <= 0 || v.Problem != "" || v.Format != "qcow2" {
					t.Errorf("%s: %+v", v.Name, v)
				}
				qemuCheck(t, v.DevicePath)
			}
			m.Close()
			listed := e.manager().Volumes()
			if len(listed) != len(want) {
				t.Fatalf("after Load: %d volumes, want %d", len(listed), len(want))
			}
			for _, l := range listed {
				for _, w := range want {
					if l.ID == w.ID && l != w {
						t.Errorf("after Load:\n%+v\nCreateOverlay returned\n%+v", l, w)
					}
				}
			}
		})
	}
}

// BenchmarkCreateOverlayLoop measures CreateOverlay on a loop pool, from
// call to return, as the daemon runs it (Info-level logging, one event
// subscriber): what a D-Bus CreateOverlay costs minus the bus. Each
// overlay is deleted again outside the timed part, so the host keeps one
// loop device for it. Besides ns/op (the mean) it reports the median.
//
//	go test -run '^$' -bench CreateOverlayLoop -benchtime 300x -cpuprofile cpu.out ./backend
func BenchmarkCreateOverlayLoop(b *testing.B) {
	e := newEnv(b, PoolLoop, PolicyEnforce)
	base := filepath.Join(e.roots, "base.raw")
	writeFile(b, base, 10<<30, nil)
	m, err := NewManager(e.cfg, ManagerOptions{LVM: e.lvm, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	ctx := context.Background()
	if err := m.Load(ctx); err != nil {
		b.Fatal(err)
	}
	events, cancel := m.Subscribe()
	defer cancel()
	go func() {
		for range events {
		}
	}()

	var times []time.Duration
	i := 0
	b.ResetTimer()
	for b.Loop() {
		start := time.Now()
		v, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: fmt.Sprintf("bench-%d", i), BackingPath: base, BackingFormat: "raw"})
		times = append(times, time.Since(start))
		if err != nil {
			b.Fatal(err)
		}
		i++
		b.StopTimer()
		if err := m.Delete(ctx, Caller{}, v.ID); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	b.ReportMetric(float64(times[len(times)/2].Microseconds()), "median-us")
}
