package dbusapi

import (
	"testing"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/backend"
)

// TestPoolSpaceLowSignal: a pool's SpaceNeeded and SpaceLow are
// properties (in GetManagedObjects and Get), changed with
// PropertiesChanged; the SpaceLow signal goes out, with the free and
// needed bytes, once when the pool becomes low, not while it stays low,
// and again after it recovered and fell low again.
func TestPoolSpaceLowSignal(t *testing.T) {
	h := startServer(t, false)
	sigs := h.signals(t)
	path := PoolPath("fast")
	out := h.bus.MustBusctl(t, "get-property", BusName, string(path), PoolIface, "SpaceNeeded", "SpaceLow")
	if want := "t 0\nb false\n"; out != want {
		t.Fatalf("pool properties %q, want %q", out, want)
	}
	pool := h.fake.Pools()[0]
	send := func(free, needed int64) {
		p := pool
		p.Free, p.SpaceNeeded, p.SpaceLow = free, needed, free < needed
		h.fake.emit(backend.Event{Kind: backend.EventPoolChanged, Pool: &p})
	}
	changedTo := func(low bool) func(*dbus.Signal) bool {
		return func(s *dbus.Signal) bool {
			v, ok := s.Body[1].(map[string]dbus.Variant)["SpaceLow"]
			return ok && v.Value() == low
		}
	}
	// lowSignals reads signals until the pool's PropertiesChanged to SpaceLow
	// = low, counting the SpaceLow signals on the way and just after it.
	lowSignals := func(low bool) (n int, last *dbus.Signal) {
		t.Helper()
		timeout := time.After(10 * time.Second)
		seen := false
		for {
			var grace <-chan time.Time
			if seen {
				grace = time.After(300 * time.Millisecond) // the signal follows the properties at once
			}
			select {
			case s := <-sigs:
				switch {
				case s.Path == path && s.Name == PoolIface+".SpaceLow":
					n, last = n+1, s
				case s.Path == path && s.Name == PropertiesIface+".PropertiesChanged" && changedTo(low)(s):
					seen = true
				}
			case <-grace:
				return n, last
			case <-timeout:
				t.Fatalf("no PropertiesChanged to SpaceLow=%v within 10 s", low)
			}
		}
	}

	send(100, 300)
	n, s := lowSignals(true)
	if n != 1 || s.Body[0] != uint64(100) || s.Body[1] != uint64(300) {
		t.Fatalf("entering the low state: %d SpaceLow signals, last %v; want one with (100, 300)", n, s)
	}
	out = h.bus.MustBusctl(t, "get-property", BusName, string(path), PoolIface, "Free", "SpaceNeeded", "SpaceLow")
	if want := "t 100\nt 300\nb true\n"; out != want {
		t.Fatalf("low pool's properties %q, want %q", out, want)
	}
	// Still low with other figures: properties move, no new signal.
	send(50, 400)
	waitSignal(t, sigs, path, PropertiesIface+".PropertiesChanged", func(s *dbus.Signal) bool {
		v, ok := s.Body[1].(map[string]dbus.Variant)["SpaceNeeded"]
		return ok && v.Value() == uint64(400)
	})
	send(500, 400)
	if n, _ := lowSignals(false); n != 0 {
		t.Fatalf("%d SpaceLow signals while staying low and recovering, want 0", n)
	}
	send(10, 400)
	if n, s := lowSignals(true); n != 1 || s.Body[0] != uint64(10) || s.Body[1] != uint64(400) {
		t.Fatalf("falling low again: %d SpaceLow signals, last %v; want one with (10, 400)", n, s)
	}
	var objects map[dbus.ObjectPath]map[string]map[string]dbus.Variant
	if err := h.call(ManagerPath, ObjectManagerIface+".GetManagedObjects").Store(&objects); err != nil {
		t.Fatal(err)
	}
	if p := objects[path][PoolIface]; p["SpaceLow"].Value() != true || p["SpaceNeeded"].Value() != uint64(400) {
		t.Fatalf("GetManagedObjects: %v", p)
	}
	declared := false
	for _, sig := range apiInterfaces()[PoolIface].Signals {
		declared = declared || sig.Name == "SpaceLow" && len(sig.Args) == 2 && sig.Args[0].Type == "t" && sig.Args[1].Type == "t"
	}
	if !declared {
		t.Fatal("the introspection XML does not declare the signal SpaceLow(t free, t needed) of the Pool interface")
	}
}
