package backend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
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
				{Name: "default", Origin: "request:0123abcd"}, // recorded and read back
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

// TestCreateOverlayHeaderInRaw: a raw backing whose first sector is an
// image header is refused when the overlay is made (enforce), directly or
// at the bottom of a qcow2 backing's chain; audit mode makes the overlay
// and signals the violation. A clean raw backing is the control.
func TestCreateOverlayHeaderInRaw(t *testing.T) {
	e := newEnv(t, PoolLoop, PolicyEnforce)
	ctx := context.Background()
	clean := filepath.Join(e.roots, "clean.raw")
	writeFile(t, clean, 4<<20, nil)
	// A qcow2 image passed off as raw: what a guest writes into its own
	// raw disk to be probed as qcow2.
	disguised := filepath.Join(e.roots, "disguised.raw")
	testutil.MakeQcow2(t, disguised, "", "4M", "", "")
	over := filepath.Join(e.roots, "over-disguised.qcow2")
	testutil.MakeQcow2(t, over, "", "", disguised, "raw")

	m := e.manager()
	if _, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "clean", BackingPath: clean, BackingFormat: "raw"}); err != nil {
		t.Fatalf("clean raw backing: %v", err)
	}
	for _, c := range []struct{ name, backing, format string }{
		{"direct", disguised, "raw"},
		{"chain-bottom", over, "qcow2"},
	} {
		_, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: c.name, BackingPath: c.backing, BackingFormat: c.format})
		mustErrIs(t, err, ErrPolicyViolation)
		if !errors.Is(err, qcow2.ErrHeaderInRaw) {
			t.Errorf("%s: %v does not name the header in the raw layer", c.name, err)
		}
		if _, err := m.Volume(VolumeID("p", c.name)); err == nil {
			t.Errorf("%s: a refused overlay was left", c.name)
		}
	}
	m.Close()

	a := newEnv(t, PoolLoop, PolicyAudit)
	disguised = filepath.Join(a.roots, "disguised.raw")
	testutil.MakeQcow2(t, disguised, "", "4M", "", "")
	am := a.manager()
	events, cancel := am.Subscribe()
	defer cancel()
	if _, err := am.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "audited", BackingPath: disguised, BackingFormat: "raw", VirtualSize: 4 << 20}); err != nil {
		t.Fatalf("audit mode: %v", err)
	}
	deadline := time.After(10 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Kind == EventPolicyViolation && ev.Violation.Code == "header-in-raw" {
				return
			}
		case <-deadline:
			t.Fatal("audit mode: no header-in-raw violation signalled")
		}
	}
}
