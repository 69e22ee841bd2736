package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/testutil"
)

// TestServeLibvirtPoolFill: a running KVM domain's thin overlay in an LVM
// pool whose volume group has less free than the overlay's next chunk
// (another LV holds the rest) makes the pool low: SpaceNeeded is the
// chunk, SpaceLow true, the SpaceLow signal comes once with both figures,
// the daemon logs a warning saying what to do, and `volagent pools` marks
// it. Once the other LV is removed (space freed outside volagent), the
// daemon's periodic pass over the running domains sees it: SpaceLow
// clears and the recovery is logged. The domain stopping clears the need.
// Also: virsh pool-info of the pool's request pool shows the request
// directory's filesystem, not the volume group (as the README says).
func TestServeLibvirtPoolFill(t *testing.T) {
	e := newLibvirtEnv(t)
	e.startDaemon()
	client := e.bus.Connect(t)
	poolPath := dbusapi.PoolPath(libvirtLVMPool)
	if err := client.AddMatchSignal(dbus.WithMatchSender(dbusapi.BusName), dbus.WithMatchObjectPath(poolPath)); err != nil {
		t.Fatal(err)
	}
	sigs := make(chan *dbus.Signal, 1000)
	client.Signal(sigs)
	pool := client.Object(dbusapi.BusName, poolPath)
	prop := func(name string) any {
		t.Helper()
		v, err := pool.GetProperty(dbusapi.PoolIface + "." + name)
		if err != nil {
			t.Fatal(err)
		}
		return v.Value()
	}
	const chunk = 8 << 20 // the LVM pool's chunk_size

	dev := e.waitMaterialized(e.volCreate(libvirtLVMPool, "fill", e.base, "268435456"))

	// Another LV takes all but one extent of the volume group.
	lvm := &hostblk.LVM{NoDeviceMapper: true, Devices: []string{e.pv}}
	ctx := context.Background()
	vg, err := lvm.VolumeGroup(ctx, e.vg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lvm.CreateLV(ctx, e.vg, "filler", vg.Free-4<<20, hostblk.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lvm.RemoveLV(context.Background(), e.vg, "filler") })
	if prop("SpaceLow") != false || prop("SpaceNeeded") != uint64(0) {
		t.Fatalf("before any domain runs: SpaceLow %v, SpaceNeeded %v; want false, 0", prop("SpaceLow"), prop("SpaceNeeded"))
	}

	domain := testutil.TestDomainPrefix + "poolfill"
	if stderr, err := startLibvirtDomain(t, domain, fmt.Sprintf("<disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='%s'/><target dev='vda' bus='virtio'/></disk>", dev)); err != nil {
		t.Fatalf("domain on the overlay refused: %v\n%s", err, stderr)
	}
	low := waitPoolSignal(t, sigs, poolPath, dbusapi.PoolIface+".SpaceLow", nil)
	if free, needed := low.Body[0].(uint64), low.Body[1].(uint64); needed != chunk || free != 4<<20 {
		t.Fatalf("SpaceLow(free %d, needed %d), want (%d, %d)", free, needed, 4<<20, chunk)
	}
	if prop("SpaceLow") != true || prop("SpaceNeeded") != uint64(chunk) {
		t.Fatalf("low pool: SpaceLow %v, SpaceNeeded %v", prop("SpaceLow"), prop("SpaceNeeded"))
	}
	warning := fmt.Sprintf(`pool \"%s\" is low on space: 4.0 MiB free, the running domains' next growth needs 8.0 MiB; extend volume group \"%s\" (vgextend) or free extents in it`, libvirtLVMPool, e.vg)
	if log := e.daemon.stderr.waitFor(t, warning); strings.Count(log, warning) != 1 {
		t.Fatalf("want one warning %q; volagentd stderr:\n%s", warning, log)
	}
	out, errOut, code := runVolagent(t, "pools", "--json", "--bus-address", e.bus.Address)
	if code != 0 {
		t.Fatalf("volagent pools --json: %d %s", code, errOut)
	}
	var pools []poolJSON
	if err := json.Unmarshal([]byte(out), &pools); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range pools {
		if p.Name == libvirtLVMPool {
			found = true
			if !p.SpaceLow || p.SpaceNeeded != chunk || p.Free != 4<<20 || p.Type != "lvm" {
				t.Fatalf("volagent pools --json: %+v", p)
			}
		}
	}
	if !found {
		t.Fatalf("volagent pools --json lists no pool %s:\n%s", libvirtLVMPool, out)
	}
	out, _, code = runVolagent(t, "pools", "--bus-address", e.bus.Address)
	if code != 0 || !poolRowHas(out, libvirtLVMPool, "8.0 MiB", "LOW") || !poolRowHas(out, libvirtLoopPool, "ok") {
		t.Fatalf("volagent pools: want %s LOW and needing 8.0 MiB, %s ok:\n%s", libvirtLVMPool, libvirtLoopPool, out)
	}

	// Space freed outside volagent: seen at the next pass over the running
	// domains (every 5 s).
	if err := lvm.RemoveLV(ctx, e.vg, "filler"); err != nil {
		t.Fatal(err)
	}
	waitPoolSignal(t, sigs, poolPath, dbusapi.PropertiesIface+".PropertiesChanged", func(s *dbus.Signal) bool {
		v, ok := s.Body[1].(map[string]dbus.Variant)["SpaceLow"]
		return ok && v.Value() == false
	})
	recovered := fmt.Sprintf(`pool \"%s\" has space again`, libvirtLVMPool)
	if log := e.daemon.stderr.waitFor(t, recovered); strings.Count(log, recovered) != 1 || strings.Count(log, warning) != 1 {
		t.Fatalf("want one warning and one note %q; volagentd stderr:\n%s", recovered, log)
	}
	if prop("SpaceNeeded") != uint64(chunk) {
		t.Fatalf("SpaceNeeded %v while the domain runs, want %d", prop("SpaceNeeded"), chunk)
	}

	testutil.MustVirsh(t, "destroy", domain)
	waitPoolSignal(t, sigs, poolPath, dbusapi.PropertiesIface+".PropertiesChanged", func(s *dbus.Signal) bool {
		v, ok := s.Body[1].(map[string]dbus.Variant)["SpaceNeeded"]
		return ok && v.Value() == uint64(0)
	})
	quiet := time.After(time.Second)
	for done := false; !done; {
		select {
		case s := <-sigs:
			if s.Name == dbusapi.PoolIface+".SpaceLow" {
				t.Fatalf("a second SpaceLow signal: %v", s.Body)
			}
		case <-quiet:
			done = true
		}
	}

	// virsh pool-info of the request pool: the directory's filesystem.
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Join(e.requestDir, libvirtLVMPool), &st); err != nil {
		t.Fatal(err)
	}
	capacity := ""
	for _, line := range strings.Split(testutil.MustVirsh(t, "pool-info", "--bytes", libvirtLVMPool), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "Capacity" {
			capacity = strings.TrimSpace(v)
		}
	}
	if got, err := strconv.ParseUint(capacity, 10, 64); err != nil || got != st.Blocks*uint64(st.Frsize) || got == vg.Size {
		t.Fatalf("virsh pool-info capacity %q: want the request directory's filesystem (%d bytes), not the volume group's %d", capacity, st.Blocks*uint64(st.Frsize), vg.Size)
	}
}

// waitPoolSignal returns the first signal named name on path that pred
// accepts (nil: any), within 60 s.
func waitPoolSignal(t *testing.T, ch chan *dbus.Signal, path dbus.ObjectPath, name string, pred func(*dbus.Signal) bool) *dbus.Signal {
	t.Helper()
	return testutil.WaitSignal(t, ch, path, name, 60*time.Second, pred)
}

// poolRowHas: the `volagent pools` row of pool holds every one of cells.
func poolRowHas(out, pool string, cells ...string) bool {
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == pool {
			for _, c := range cells {
				if !strings.Contains(line, c) {
					return false
				}
			}
			return true
		}
	}
	return false
}
