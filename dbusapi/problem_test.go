package dbusapi

import (
	"strings"
	"testing"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/backend"
)

// putFakeVolume adds v to the fake backend and emits the event a real
// Manager emits for it (added, or changed when it exists).
func (h *harness) putFakeVolume(v backend.VolumeInfo) {
	h.fake.mu.Lock()
	_, exists := h.fake.volumes[v.ID]
	h.fake.volumes[v.ID] = v
	kind := backend.EventVolumeAdded
	if exists {
		kind = backend.EventVolumeChanged
	}
	h.fake.emit(backend.Event{Kind: kind, Volume: &v})
	h.fake.mu.Unlock()
}

// A volume the backend will not use shows why, everywhere a client looks:
// the Problem property, GetManagedObjects, InterfacesAdded, and
// PropertiesChanged when it clears.
func TestVolumeProblemIsExported(t *testing.T) {
	h := startServer(t, false)
	sigs := h.signals(t)
	const problem = `its qcow2 header is refused: external data file refused: data_file = "/etc/shadow"`
	bad := backend.VolumeInfo{ID: backend.VolumeID("fast", "bad"), Name: "bad", Pool: "fast", DevicePath: "/dev/loop9",
		Format: "qcow2", Role: backend.RoleOverlay, Problem: problem}
	good := backend.VolumeInfo{ID: backend.VolumeID("fast", "good"), Name: "good", Pool: "fast", DevicePath: "/dev/loop8",
		Format: "qcow2", Role: backend.RoleBase}
	h.putFakeVolume(good)
	h.putFakeVolume(bad)
	badPath, goodPath := VolumePath(bad.ID), VolumePath(good.ID)

	added := waitSignal(t, sigs, ManagerPath, ObjectManagerIface+".InterfacesAdded", func(s *dbus.Signal) bool { return s.Body[0] == badPath })
	if got := added.Body[1].(map[string]map[string]dbus.Variant)[VolumeIface]["Problem"]; got.Value() != problem {
		t.Errorf("InterfacesAdded: Problem = %v, want %q", got, problem)
	}

	// As any user sees it on the bus (reading is open to everyone).
	out, errOut, err := h.bus.Busctl(t, 65534, "get-property", BusName, string(badPath), VolumeIface, "Problem")
	if err != nil || strings.TrimSpace(out) != `s "`+strings.ReplaceAll(problem, `"`, `\"`)+`"` {
		t.Errorf("busctl get-property Problem as nobody: %q %s %v", out, errOut, err)
	}

	var objects map[dbus.ObjectPath]map[string]map[string]dbus.Variant
	if err := h.call(ManagerPath, ObjectManagerIface+".GetManagedObjects").Store(&objects); err != nil {
		t.Fatal(err)
	}
	if got, ok := objects[badPath][VolumeIface]["Problem"]; !ok || got.Value() != problem {
		t.Errorf("GetManagedObjects: %s Problem = %v (present %v), want %q", badPath, got.Value(), ok, problem)
	}
	if got, ok := objects[goodPath][VolumeIface]["Problem"]; !ok || got.Value() != "" {
		t.Errorf("GetManagedObjects: %s Problem = %v (present %v), want \"\"", goodPath, got.Value(), ok)
	}

	// The admin repairs it; a rescan clears the problem.
	bad.Problem = ""
	h.putFakeVolume(bad)
	waitSignal(t, sigs, badPath, PropertiesIface+".PropertiesChanged", func(s *dbus.Signal) bool {
		v, ok := s.Body[1].(map[string]dbus.Variant)["Problem"]
		return ok && v.Value() == ""
	})
	var now string
	if err := h.client.Object(BusName, badPath).StoreProperty(VolumeIface+".Problem", &now); err != nil || now != "" {
		t.Errorf("Problem after it cleared = %q, %v", now, err)
	}
}
