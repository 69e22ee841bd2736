package backend

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/volagent/volagent/hostblk"
)

// TestVirtGrowVolume grows overlays' devices as the thin-provisioning
// controller does while a domain runs: the device (a loop pool's loop
// device, a loop-activated LV) shows the new size, the header is untouched,
// and the volume is found by its device path and by a symlink to it.
func TestVirtGrowVolume(t *testing.T) {
	for _, typ := range []PoolType{PoolLoop, PoolLVM} {
		t.Run(string(typ), func(t *testing.T) {
			e := newEnv(t, typ, PolicyEnforce)
			m := e.manager()
			base := filepath.Join(e.roots, "base.raw")
			writeFile(t, base, 64<<20, nil)
			events, cancel := m.Subscribe()
			defer cancel()
			v, err := m.CreateOverlay(context.Background(), Caller{}, OverlayRequest{Pool: "p", Name: "vm", BackingPath: base, BackingFormat: "raw"})
			if err != nil {
				t.Fatal(err)
			}
			if v.DeviceSize != testInitialSize {
				t.Fatalf("new overlay device size %d, want the initial size %d", v.DeviceSize, testInitialSize)
			}

			settings, err := m.PoolSettings("p")
			if err != nil || settings.ChunkSize != testChunkSize || settings.Type != typ || len(settings.BackingRoots) != 1 {
				t.Fatalf("PoolSettings: %+v, %v", settings, err)
			}
			if _, err := m.PoolSettings("nope"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("PoolSettings of a missing pool: %v", err)
			}

			link := filepath.Join(t.TempDir(), "vm.qcow2")
			if err := os.Symlink(v.DevicePath, link); err != nil {
				t.Fatal(err)
			}
			for _, path := range []string{v.DevicePath, link} {
				if got, ok := m.VolumeByDevice(path); !ok || got.ID != v.ID {
					t.Fatalf("VolumeByDevice(%s) = %+v, %v", path, got, ok)
				}
			}
			if _, ok := m.VolumeByDevice(base); ok {
				t.Fatal("VolumeByDevice found a volume for a backing file")
			}

			grown, err := m.GrowVolume(context.Background(), Caller{}, v.ID, v.DeviceSize+testChunkSize+1)
			if err != nil {
				t.Fatal(err)
			}
			// At least what was asked, in 4 KiB units (LVM rounds up to
			// whole extents besides).
			asked := int64(v.DeviceSize + testChunkSize + 4096)
			info, err := hostblk.Inspect(v.DevicePath)
			if err != nil {
				t.Fatal(err)
			}
			want := info.Size
			if grown.DeviceSize != want || want < asked || (typ == PoolLoop && want != asked) {
				t.Fatalf("after GrowVolume: reported %d, device %d, asked for %d", grown.DeviceSize, info.Size, asked)
			}
			if got, _ := m.Volume(v.ID); got.DeviceSize != want || got.VirtualSize != v.VirtualSize || got.BackingName != base {
				t.Fatalf("volume after growing: %+v", got)
			}
			qemuCheck(t, v.DevicePath)
			sawChange := false
			for len(events) > 0 {
				if ev := <-events; ev.Kind == EventVolumeChanged && ev.Volume.ID == v.ID && ev.Volume.DeviceSize == want {
					sawChange = true
				}
			}
			if !sawChange {
				t.Fatal("no EventVolumeChanged with the new device size")
			}
			// Smaller or equal: nothing changes.
			if again, err := m.GrowVolume(context.Background(), Caller{}, v.ID, 4096); err != nil || again.DeviceSize != want {
				t.Fatalf("GrowVolume to a smaller size: %+v, %v", again, err)
			}
			if _, err := m.GrowVolume(context.Background(), Caller{}, "p.none", want*2); !errors.Is(err, ErrNotFound) {
				t.Fatalf("GrowVolume of a missing volume: %v", err)
			}
			if _, err := m.GrowVolume(context.Background(), Caller{}, v.ID, 0); !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("GrowVolume to 0: %v", err)
			}
		})
	}
}

func TestVirtSignalPolicyViolation(t *testing.T) {
	m, err := NewManager(&Config{}, ManagerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	events, cancel := m.Subscribe()
	defer cancel()
	m.SignalPolicyViolation("request p/vm", "backing-outside-roots", "backing /x is outside")
	ev := <-events
	if ev.Kind != EventPolicyViolation || ev.Violation.Subject != "request p/vm" || ev.Violation.Code != "backing-outside-roots" {
		t.Fatalf("event %+v", ev)
	}
}
