package dbusapi

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/volagent/volagent/internal/hostile"
)

// procStatusKiB reads a "VmRSS:"-like field of /proc/self/status in KiB.
func procStatusKiB(t *testing.T, field string) int64 {
	t.Helper()
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("%s: %q", field, line)
			}
			return n
		}
	}
	t.Fatalf("no %s in /proc/self/status", field)
	return 0
}

// timeInspects calls Inspect on f n times, one after the other, and
// returns the median time of a call; every call must answer.
func timeInspects(t *testing.T, h *harness, f *os.File, format string, n int) time.Duration {
	t.Helper()
	took := make([]time.Duration, n)
	for i := range took {
		start := time.Now()
		var report string
		if err := h.call(ManagerPath, ManagerIface+".Inspect", dbus.UnixFD(f.Fd()), format, noOptions()).Store(&report); err != nil {
			t.Fatalf("Inspect: %v", err)
		}
		took[i] = time.Since(start)
	}
	slices.Sort(took)
	return took[n/2]
}

// TestInspectLoadIsBounded: an unprivileged caller firing 16 Inspect calls
// at once, round after round, on an image built to be as costly as a
// header can be, raises the daemon's peak memory by at most 64 MiB, and a
// normal Inspect from another caller, made while those calls are in
// flight, answers about as fast as when the daemon is idle.
func TestInspectLoadIsBounded(t *testing.T) {
	h := startServer(t, false)
	dir := t.TempDir()
	costly := filepath.Join(dir, "costly.qcow2")
	if err := os.WriteFile(costly, hostile.Costly(), 0o644); err != nil {
		t.Fatal(err)
	}
	normal := filepath.Join(dir, "normal.raw")
	if err := os.WriteFile(normal, make([]byte, 64<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	nf, _ := os.Open(normal)
	defer nf.Close()
	cf, _ := os.Open(costly)
	defer cf.Close()

	runtime.GC()
	rssBefore := procStatusKiB(t, "VmRSS")
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil { // resets VmHWM
		t.Fatalf("resetting the peak RSS: %v", err)
	}

	// Baselines, measured now on this machine: a normal call and one
	// costly call on an idle daemon.
	idle := timeInspects(t, h, nf, "raw", 21)
	oneCostly := timeInspects(t, h, cf, "qcow2", 5)

	helper := nobodyHelper(t, h.bus, "inspect-many", costly)
	stdin, _ := helper.StdinPipe()
	stdout, _ := helper.StdoutPipe()
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); helper.Wait() })
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || lines.Text() != "started" {
		t.Fatalf("helper: %q", lines.Text())
	}
	// Normal calls, one after the other, for as long as the loader needs
	// for 20 rounds of 16 calls: every one is made while costly calls are
	// in flight.
	rounds := make(chan string, 100)
	go func() {
		for lines.Scan() {
			rounds <- lines.Text()
		}
		close(rounds)
	}()
	var took []time.Duration
	var ended string
	for seen := 0; seen < 20; {
		took = append(took, timeInspects(t, h, nf, "raw", 1))
		select {
		case line, ok := <-rounds:
			if !ok {
				t.Fatalf("the loader stopped: %s", ended)
			}
			ended, seen = line, seen+1
		default:
		}
	}
	stdin.Close()
	for line := range rounds {
		ended = line
	}
	slices.Sort(took)
	loaded, loadedP90 := took[len(took)/2], took[len(took)*9/10]
	if err := helper.Wait(); err != nil {
		t.Fatalf("helper: %v (%s)", err, ended)
	}
	peak := procStatusKiB(t, "VmHWM")
	t.Logf("idle normal call %v, one costly call %v, normal call under load: median %v, p90 %v of %d; peak RSS %d MiB over %d MiB before; the costly calls ended %s",
		idle, oneCostly, loaded, loadedP90, len(took), (peak-rssBefore)>>10, rssBefore>>10, ended)

	if !strings.Contains(ended, "map[ok:") {
		t.Fatalf("no costly call was answered, the load measured nothing: %s", ended)
	}
	if growth := (peak - rssBefore) << 10; growth > 64<<20 {
		t.Errorf("16 concurrent costly calls raised the peak RSS by %d MiB; at most 64 MiB", growth>>20)
	}
	// Under load a normal call may wait for the CPU behind the calls that
	// run (at most PerCaller of the loader's, each as long as one costly
	// call), never behind all 16 of them.
	bound := idle + DefaultInspectPerCaller*oneCostly + 20*time.Millisecond
	if loaded > bound {
		t.Errorf("a normal Inspect took %v under load; idle it takes %v, one costly call %v: want at most %v", loaded, idle, oneCostly, bound)
	}
}

// hangFS is a FUSE file system with one file whose reads never answer
// until released: what a hostile caller can pass as a descriptor.
type hangFS struct {
	fs.Inode
	file *hangFile
}

func (r *hangFS) OnAdd(ctx context.Context) {
	r.AddChild("hang.qcow2", r.NewPersistentInode(ctx, r.file, fs.StableAttr{Mode: syscall.S_IFREG}), false)
}

type hangFile struct {
	fs.Inode
	reading chan struct{} // gets a value each time a read arrives
	release chan struct{} // closed: reads fail
}

func (f *hangFile) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = 0o644
	out.Size = 1 << 20
	return 0
}

func (f *hangFile) Open(context.Context, uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (f *hangFile) Read(context.Context, fs.FileHandle, []byte, int64) (fuse.ReadResult, syscall.Errno) {
	select {
	case f.reading <- struct{}{}:
	default:
	}
	<-f.release
	return nil, syscall.EIO
}

var (
	_ fs.NodeGetattrer = (*hangFile)(nil)
	_ fs.NodeOpener    = (*hangFile)(nil)
	_ fs.NodeReader    = (*hangFile)(nil)
	_ fs.NodeOnAdder   = (*hangFS)(nil)
)

// TestInspectHungDescriptor: a descriptor whose reads never answer (a
// FUSE file) fails the call with a timeout, another caller's Inspect
// answers meanwhile, and the hung reads count against their caller's
// turns until they return.
func TestInspectHungDescriptor(t *testing.T) {
	const timeout = time.Second
	h := startServerWith(t, false, InspectLimits{ReadTimeout: timeout})
	mnt := t.TempDir()
	file := &hangFile{reading: make(chan struct{}, 1), release: make(chan struct{})}
	server, err := fs.Mount(mnt, &hangFS{file: file}, &fs.Options{MountOptions: fuse.MountOptions{DirectMount: true, FsName: "volagent-hang"}})
	if err != nil {
		t.Fatalf("mounting a FUSE file system: %v", err)
	}
	var releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(file.release) }) }
	t.Cleanup(func() { release(); server.Unmount() })
	hung, err := os.Open(filepath.Join(mnt, "hang.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	defer hung.Close()

	inspectHung := func() chan error {
		done := make(chan error, 1)
		go func() {
			done <- h.call(ManagerPath, ManagerIface+".Inspect", dbus.UnixFD(hung.Fd()), "qcow2", noOptions()).Err
		}()
		return done
	}
	first := inspectHung()
	select {
	case <-file.reading:
	case err := <-first:
		t.Fatalf("Inspect of the hung file returned before reading it: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the daemon never read the FUSE file")
	}
	// While the read hangs, another caller is answered.
	other := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(other, make([]byte, 4096), 0o644)
	if out := runAsNobody(t, h.bus, "inspect", other); !strings.Contains(out, `"verdict":"accepted"`) {
		t.Errorf("Inspect as nobody while a read hangs: %s", out)
	}
	select {
	case err := <-first:
		wantError(t, err, ErrorFailed, "did not answer in time")
	case <-time.After(timeout + 10*time.Second):
		t.Fatal("Inspect of a hung file did not time out")
	}

	// The hung read still holds its turn: a second hung call takes the
	// caller's other one, and a third is refused at once.
	second := inspectHung()
	select {
	case err := <-second:
		wantError(t, err, ErrorFailed, "did not answer in time")
	case <-time.After(timeout + 10*time.Second):
		t.Fatal("the second Inspect of a hung file did not time out")
	}
	nf, _ := os.Open(other)
	defer nf.Close()
	err = h.call(ManagerPath, ManagerIface+".Inspect", dbus.UnixFD(nf.Fd()), "raw", noOptions()).Err
	wantError(t, err, ErrorBusy, "in flight")

	// Once the reads return, the turns come back.
	release()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := h.call(ManagerPath, ManagerIface+".Inspect", dbus.UnixFD(nf.Fd()), "raw", noOptions()).Err
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Inspect still refused after the hung reads returned: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestInspectGateTurns: PerCaller turns per UID, refused at once past
// them; Global turns in all, waited for up to QueueWait.
func TestInspectGateTurns(t *testing.T) {
	g := newInspectGate(InspectLimits{PerCaller: 1, Global: 2, QueueWait: 200 * time.Millisecond})
	r1, err := g.enter(1000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.enter(1000); err == nil || err.Name != ErrorBusy {
		t.Fatalf("a second turn for UID 1000: %v; want Busy", err)
	}
	r2, err := g.enter(1001)
	if err != nil {
		t.Fatal(err)
	}
	// Every turn is taken: UID 1002 waits QueueWait, then is refused.
	if _, err := g.enter(1002); err == nil || err.Name != ErrorBusy || !strings.Contains(err.Error(), "already inspecting 2") {
		t.Fatalf("a third turn in all: %v; want Busy", err)
	}
	// A turn given back while UID 1002 waits is its.
	got := make(chan *dbus.Error, 1)
	go func() {
		r3, err := g.enter(1002)
		if err == nil {
			r3()
		}
		got <- err
	}()
	r1()
	r1() // releasing twice gives back one turn
	if err := <-got; err != nil {
		t.Fatalf("UID 1002 after a turn was given back: %v", err)
	}
	r2()
	if n := len(g.turns); n != 0 || len(g.byUID) != 0 {
		t.Errorf("after every release: %d turns taken, %v", n, g.byUID)
	}
}
