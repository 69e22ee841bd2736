package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/dbusapi/dbustest"
	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/testutil"
)

const busPolicyFile = "../../packaging/dbus/org.volagent.VolAgent1.conf"

// serveEnv is a private bus, a pool configuration and the directories
// behind it, for `volagentd` processes.
type serveEnv struct {
	t      *testing.T
	bus    *dbustest.Bus
	dir    string // O_DIRECT-capable, removed at cleanup
	images string // the pools' backing root
	pool   string // the loop pool's directory
	vg     string // the LVM pool's volume group, when there is one
	pv     string
	config string
}

// newServeEnv makes a loop pool "fast" (and, with lvm, an LVM pool "thick"
// on a loop physical volume, activated by loop devices: this machine has
// no working device-mapper for LVs) and a private bus with the real bus
// policy (plus one letting everyone call, with allowAll).
func newServeEnv(t *testing.T, lvm, allowAll bool) *serveEnv {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "dbus-daemon", "busctl", "setpriv", "qemu-img")
	e := &serveEnv{t: t, dir: directIOTempDir(t)}
	e.images = filepath.Join(e.dir, "images")
	e.pool = filepath.Join(e.dir, "pool")
	os.Mkdir(e.images, 0o755)
	// The bus is started after the directory, so it stops first.
	e.bus = dbustest.Start(t, dbustest.Options{Policies: []string{busPolicyFile}, AllowAll: allowAll})
	cfg := fmt.Sprintf(`# test configuration
[[pool]]
name = "fast"
type = "loop"
directory = %q
backing_roots = [%q]
initial_size = "4M"
chunk_size = "4M"
`, e.pool, e.images)
	if lvm {
		testutil.RequireTool(t, "lvm")
		e.vg, e.pv = newLoopVG(t, e.dir)
		cfg += fmt.Sprintf(`
[[pool]]
name = "thick"
type = "lvm"
volume_group = %q
activation = "loop"
backing_roots = [%q]
initial_size = "4M"
chunk_size = "4M"
`, e.vg, e.images)
	}
	e.config = filepath.Join(e.dir, "volagent.toml")
	if err := os.WriteFile(e.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return e
}

// directIOTempDir is a directory on a file system that supports O_DIRECT
// (loop devices use direct I/O); every loop device over a file in it is
// detached at cleanup.
func directIOTempDir(t *testing.T) string {
	t.Helper()
	for _, base := range []string{os.TempDir(), "/var/tmp"} {
		dir, err := os.MkdirTemp(base, "volagent-serve-")
		if err != nil {
			continue
		}
		fd, err := unix.Open(filepath.Join(dir, "probe"), unix.O_CREAT|unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0o600)
		if err != nil {
			os.RemoveAll(dir)
			continue
		}
		unix.Close(fd)
		os.Remove(filepath.Join(dir, "probe"))
		os.Chmod(dir, 0o755)
		t.Cleanup(func() {
			detachLoopsUnder(t, dir)
			os.RemoveAll(dir)
		})
		return dir
	}
	t.Fatal("no temporary directory supports O_DIRECT")
	return ""
}

// detachLoopsUnder detaches the loop devices over files under dir, and
// first those stacked on them (loop-activated LVs on a loop PV).
func detachLoopsUnder(t *testing.T, dir string) {
	loops, err := hostblk.LoopDevices()
	if err != nil {
		t.Errorf("cleanup: %v", err)
		return
	}
	for _, l := range loops {
		if !strings.HasPrefix(l.BackingFile, dir+"/") {
			continue
		}
		for _, upper := range loops {
			if upper.BackingFile == l.Path {
				hostblk.DetachLoop(upper.Path)
			}
		}
		if err := hostblk.DetachLoop(l.Path); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	}
}

// newLoopVG makes a volume group on a loop device over a file in dir; it
// is removed at cleanup (before dir's loop devices are detached).
func newLoopVG(t *testing.T, dir string) (vg, pv string) {
	t.Helper()
	file := filepath.Join(dir, "pv.img")
	os.WriteFile(file, nil, 0o600)
	if err := os.Truncate(file, 2<<30); err != nil {
		t.Fatal(err)
	}
	loop, err := hostblk.AttachLoop(file, hostblk.LoopOptions{SectorSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	vg = fmt.Sprintf("vst%d", os.Getpid())
	lvm := &hostblk.LVM{NoDeviceMapper: true, Devices: []string{loop.Path}}
	t.Cleanup(func() {
		detachLoopsUnder(t, loop.Path) // nothing; stacked loops go with dir
		for _, l := range mustLoops(t) {
			if l.BackingFile == loop.Path {
				hostblk.DetachLoop(l.Path)
			}
		}
		lvm.Run(context.Background(), "vgremove", "-ff", "-y", vg)
		lvm.Run(context.Background(), "pvremove", "-ff", "-y", loop.Path)
		hostblk.DetachLoop(loop.Path)
	})
	if _, err := lvm.Run(context.Background(), "pvcreate", "-y", loop.Path); err != nil {
		t.Fatalf("pvcreate: %v", err)
	}
	if _, err := lvm.Run(context.Background(), "vgcreate", "-y", "-s", "4m", vg, loop.Path); err != nil {
		t.Fatalf("vgcreate: %v", err)
	}
	return vg, loop.Path
}

func mustLoops(t *testing.T) []hostblk.LoopDevice {
	l, err := hostblk.LoopDevices()
	if err != nil {
		t.Errorf("listing loop devices: %v", err)
	}
	return l
}

// daemon is one `volagentd` process.
type daemon struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
	notify chan string // every notify message, in order
	exited chan struct{}
	code   int
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitFor returns what was written once it contains want, polling: a
// daemon logs after it signals, and its stderr reaches the buffer through
// a pipe. It fails the test after 30 s.
func (s *syncBuffer) waitFor(t *testing.T, want string) string {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		got := s.String()
		if strings.Contains(got, want) {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q written in 30 s:\n%s", want, got)
		}
	}
}

// startDaemon starts `volagentd` on the env's bus with a notify
// socket of its own, and extra environment; it is killed at cleanup if
// still running. It does not wait for READY=1 (see waitReady).
func (e *serveEnv) startDaemon(env ...string) *daemon {
	t := e.t
	t.Helper()
	sock := filepath.Join(t.TempDir(), "notify")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{stderr: &syncBuffer{}, notify: make(chan string, 100), exited: make(chan struct{})}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := ln.Read(buf)
			if err != nil {
				return
			}
			d.notify <- string(buf[:n])
		}
	}()
	d.cmd = exec.Command(daemonUnderTest(t), "--config", e.config, "--bus-address", e.bus.Address)
	d.cmd.Env = append(os.Environ(), append([]string{"NOTIFY_SOCKET=" + sock}, env...)...)
	d.cmd.Stderr = d.stderr
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		d.cmd.Wait()
		d.code = d.cmd.ProcessState.ExitCode()
		ln.Close()
		close(d.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			d.cmd.Process.Kill()
			<-d.exited
		}
		if t.Failed() {
			t.Logf("volagentd stderr:\n%s", d.stderr.String())
		}
	})
	return d
}

// nextNotify returns the next notify message, failing after timeout.
func (d *daemon) nextNotify(t *testing.T, timeout time.Duration) string {
	t.Helper()
	select {
	case m := <-d.notify:
		return m
	case <-d.exited:
		t.Fatalf("volagentd exited (%d) instead of notifying:\n%s", d.code, d.stderr.String())
	case <-time.After(timeout):
		t.Fatalf("no notify message within %v; stderr:\n%s", timeout, d.stderr.String())
	}
	return ""
}

// waitReady waits for READY=1 and returns every message up to it.
func (d *daemon) waitReady(t *testing.T) []string {
	t.Helper()
	var msgs []string
	for {
		m := d.nextNotify(t, 60*time.Second)
		msgs = append(msgs, m)
		if strings.Contains(m, "READY=1") {
			return msgs
		}
	}
}

// stop sends SIGTERM and returns the exit status.
func (d *daemon) stop(t *testing.T) int {
	t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(60 * time.Second):
		t.Fatalf("volagentd did not stop within 60s of SIGTERM:\n%s", d.stderr.String())
	}
	return d.code
}

func (d *daemon) kill(t *testing.T) {
	t.Helper()
	d.cmd.Process.Kill()
	<-d.exited
}

// cli runs a client subcommand against the env's bus.
func (e *serveEnv) cli(args ...string) (string, string, int) {
	e.t.Helper()
	return runVolagent(e.t, append(args, "--bus-address", e.bus.Address)...)
}

// volumes returns the daemon's volumes as `volagent volumes --json` does.
func (e *serveEnv) volumes() []volumeJSON {
	e.t.Helper()
	out, errOut, code := e.cli("volumes", "--json")
	if code != 0 {
		e.t.Fatalf("volagent volumes: %d %s", code, errOut)
	}
	var vols []volumeJSON
	if err := json.Unmarshal([]byte(out), &vols); err != nil {
		e.t.Fatalf("volumes --json: %v\n%s", err, out)
	}
	return vols
}

// writeImage writes a raw image of size bytes (random data in the first
// dataBytes) under the backing root.
func (e *serveEnv) writeImage(name string, size, dataBytes int64) string {
	e.t.Helper()
	p := filepath.Join(e.images, name)
	f, err := os.Create(p)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		e.t.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	rand.Read(chunk)
	for off := int64(0); off < dataBytes; off += int64(len(chunk)) {
		chunk[0]++ // no two chunks alike
		if _, err := f.WriteAt(chunk[:min(int64(len(chunk)), dataBytes-off)], off); err != nil {
			e.t.Fatal(err)
		}
	}
	return p
}

// writeSlowImage writes a sparse raw image of size bytes with one non-zero
// byte in every 64 KiB (the cluster size of an imported volume): an import
// must copy every cluster, so at ~2 GB/s a 16 GiB source takes seconds,
// yet the file allocates only one 4 KiB block per cluster. Tests that
// interrupt an import use it, so the import cannot finish first.
func (e *serveEnv) writeSlowImage(name string, size int64) string {
	e.t.Helper()
	p := filepath.Join(e.images, name)
	f, err := os.Create(p)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		e.t.Fatal(err)
	}
	for off := int64(0); off < size; off += 64 << 10 {
		// At byte 511 of each cluster: the source then starts with
		// zeros, which no image header does (import would refuse it).
		if _, err := f.WriteAt([]byte{0xa5}, off+511); err != nil {
			e.t.Fatal(err)
		}
	}
	return p
}

// poolFiles lists the loop pool's volume files.
func (e *serveEnv) poolFiles() []string {
	entries, _ := os.ReadDir(e.pool)
	var names []string
	for _, de := range entries {
		names = append(names, de.Name())
	}
	sort.Strings(names)
	return names
}

// lvs lists the LVM pool's logical volumes.
func (e *serveEnv) lvs() []string {
	e.t.Helper()
	lvm := &hostblk.LVM{NoDeviceMapper: true, Devices: []string{e.pv}}
	list, err := lvm.LogicalVolumes(context.Background(), e.vg)
	if err != nil {
		e.t.Fatal(err)
	}
	var names []string
	for _, lv := range list {
		names = append(names, lv.Name)
	}
	sort.Strings(names)
	return names
}

func TestServeBadConfigNamesTheKey(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ config, mention string }{
		{"[[pool]]\nname = \"fast\"\ntype = \"loop\"\ndirectory = \"relative/dir\"\n", "directory"},
		{"[[pool]]\nname = \"fast\"\ntype = \"loop\"\ndirectroy = \"/x\"\n", "directroy"},
		{"[[pool]]\nname = \"fast\"\ntype = \"lvm\"\nvolume_group = \"vg0\"\n", "activation"},
	} {
		path := filepath.Join(dir, "volagent.toml")
		os.WriteFile(path, []byte(c.config), 0o644)
		_, stderr, code := runDaemon(t, "--config", path, "--bus-address", "unix:path=/nonexistent")
		if code != exitFailure || !strings.Contains(stderr, c.mention) {
			t.Errorf("config %q: exit %d, stderr %q; want 2 naming %q", c.config, code, stderr, c.mention)
		}
	}
	_, stderr, code := runDaemon(t, "--config", filepath.Join(dir, "missing.toml"))
	if code != exitFailure || !strings.Contains(stderr, "missing.toml") {
		t.Errorf("missing config: exit %d, stderr %q", code, stderr)
	}
}

// The daemon's whole life on a loop pool: notify protocol, the API over
// busctl and the Go client, the client subcommands, signals, refusals,
// and a clean stop.
func TestServeLoopPool(t *testing.T) {
	e := newServeEnv(t, false, false)
	base := e.writeImage("base.raw", 64<<20, 8<<20)
	d := e.startDaemon("WATCHDOG_USEC=400000")
	msgs := d.waitReady(t)
	if !strings.Contains(msgs[0], "STATUS=reading") {
		t.Errorf("first notify message %q; want a STATUS= while reading the configuration", msgs[0])
	}
	ready := msgs[len(msgs)-1]
	if !strings.Contains(ready, "STATUS=serving 1 of 1 pool(s), 0 volume(s)") {
		t.Errorf("READY message %q lacks the status", ready)
	}
	if m := d.nextNotify(t, 5*time.Second); m != "WATCHDOG=1" {
		t.Errorf("after READY: %q, want WATCHDOG=1", m)
	}

	// Introspection and the tree, as busctl sees them.
	tree := e.bus.MustBusctl(t, "tree", "--list", dbusapi.BusName)
	if !strings.Contains(tree, string(dbusapi.PoolPath("fast"))) {
		t.Errorf("busctl tree:\n%s", tree)
	}
	intro := e.bus.MustBusctl(t, "introspect", dbusapi.BusName, string(dbusapi.ManagerPath))
	for _, want := range []string{".CreateOverlay", "ssssta{sv}", ".Import", "sshsa{sv}", ".Inspect", ".Rescan", ".Pools", "GetManagedObjects", "InterfacesAdded"} {
		if !strings.Contains(intro, want) {
			t.Errorf("introspection lacks %q:\n%s", want, intro)
		}
	}
	out := e.bus.MustBusctl(t, "get-property", dbusapi.BusName, string(dbusapi.PoolPath("fast")), dbusapi.PoolIface, "Type", "PolicyMode")
	if out != "s \"loop\"\ns \"enforce\"\n" {
		t.Errorf("pool properties: %q", out)
	}

	// Signals: busctl monitor sees InterfacesAdded for the new volume.
	monitor := exec.Command("busctl", "--address="+e.bus.Address, "monitor", "--json=short", dbusapi.BusName)
	var monOut syncBuffer
	monitor.Stdout = &monOut
	if err := monitor.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { monitor.Process.Kill(); monitor.Wait() })
	// The monitor has attached once it shows a call made after it started:
	// ping the daemon until a Ping appears in its output.
	pinger := e.bus.Connect(t)
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(monOut.String(), `"member":"Ping"`); {
		if time.Now().After(deadline) {
			t.Fatalf("busctl monitor shows no Ping after 30s of pinging; output:\n%s", monOut.String())
		}
		if err := pinger.Object(dbusapi.BusName, dbusapi.ManagerPath).Call("org.freedesktop.DBus.Peer.Ping", 0).Err; err != nil {
			t.Fatalf("Ping: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // pacing between polls, not a wait for the monitor
	}

	// overlay create over a file, through the client subcommand.
	out, errOut, code := e.cli("overlay", "create", "--pool", "fast", "--name", "vm1", "--backing", base, "--backing-format", "raw", "--json")
	if code != 0 {
		t.Fatalf("overlay create: %d %s", code, errOut)
	}
	var vm1 volumeJSON
	if err := json.Unmarshal([]byte(out), &vm1); err != nil {
		t.Fatal(err)
	}
	if vm1.BackingName != base || vm1.BackingFormat != "raw" || vm1.Format != "qcow2" || vm1.VirtualSize != 64<<20 || vm1.Role != "overlay" {
		t.Errorf("overlay create: %+v", vm1)
	}
	// qemu agrees about what was recorded.
	info := testutil.QemuImg(t, "info", "--output=json", "-f", "qcow2", vm1.DevicePath)
	if !bytes.Contains(info, []byte(`"backing-filename-format": "raw"`)) {
		t.Errorf("qemu-img info:\n%s", info)
	}

	// Import through the daemon, with its job watched to the end.
	src := e.writeImage("src.raw", 32<<20, 16<<20)
	out, errOut, code = e.cli("volumes", "import", "--pool", "fast", "--name", "base1", src, "--json")
	if code != 0 {
		t.Fatalf("volumes import: %d %s\n%s", code, errOut, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var last jobJSON
	json.Unmarshal([]byte(lines[len(lines)-1]), &last)
	if last.State != "succeeded" || last.Operation != "import" || last.StartedBy != 0 {
		t.Errorf("import's last progress line: %s", lines[len(lines)-1])
	}
	// The imported volume reads back as the source.
	vols := e.volumes()
	var base1 volumeJSON
	for _, v := range vols {
		if v.Name == "base1" {
			base1 = v
		}
	}
	if base1.Role != "base" {
		t.Fatalf("volumes after import: %+v", vols)
	}
	got := testutil.QemuGuestBytes(t, base1.Format, base1.DevicePath)
	want, _ := os.ReadFile(src)
	if !bytes.Equal(got, want) {
		t.Errorf("imported volume differs from the source")
	}

	// jobs lists the finished job.
	out, errOut, code = e.cli("jobs", "--json")
	if code != 0 || !strings.Contains(out, `"state": "succeeded"`) {
		t.Errorf("jobs: %d %s %s", code, out, errOut)
	}
	out, errOut, code = e.cli("jobs", "--watch")
	if code != 0 || !strings.Contains(errOut, "no running jobs") {
		t.Errorf("jobs --watch with nothing running: %d %q %q", code, out, errOut)
	}

	// An overlay over a managed volume, by name.
	out, errOut, code = e.cli("overlay", "create", "--pool", "fast", "--name", "vm2", "--backing-volume", "fast/base1")
	if code != 0 || !strings.Contains(out, "created fast/vm2") {
		t.Fatalf("overlay create --backing-volume: %d %s %s", code, out, errOut)
	}

	// Volume methods over busctl.
	vm1Path := dbusapi.VolumePath(vm1.ID)
	e.bus.MustBusctl(t, "call", dbusapi.BusName, string(vm1Path), dbusapi.VolumeIface, "Resize", "ta{sv}", "134217728", "0")
	out = e.bus.MustBusctl(t, "get-property", dbusapi.BusName, string(vm1Path), dbusapi.VolumeIface, "VirtualSize")
	if out != "t 134217728\n" {
		t.Errorf("VirtualSize after Resize: %q", out)
	}
	e.bus.MustBusctl(t, "call", dbusapi.BusName, string(vm1Path), dbusapi.VolumeIface, "Write", "taya{sv}", "65536", "3", "1", "2", "3", "0")
	out = e.bus.MustBusctl(t, "call", dbusapi.BusName, string(vm1Path), dbusapi.VolumeIface, "Check", "a{sv}", "0")
	if !strings.Contains(out, `"clean" b true`) {
		t.Errorf("Check: %s", out)
	}
	// Inspect of the volume's device, through the Go client (fd passing).
	conn := e.bus.Connect(t)
	dev, err := os.Open(vm1.DevicePath)
	if err != nil {
		t.Fatal(err)
	}
	var report string
	err = conn.Object(dbusapi.BusName, dbusapi.ManagerPath).Call(dbusapi.ManagerIface+".Inspect", 0, dbus.UnixFD(dev.Fd()), "qcow2", map[string]dbus.Variant{}).Store(&report)
	dev.Close()
	if err != nil || !strings.Contains(report, `"verdict":"accepted"`) || !strings.Contains(report, `"backing-format":"raw"`) {
		t.Errorf("Inspect: %v %s", err, report)
	}
	e.bus.MustBusctl(t, "call", dbusapi.BusName, string(dbusapi.ManagerPath), dbusapi.ManagerIface, "Rescan", "a{sv}", "0")

	// A non-root caller is refused by the bus, and nothing changes.
	before := e.volumes()
	_, errOut, err = e.bus.Busctl(t, dbustest.NobodyUID, "call", dbusapi.BusName, string(vm1Path), dbusapi.VolumeIface, "Delete", "a{sv}", "0")
	if err == nil || !strings.Contains(errOut, "Access denied") {
		t.Errorf("Delete as nobody: %v %s", err, errOut)
	}
	nobody := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", binaryUnderTest(t),
		"overlay", "create", "--pool", "fast", "--name", "evil", "--backing", base, "--backing-format", "raw", "--bus-address", e.bus.Address)
	nobodyOut, err := nobody.CombinedOutput()
	if nobody.ProcessState.ExitCode() != exitFailure || !strings.Contains(string(nobodyOut), "refused") {
		t.Errorf("overlay create as nobody: %v %s", err, nobodyOut)
	}
	if after := e.volumes(); len(after) != len(before) {
		t.Errorf("a refused call changed the volumes: %d, then %d", len(before), len(after))
	}

	// Bad arguments are refused with a message naming them.
	_, errOut, code = e.cli("overlay", "create", "--pool", "fast", "--name", "../etc", "--backing", base, "--backing-format", "raw")
	if code != exitFailure || !strings.Contains(errOut, "../etc") || !strings.Contains(errOut, "InvalidArgument") {
		t.Errorf("bad name: %d %s", code, errOut)
	}
	_, errOut, code = e.cli("overlay", "create", "--pool", "fast", "--name", "x", "--backing", "/etc/passwd", "--backing-format", "raw")
	if code == 0 {
		t.Errorf("a backing outside the roots was accepted")
	} else if !strings.HasSuffix(strings.TrimSpace(errOut), "[codes: not-allowed]") {
		t.Errorf("a backing outside the roots: the error does not end with its code: %s", errOut)
	}
	// A refusal carries the violations' codes to a D-Bus caller, for busctl
	// and godbus alike, and dbusapi.ViolationCodes reads them.
	dataFile := e.writeImage("external.raw", 1<<20, 0)
	withDataFile := filepath.Join(e.images, "datafile.qcow2")
	testutil.MakeQcow2(t, withDataFile, "data_file="+dataFile, "1M", "", "")
	_, errOut, err = e.bus.Busctl(t, 0, "call", dbusapi.BusName, string(dbusapi.ManagerPath), dbusapi.ManagerIface,
		"CreateOverlay", "ssssta{sv}", "fast", "df", withDataFile, "qcow2", "0", "0")
	if err == nil || !strings.Contains(errOut, "[codes: data-file]") {
		t.Errorf("busctl CreateOverlay over a data-file image: %v %s", err, errOut)
	}
	call := conn.Object(dbusapi.BusName, dbusapi.ManagerPath).Call(dbusapi.ManagerIface+".CreateOverlay", 0,
		"fast", "df", withDataFile, "qcow2", uint64(0), map[string]dbus.Variant{})
	if codes := dbusapi.ViolationCodes(call.Err); len(codes) != 1 || codes[0] != "data-file" {
		t.Errorf("CreateOverlay over a data-file image: %v; codes %q, want [data-file]", call.Err, codes)
	}
	_, errOut, code = e.cli("overlay", "create", "--pool", "nope", "--name", "x", "--backing", base, "--backing-format", "raw")
	if code != exitFailure || !strings.Contains(errOut, "NotFound") {
		t.Errorf("missing pool: %d %s", code, errOut)
	}

	// Delete, seen as InterfacesRemoved by the monitor.
	e.bus.MustBusctl(t, "call", dbusapi.BusName, string(dbusapi.VolumePath(findByName(t, e.volumes(), "vm2").ID)), dbusapi.VolumeIface, "Delete", "a{sv}", "0")
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(monOut.String(), "InterfacesRemoved") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	for _, sig := range []string{"InterfacesAdded", "InterfacesRemoved", "PropertiesChanged", "Completed"} {
		if !strings.Contains(monOut.String(), `"member":"`+sig+`"`) {
			t.Errorf("busctl monitor saw no %s signal", sig)
		}
	}

	// A second daemon cannot take the name.
	second := e.startDaemon()
	select {
	case <-second.exited:
		if second.code != exitFailure || !strings.Contains(second.stderr.String(), "already owned") {
			t.Errorf("second daemon: exit %d: %s", second.code, second.stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("a second daemon kept running")
	}

	// SIGTERM: STOPPING=1, exit 0.
	if code := d.stop(t); code != 0 {
		t.Errorf("exit status after SIGTERM: %d\n%s", code, d.stderr.String())
	}
	var stopping bool
	for len(d.notify) > 0 {
		if m := <-d.notify; strings.Contains(m, "STOPPING=1") {
			stopping = true
		}
	}
	if !stopping {
		t.Error("no STOPPING=1 on the notify socket")
	}
}

func findByName(t *testing.T, vols []volumeJSON, name string) volumeJSON {
	t.Helper()
	for _, v := range vols {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("no volume %q in %+v", name, vols)
	return volumeJSON{}
}

// jobProps reads a job's properties.
func jobProps(t *testing.T, conn *dbus.Conn, job dbus.ObjectPath) jobJSON {
	t.Helper()
	var props map[string]dbus.Variant
	if err := conn.Object(dbusapi.BusName, job).Call(dbusapi.PropertiesIface+".GetAll", 0, dbusapi.JobIface).Store(&props); err != nil {
		t.Fatalf("job %s: %v", job, err)
	}
	return jobFromProps(objectProps{path: job, props: props})
}

// startImport starts an import of src into pool through the Go client and
// waits until the job has copied something.
func startImport(t *testing.T, conn *dbus.Conn, pool, name, src string) dbus.ObjectPath {
	t.Helper()
	f, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var job dbus.ObjectPath
	err = conn.Object(dbusapi.BusName, dbusapi.ManagerPath).Call(dbusapi.ManagerIface+".Import", 0,
		pool, name, dbus.UnixFD(f.Fd()), "raw", map[string]dbus.Variant{}).Store(&job)
	if err != nil {
		t.Fatalf("Import: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		j := jobProps(t, conn, job)
		if j.State != "running" {
			t.Fatalf("the import ended (%s: %s) before the test could interrupt it; make the source larger", j.State, j.Message)
		}
		if j.Bytes > 0 {
			return job
		}
		if time.Now().After(deadline) {
			t.Fatal("the import made no progress in 30s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// assertWhole checks that what the pools hold is exactly the listed
// volumes, each a sound image: no leaked file, LV or loop device, and no
// half-made volume listed.
func (e *serveEnv) assertWhole(vols []volumeJSON) {
	t := e.t
	t.Helper()
	byPool := map[string][]volumeJSON{}
	devices := map[string]bool{}
	for _, v := range vols {
		byPool[v.Pool] = append(byPool[v.Pool], v)
		devices[v.DevicePath] = true
		if v.Format == "qcow2" {
			testutil.QemuImg(t, "check", "-q", "-f", "qcow2", v.DevicePath)
		}
	}
	var wantFiles []string
	for _, v := range byPool["fast"] {
		wantFiles = append(wantFiles, v.Name+".img")
	}
	sort.Strings(wantFiles)
	if got := e.poolFiles(); strings.Join(got, ",") != strings.Join(wantFiles, ",") {
		t.Errorf("loop pool files %v; the listed volumes want %v", got, wantFiles)
	}
	if e.vg != "" {
		if got := e.lvs(); len(got) != len(byPool["thick"]) {
			t.Errorf("LVs %v; listed LVM volumes %d", got, len(byPool["thick"]))
		}
	}
	for _, l := range mustLoops(t) {
		ours := strings.HasPrefix(l.BackingFile, e.pool+"/") || e.pv != "" && l.BackingFile == e.pv
		if ours && !devices[l.Path] {
			t.Errorf("loop device %s over %s belongs to no listed volume", l.Path, l.BackingFile)
		}
	}
}

// SIGKILL in the middle of an import and of overlay creations, on both
// pool types; after a restart the state is whole.
func TestServeRestartAfterKill(t *testing.T) {
	e := newServeEnv(t, true, false)
	base := e.writeImage("base.raw", 64<<20, 4<<20)
	big := e.writeSlowImage("big.raw", 16<<30)
	d := e.startDaemon()
	d.waitReady(t)
	conn := e.bus.Connect(t)
	for _, pool := range []string{"fast", "thick"} {
		// A complete volume, which must survive every kill.
		if _, errOut, code := e.cli("overlay", "create", "--pool", pool, "--name", "keep", "--backing", base, "--backing-format", "raw"); code != 0 {
			t.Fatalf("overlay create in %s: %s", pool, errOut)
		}
	}

	for _, pool := range []string{"fast", "thick"} {
		startImport(t, conn, pool, "half-imported", big)
		d.kill(t)
		d = e.startDaemon()
		d.waitReady(t)
		vols := e.volumes()
		for _, v := range vols {
			if v.Name == "half-imported" {
				t.Errorf("a killed import left volume %+v listed", v)
			}
		}
		findByName(t, vols, "keep")
		e.assertWhole(vols)
	}

	// Overlay creation killed at different moments.
	for i, delay := range []time.Duration{0, 2 * time.Millisecond, 10 * time.Millisecond, 40 * time.Millisecond, 150 * time.Millisecond} {
		for _, pool := range []string{"fast", "thick"} {
			call := conn.Object(dbusapi.BusName, dbusapi.ManagerPath).Go(dbusapi.ManagerIface+".CreateOverlay", 0, nil,
				pool, fmt.Sprintf("killed%d", i), base, "raw", uint64(0), map[string]dbus.Variant{})
			time.Sleep(delay)
			d.kill(t)
			<-call.Done
			d = e.startDaemon()
			d.waitReady(t)
			e.assertWhole(e.volumes())
		}
	}

	// SIGTERM during an import: the job is cancelled cleanly (a watching
	// client sees it end), the daemon exits 0, nothing half-made remains.
	job := startImport(t, conn, "fast", "cancelled", big)
	watch := exec.Command(binaryUnderTest(t), "jobs", "--watch", "--json", "--bus-address", e.bus.Address, lastElement(string(job)))
	var watchOut syncBuffer
	watch.Stdout, watch.Stderr = &watchOut, &watchOut
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	watchDone := make(chan struct{})
	go func() { watch.Wait(); close(watchDone) }()
	// The watcher prints the job's state once it has subscribed and read
	// it: only then can it see the cancellation.
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(watchOut.String(), `"state":"running"`) {
		select {
		case <-watchDone:
			t.Fatalf("jobs --watch exited before it watched the running job: exit %d\n%s", watch.ProcessState.ExitCode(), watchOut.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("jobs --watch printed no running state in 30s:\n%s", watchOut.String())
		}
	}
	j := jobProps(t, conn, job)
	if j.State != "running" {
		t.Fatalf("the import ended (%s: %s) before SIGTERM; make the source larger", j.State, j.Message)
	}
	t.Logf("SIGTERM with the import at %d of %d bytes", j.Bytes, j.TotalBytes)
	if code := d.stop(t); code != 0 {
		t.Errorf("exit status after SIGTERM with a running job: %d", code)
	}
	<-watchDone
	if watch.ProcessState.ExitCode() != exitFailure || !strings.Contains(watchOut.String(), `"state":"cancelled"`) {
		t.Errorf("jobs --watch of a job cancelled by SIGTERM: exit %d\n%s", watch.ProcessState.ExitCode(), watchOut.String())
	}
	d = e.startDaemon()
	d.waitReady(t)
	vols := e.volumes()
	e.assertWhole(vols)
	if len(vols) < 2 {
		t.Errorf("the complete volumes were lost: %+v", vols)
	}
	d.stop(t)
}

// With a bus policy that lets everyone call, the daemon itself refuses a
// caller that is neither root nor in group volagent.
func TestServeRefusesNonRootOnAnOpenBus(t *testing.T) {
	e := newServeEnv(t, false, true)
	base := e.writeImage("base.raw", 16<<20, 0)
	d := e.startDaemon()
	d.waitReady(t)
	_, errOut, err := e.bus.Busctl(t, dbustest.NobodyUID, "call", dbusapi.BusName, string(dbusapi.ManagerPath), dbusapi.ManagerIface,
		"CreateOverlay", "ssssta{sv}", "fast", "evil", base, "raw", "0", "0")
	if err == nil || !strings.Contains(errOut, "only root and members of group") {
		t.Errorf("CreateOverlay as nobody on an open bus: %v %s", err, errOut)
	}
	if vols := e.volumes(); len(vols) != 0 || len(e.poolFiles()) != 0 {
		t.Errorf("a refused call changed the state: %+v %v", vols, e.poolFiles())
	}
	d.stop(t)
}
