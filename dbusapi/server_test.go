package dbusapi

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/dbusapi/dbustest"
	"github.com/volagent/volagent/internal/testutil"
)

const policyFile = "../packaging/dbus/org.volagent.VolAgent1.conf"

type harness struct {
	bus    *dbustest.Bus
	fake   *fakeBackend
	srv    *Server
	client *dbus.Conn
}

// startServer serves a fake backend on a private bus with the real bus
// policy (and, with allowAll, a policy that lets everyone call anything).
func startServer(t *testing.T, allowAll bool) *harness {
	t.Helper()
	return startServerWith(t, allowAll, InspectLimits{})
}

func startServerWith(t *testing.T, allowAll bool, limits InspectLimits) *harness {
	t.Helper()
	testutil.RequireRoot(t)
	bus := dbustest.Start(t, dbustest.Options{Policies: []string{policyFile}, AllowAll: allowAll})
	fake := newFakeBackend()
	srv := NewServer(fake, Options{Version: "test-1", JobRetention: time.Minute, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Inspect: limits})
	conn, err := dbus.Connect(bus.Address, dbus.WithHandler(srv))
	if err != nil {
		t.Fatal(err)
	}
	srv.Start(conn)
	t.Cleanup(func() { srv.Stop(); conn.Close() })
	if reply, err := conn.RequestName(BusName, dbus.NameFlagDoNotQueue); err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("RequestName: %v %v", reply, err)
	}
	return &harness{bus: bus, fake: fake, srv: srv, client: bus.Connect(t)}
}

func (h *harness) call(path dbus.ObjectPath, method string, args ...any) *dbus.Call {
	return h.client.Object(BusName, path).Call(method, 0, args...)
}

func noOptions() map[string]dbus.Variant { return map[string]dbus.Variant{} }

// dbusErrorName returns the D-Bus error name of err, or "".
func dbusErrorName(err error) string {
	var de dbus.Error
	if errors.As(err, &de) {
		return de.Name
	}
	var dp *dbus.Error
	if errors.As(err, &dp) {
		return dp.Name
	}
	return ""
}

func wantError(t *testing.T, err error, name, contains string) {
	t.Helper()
	if got := dbusErrorName(err); got != name {
		t.Fatalf("error = %v (%s), want %s", err, got, name)
	}
	if !strings.Contains(err.Error(), contains) {
		t.Errorf("error message %q does not mention %q", err.Error(), contains)
	}
}

// signals subscribes the client to the daemon's signals.
func (h *harness) signals(t *testing.T) chan *dbus.Signal {
	t.Helper()
	if err := h.client.AddMatchSignal(dbus.WithMatchSender(BusName)); err != nil {
		t.Fatal(err)
	}
	ch := make(chan *dbus.Signal, 1000)
	h.client.Signal(ch)
	return ch
}

// waitSignal returns the first signal named name on path that pred accepts.
func waitSignal(t *testing.T, ch chan *dbus.Signal, path dbus.ObjectPath, name string, pred func(*dbus.Signal) bool) *dbus.Signal {
	t.Helper()
	return testutil.WaitSignal(t, ch, path, name, 10*time.Second, pred)
}

func TestPackagedIntrospectionIsTheEmbeddedOne(t *testing.T) {
	packaged, err := os.ReadFile("../packaging/dbus/org.volagent.VolAgent1.xml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(packaged, IntrospectionXML) {
		t.Fatal("packaging/dbus/org.volagent.VolAgent1.xml differs from dbusapi/org.volagent.VolAgent1.xml; copy the dbusapi one over it")
	}
}

// Every method of the XML has a handler and every handler is in the XML;
// every property the daemon serves is declared, with the declared type.
func TestHandlersMatchIntrospectionXML(t *testing.T) {
	srv := NewServer(newFakeBackend(), Options{})
	for kind, iface := range apiInterface {
		o := object{s: srv, kind: kind}
		var served []string
		for name := range o.apiMethods() {
			served = append(served, name)
		}
		var declared []string
		for _, m := range apiInterfaces()[iface].Methods {
			declared = append(declared, m.Name)
		}
		sort.Strings(served)
		sort.Strings(declared)
		if !slices.Equal(served, declared) {
			t.Errorf("%s: handlers %v, XML methods %v", iface, served, declared)
		}
		for _, m := range apiInterfaces()[iface].Methods {
			in, _, _ := methodSignatures(iface, m.Name)
			if m.Name != "Inspect" && kind != kindNode && !strings.HasSuffix(in, "a{sv}") {
				t.Errorf("%s.%s does not end with an a{sv} options argument: (%s)", iface, m.Name, in)
			}
		}
	}
	props := map[string]map[string]dbus.Variant{
		PoolIface:   poolProps(backend.PoolInfo{}),
		VolumeIface: volumeProps(backend.VolumeInfo{}),
		JobIface:    jobProps(backend.JobInfo{}),
	}
	srv.mu.RLock()
	props[ManagerIface] = srv.managerPropsLocked()
	srv.mu.RUnlock()
	for iface, served := range props {
		declared := map[string]string{}
		for _, p := range apiInterfaces()[iface].Properties {
			declared[p.Name] = p.Type
			if p.Access != "read" {
				t.Errorf("%s.%s: access %q; every property is read-only", iface, p.Name, p.Access)
			}
		}
		for name, v := range served {
			if declared[name] != v.Signature().String() {
				t.Errorf("%s.%s: served as %s, declared as %q", iface, name, v.Signature(), declared[name])
			}
		}
		if len(declared) != len(served) {
			t.Errorf("%s: %d properties declared, %d served", iface, len(declared), len(served))
		}
	}
	// Every element the XML documents carries a DocString.
	for _, i := range apiInterfaces() {
		check := func(what string, anns []introspect.Annotation) {
			for _, a := range anns {
				if a.Name == "org.freedesktop.DBus.DocString" && a.Value != "" {
					return
				}
			}
			t.Errorf("%s has no org.freedesktop.DBus.DocString annotation", what)
		}
		check(i.Name, i.Annotations)
		for _, m := range i.Methods {
			check(i.Name+"."+m.Name, m.Annotations)
		}
		for _, s := range i.Signals {
			check(i.Name+"."+s.Name, s.Annotations)
		}
		for _, p := range i.Properties {
			check(i.Name+"."+p.Name, p.Annotations)
		}
	}
}

// What busctl sees on the bus is what the XML says.
func TestServedIntrospection(t *testing.T) {
	h := startServer(t, false)
	if err := h.call(ManagerPath, ManagerIface+".CreateOverlay", "fast", "vm1", "/var/lib/images/base.raw", "raw", uint64(1<<30), noOptions()).Store(new(dbus.ObjectPath)); err != nil {
		t.Fatal(err)
	}
	for path, iface := range map[dbus.ObjectPath]string{
		ManagerPath:      ManagerIface,
		PoolPath("fast"): PoolIface,
		VolumePath(backend.VolumeID("fast", "vm1")): VolumeIface,
	} {
		out := h.bus.MustBusctl(t, "introspect", "--xml-interface", BusName, string(path))
		var node introspect.Node
		if err := xml.Unmarshal([]byte(out), &node); err != nil {
			t.Fatalf("introspection of %s: %v\n%s", path, err, out)
		}
		var found bool
		for _, i := range node.Interfaces {
			if i.Name == iface {
				found = true
				want, _ := xml.Marshal(apiInterfaces()[iface])
				got, _ := xml.Marshal(i)
				if !bytes.Equal(want, got) {
					t.Errorf("%s on %s differs from the XML:\n got %s\nwant %s", iface, path, got, want)
				}
			}
		}
		if !found {
			t.Errorf("%s has no %s", path, iface)
		}
	}
	tree := h.bus.MustBusctl(t, "tree", "--list", BusName)
	for _, p := range []dbus.ObjectPath{ManagerPath, PoolPath("fast"), VolumePath(backend.VolumeID("fast", "vm1"))} {
		if !strings.Contains(tree, string(p)+"\n") {
			t.Errorf("busctl tree does not list %s:\n%s", p, tree)
		}
	}
}

func TestPropertiesAndObjectManager(t *testing.T) {
	h := startServer(t, false)
	out := h.bus.MustBusctl(t, "get-property", BusName, string(ManagerPath), ManagerIface, "Version", "Pools")
	if !strings.Contains(out, `s "test-1"`) || !strings.Contains(out, `ao 1 "/org/volagent/VolAgent1/pools/fast"`) {
		t.Errorf("manager properties: %q", out)
	}
	out = h.bus.MustBusctl(t, "get-property", BusName, string(PoolPath("fast")), PoolIface, "Type", "Capacity", "Free", "PolicyMode")
	if want := "s \"loop\"\nt 1073741824\nt 536870912\ns \"enforce\"\n"; out != want {
		t.Errorf("pool properties %q, want %q", out, want)
	}
	var objects map[dbus.ObjectPath]map[string]map[string]dbus.Variant
	if err := h.call(ManagerPath, ObjectManagerIface+".GetManagedObjects").Store(&objects); err != nil {
		t.Fatal(err)
	}
	if p := objects[PoolPath("fast")][PoolIface]; p["Name"].Value() != "fast" {
		t.Errorf("GetManagedObjects: %v", objects)
	}
	_, errOut, err := h.bus.Busctl(t, 0, "set-property", BusName, string(PoolPath("fast")), PoolIface, "PolicyMode", "s", "audit")
	if err == nil || !strings.Contains(errOut, "read-only") {
		t.Errorf("set-property: %v %s", err, errOut)
	}
	_, errOut, err = h.bus.Busctl(t, 0, "get-property", BusName, string(VolumePath("nope")), VolumeIface, "Name")
	if err == nil || !strings.Contains(errOut, "No such object") {
		t.Errorf("property of a missing volume: %v %s", err, errOut)
	}
}

func TestVolumeLifeCycleAndSignals(t *testing.T) {
	h := startServer(t, false)
	sigs := h.signals(t)

	var vol dbus.ObjectPath
	err := h.call(ManagerPath, ManagerIface+".CreateOverlay", "fast", "vm1", "/var/lib/images/base.raw", "raw", uint64(4<<30),
		map[string]dbus.Variant{"cluster-size": dbus.MakeVariant(uint32(65536))}).Store(&vol)
	if err != nil {
		t.Fatal(err)
	}
	if want := VolumePath(backend.VolumeID("fast", "vm1")); vol != want {
		t.Fatalf("CreateOverlay returned %s, want %s", vol, want)
	}
	added := waitSignal(t, sigs, ManagerPath, ObjectManagerIface+".InterfacesAdded", func(s *dbus.Signal) bool { return s.Body[0] == vol })
	props := added.Body[1].(map[string]map[string]dbus.Variant)[VolumeIface]
	if props["BackingName"].Value() != "/var/lib/images/base.raw" || props["BackingFormat"].Value() != "raw" || props["Role"].Value() != "overlay" {
		t.Errorf("InterfacesAdded properties: %v", props)
	}
	// The object is there as soon as the method returned.
	var name string
	if err := h.client.Object(BusName, vol).StoreProperty(VolumeIface+".Name", &name); err != nil || name != "vm1" {
		t.Errorf("Name = %q, %v", name, err)
	}

	// An overlay over the volume, by object path.
	var over dbus.ObjectPath
	if err := h.call(ManagerPath, ManagerIface+".CreateOverlay", "fast", "vm1-snap", string(vol), "", uint64(0), noOptions()).Store(&over); err != nil {
		t.Fatal(err)
	}
	var bf string
	h.client.Object(BusName, over).StoreProperty(VolumeIface+".BackingFormat", &bf)
	if bf != "qcow2" {
		t.Errorf("overlay over a volume: BackingFormat %q", bf)
	}

	if err := h.client.Object(BusName, vol).Call(VolumeIface+".Resize", 0, uint64(8<<30), noOptions()).Err; err != nil {
		t.Fatal(err)
	}
	waitSignal(t, sigs, vol, PropertiesIface+".PropertiesChanged", func(s *dbus.Signal) bool {
		v, ok := s.Body[1].(map[string]dbus.Variant)["VirtualSize"]
		return ok && v.Value() == uint64(8<<30)
	})
	err = h.client.Object(BusName, vol).Call(VolumeIface+".Resize", 0, uint64(1<<20), noOptions()).Err
	wantError(t, err, ErrorInvalidArgument, "shrinking")

	if err := h.client.Object(BusName, vol).Call(VolumeIface+".Write", 0, uint64(1<<20), []byte("hello"), noOptions()).Err; err != nil {
		t.Fatal(err)
	}
	var result map[string]dbus.Variant
	if err := h.client.Object(BusName, vol).Call(VolumeIface+".Check", 0, noOptions()).Store(&result); err != nil {
		t.Fatal(err)
	}
	if result["clean"].Value() != false || result["leaks"].Value() != uint64(1) || result["total-clusters"].Value() != uint64(16) {
		t.Errorf("Check result: %v", result)
	}

	if err := h.client.Object(BusName, vol).Call(VolumeIface+".Delete", 0, noOptions()).Err; err != nil {
		t.Fatal(err)
	}
	waitSignal(t, sigs, ManagerPath, ObjectManagerIface+".InterfacesRemoved", func(s *dbus.Signal) bool { return s.Body[0] == vol })
	err = h.client.Object(BusName, vol).Call(VolumeIface+".Delete", 0, noOptions()).Err
	if !strings.Contains(err.Error(), "No such object") {
		t.Errorf("Delete of a deleted volume: %v", err)
	}

	if err := h.call(ManagerPath, ManagerIface+".Rescan", noOptions()).Err; err != nil {
		t.Fatal(err)
	}
}

func TestImportJobLifeCycle(t *testing.T) {
	h := startServer(t, false)
	h.fake.mu.Lock() // the import goroutine reads it; the bus gives no happens-before the race detector sees
	h.fake.importStep = make(chan struct{})
	h.fake.mu.Unlock()
	sigs := h.signals(t)
	src := filepath.Join(t.TempDir(), "src.raw")
	content := bytes.Repeat([]byte("volagent"), 512) // 4 KiB: 4 steps
	os.WriteFile(src, content, 0o644)
	f, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	var job dbus.ObjectPath
	err = h.call(ManagerPath, ManagerIface+".Import", "fast", "base1", dbus.UnixFD(f.Fd()), "raw", noOptions()).Store(&job)
	if err != nil {
		t.Fatal(err)
	}
	if job != JobPath(1) {
		t.Fatalf("Import returned %s", job)
	}
	var uid uint32
	var state string
	h.client.Object(BusName, job).StoreProperty(JobIface+".StartedByUID", &uid)
	h.client.Object(BusName, job).StoreProperty(JobIface+".State", &state)
	if uid != 0 || state != "running" {
		t.Errorf("job: StartedByUID %d State %q", uid, state)
	}
	for i := 0; i < 4; i++ {
		h.fake.importStep <- struct{}{}
		want := float64(i+1) / 4
		waitSignal(t, sigs, job, PropertiesIface+".PropertiesChanged", func(s *dbus.Signal) bool {
			v, ok := s.Body[1].(map[string]dbus.Variant)["Progress"]
			return ok && v.Value() == want
		})
	}
	done := waitSignal(t, sigs, job, JobIface+".Completed", nil)
	if done.Body[0] != true || done.Body[1] != "" {
		t.Errorf("Completed%v", done.Body)
	}
	h.fake.mu.Lock()
	got := h.fake.jobs[1].data
	h.fake.mu.Unlock()
	if !bytes.Equal(got, content) {
		t.Errorf("the backend read %d bytes through the descriptor, want the %d of the file", len(got), len(content))
	}
	// The ended job stays, for clients that look late.
	h.client.Object(BusName, job).StoreProperty(JobIface+".State", &state)
	if state != "succeeded" {
		t.Errorf("State after completion: %q", state)
	}

	// Cancel a second import.
	g, _ := os.Open(src)
	defer g.Close()
	if err := h.call(ManagerPath, ManagerIface+".Import", "fast", "base2", dbus.UnixFD(g.Fd()), "raw", noOptions()).Store(&job); err != nil {
		t.Fatal(err)
	}
	if err := h.client.Object(BusName, job).Call(JobIface+".Cancel", 0, noOptions()).Err; err != nil {
		t.Fatal(err)
	}
	done = waitSignal(t, sigs, job, JobIface+".Completed", nil)
	if done.Body[0] != false || !strings.Contains(done.Body[1].(string), "cancelled") {
		t.Errorf("Completed%v after Cancel", done.Body)
	}
}

func TestInspectOverTheBus(t *testing.T) {
	h := startServer(t, false)
	img := filepath.Join(t.TempDir(), "hostile.raw")
	// A raw disk that starts with a qcow2 header is refused.
	os.WriteFile(img, append([]byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, 4088)...), 0o644)
	f, _ := os.Open(img)
	defer f.Close()
	var report string
	err := h.call(ManagerPath, ManagerIface+".Inspect", dbus.UnixFD(f.Fd()), "raw", map[string]dbus.Variant{"name": dbus.MakeVariant("disk.raw")}).Store(&report)
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Path    string `json:"path"`
		Verdict string `json:"verdict"`
	}
	if err := json.Unmarshal([]byte(report), &rep); err != nil || rep.Verdict != "refused" || rep.Path != "disk.raw" {
		t.Errorf("report %s (%v)", report, err)
	}
	// Open to everyone: this test binary, run again as nobody, calls it
	// (busctl cannot pass file descriptors).
	out := runAsNobody(t, h.bus, "inspect", img)
	if !strings.Contains(out, `"verdict":"refused"`) {
		t.Errorf("Inspect as nobody: %s", out)
	}
	// A pipe cannot be inspected at offsets.
	r, w, _ := os.Pipe()
	defer r.Close()
	defer w.Close()
	err = h.call(ManagerPath, ManagerIface+".Inspect", dbus.UnixFD(r.Fd()), "raw", noOptions()).Err
	wantError(t, err, ErrorInvalidArgument, "pipe")
}

func TestBadArguments(t *testing.T) {
	h := startServer(t, false)
	create := func(pool, name, backing, format string, size uint64, opts map[string]dbus.Variant) error {
		return h.call(ManagerPath, ManagerIface+".CreateOverlay", pool, name, backing, format, size, opts).Err
	}
	cases := []struct {
		what, err, mention string
		call               func() error
	}{
		{"traversal in name", ErrorInvalidArgument, "../etc", func() error { return create("fast", "../etc", "/b.raw", "raw", 0, noOptions()) }},
		{"slash in name", ErrorInvalidArgument, "a/b", func() error { return create("fast", "a/b", "/b.raw", "raw", 0, noOptions()) }},
		{"LVM reserved name", ErrorInvalidArgument, "_mlog", func() error { return create("fast", "x_mlog", "/b.raw", "raw", 0, noOptions()) }},
		{"relative backing", ErrorInvalidArgument, "not an absolute path", func() error { return create("fast", "v", "b.raw", "raw", 0, noOptions()) }},
		{"unclean backing", ErrorInvalidArgument, "clean", func() error { return create("fast", "v", "/images/../etc/shadow", "raw", 0, noOptions()) }},
		{"guessed format", ErrorInvalidArgument, "never guessed", func() error { return create("fast", "v", "/b.raw", "", 0, noOptions()) }},
		{"unknown option", ErrorInvalidArgument, "clustersize", func() error {
			return create("fast", "v", "/b.raw", "raw", 0, map[string]dbus.Variant{"clustersize": dbus.MakeVariant(uint32(1))})
		}},
		{"option type", ErrorInvalidArgument, "cluster-size", func() error {
			return create("fast", "v", "/b.raw", "raw", 0, map[string]dbus.Variant{"cluster-size": dbus.MakeVariant("64k")})
		}},
		{"huge size", ErrorInvalidArgument, "too large", func() error { return create("fast", "v", "/b.raw", "raw", 1<<63, noOptions()) }},
		{"missing pool", ErrorNotFound, "nope", func() error { return create("nope", "v", "/b.raw", "raw", 0, noOptions()) }},
		{"missing backing volume", ErrorNotFound, "does not exist", func() error { return create("fast", "v", string(VolumePath("0123")), "", 0, noOptions()) }},
		{"wrong signature", "org.freedesktop.DBus.Error.InvalidArgs", "(ssssta{sv})", func() error {
			return h.call(ManagerPath, ManagerIface+".CreateOverlay", "fast", "v").Err
		}},
		{"unknown method", "org.freedesktop.DBus.Error.UnknownMethod", "Format", func() error {
			return h.call(ManagerPath, ManagerIface+".Format", noOptions()).Err
		}},
	}
	for _, c := range cases {
		t.Run(c.what, func(t *testing.T) { wantError(t, c.call(), c.err, c.mention) })
	}
	// Nothing bad reached the backend's state.
	if v := h.fake.Volumes(); len(v) != 0 {
		t.Errorf("volumes after bad calls: %v", v)
	}
}

func TestBackendErrorKinds(t *testing.T) {
	h := startServer(t, false)
	for _, k := range errorKinds {
		h.fake.mu.Lock()
		h.fake.failWith = fmt.Errorf("%w: pool \"fast\" has 1 GiB free, the overlay needs 2 GiB", k.kind)
		h.fake.mu.Unlock()
		err := h.call(ManagerPath, ManagerIface+".Rescan", noOptions()).Err
		wantError(t, err, k.name, "needs 2 GiB")
	}
}

// The bus policy refuses a non-root caller before the daemon sees the call.
func TestNonRootRefusedByBusPolicy(t *testing.T) {
	h := startServer(t, false)
	_, errOut, err := h.bus.Busctl(t, dbustest.NobodyUID, "call", BusName, string(ManagerPath), ManagerIface, "CreateOverlay",
		"ssssta{sv}", "fast", "evil", "/b.raw", "raw", "0", "0")
	if err == nil || !strings.Contains(errOut, "Access denied") {
		t.Errorf("CreateOverlay as nobody: %v %s", err, errOut)
	}
	// Reads stay open.
	out, errOut, err := h.bus.Busctl(t, dbustest.NobodyUID, "get-property", BusName, string(ManagerPath), ManagerIface, "Version")
	if err != nil || !strings.Contains(out, "test-1") {
		t.Errorf("reading as nobody: %v %s", err, errOut)
	}
	if _, errOut, err := h.bus.Busctl(t, dbustest.NobodyUID, "call", BusName, string(ManagerPath), ObjectManagerIface, "GetManagedObjects"); err != nil {
		t.Errorf("GetManagedObjects as nobody: %v %s", err, errOut)
	}
	if n := h.fake.mutatingCalls(); n != 0 {
		t.Errorf("%d calls reached the backend", n)
	}
}

// With a bus that lets everyone call, the daemon's own check refuses.
func TestNonRootRefusedByDaemon(t *testing.T) {
	h := startServer(t, true)
	calls := [][]string{
		{string(ManagerPath), ManagerIface, "CreateOverlay", "ssssta{sv}", "fast", "evil", "/b.raw", "raw", "0", "0"},
		{string(ManagerPath), ManagerIface, "Rescan", "a{sv}", "0"},
	}
	for _, c := range calls {
		_, errOut, err := h.bus.Busctl(t, dbustest.NobodyUID, append([]string{"call", BusName}, c...)...)
		if err == nil || !strings.Contains(errOut, "only root and members of group") {
			t.Errorf("%s as nobody on an open bus: %v %s", c[2], err, errOut)
		}
	}
	if n := h.fake.mutatingCalls(); n != 0 {
		t.Errorf("%d refused calls reached the backend", n)
	}
	if v := h.fake.Volumes(); len(v) != 0 {
		t.Errorf("state changed: %v", v)
	}
	// Root passes the same check.
	if _, errOut, err := h.bus.Busctl(t, 0, append([]string{"call", BusName}, calls[1]...)...); err != nil {
		t.Errorf("Rescan as root: %v %s", err, errOut)
	}
}

func TestEscapePathElement(t *testing.T) {
	for in, want := range map[string]string{"fast": "fast", "my-pool_1": "my_2dpool_5f1", "": "_", "a.b": "a_2eb"} {
		if got := EscapePathElement(in); got != want {
			t.Errorf("EscapePathElement(%q) = %q, want %q", in, got, want)
		}
		if !dbus.ObjectPath("/x/" + EscapePathElement(in)).IsValid() {
			t.Errorf("%q: invalid path element", in)
		}
	}
}
