package backend

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// testDirMarker names every directory the tests create, with the test
// process's PID, so TestMain can find what a killed test binary left
// (a timeout does not run t.Cleanup).
const testDirMarker = "/backend-test-"

var testDirPrefix = fmt.Sprintf("backend-test-%d-", os.Getpid())

func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		sweepLeftovers()
	}
	os.Exit(m.Run())
}

// sweepLeftovers detaches loop devices, and removes volume groups on
// them, whose backing files are in test directories of dead test
// processes.
func sweepLeftovers() {
	loops, err := hostblk.LoopDevices()
	if err != nil {
		return
	}
	for _, l := range loops {
		pid, ok := testPIDOf(l.BackingFile)
		if !ok || syscall.Kill(pid, 0) == nil {
			continue
		}
		for _, upper := range loops {
			if upper.BackingFile == l.Path {
				_ = hostblk.DetachLoop(upper.Path)
			}
		}
		lvm := &hostblk.LVM{NoDeviceMapper: true, Devices: []string{l.Path}}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if vgs, err := lvm.VolumeGroups(ctx); err == nil {
			for _, vg := range vgs {
				_, _ = lvm.Run(ctx, "vgremove", "-ff", "-y", vg.Name)
			}
			_, _ = lvm.Run(ctx, "pvremove", "-ff", "-y", l.Path)
		}
		cancel()
		_ = hostblk.DetachLoop(l.Path)
		fmt.Fprintf(os.Stderr, "backend tests: removed leftover %s (%s) of dead test process %d\n", l.Path, l.BackingFile, pid)
	}
	for _, base := range []string{os.TempDir(), "/var/tmp"} {
		dirs, _ := filepath.Glob(filepath.Join(base, "backend-test-*"))
		for _, dir := range dirs {
			if pid, ok := testPIDOf(dir + "/"); ok && syscall.Kill(pid, 0) != nil {
				os.RemoveAll(dir)
			}
		}
	}
}

func testPIDOf(path string) (int, bool) {
	i := strings.Index(path, testDirMarker)
	if i < 0 {
		return 0, false
	}
	pidStr, _, ok := strings.Cut(path[i+len(testDirMarker):], "-")
	if !ok {
		return 0, false
	}
	pid, err := strconv.Atoi(pidStr)
	return pid, err == nil
}

// testDir returns a fresh directory on a filesystem that supports
// O_DIRECT, named with testDirPrefix so TestMain can sweep what a killed
// run left; loop devices over files in it are detached at cleanup.
func testDir(t testing.TB) string {
	t.Helper()
	return looptest.Dir(t, testDirPrefix)
}

func requireRootAndTools(t testing.TB) {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "lvm", "qemu-img", "qemu-io")
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Fatalf("this test needs loop devices: %v", err)
	}
}

var vgCounter atomic.Int32

// newTestVG creates a volume group on a loop device over a sparse file of
// pvSize bytes, with 4 MiB extents, and an LVM that sees only it. The VG,
// the PV label and every loop device are removed at cleanup.
func newTestVG(t testing.TB, pvSize int64) (*hostblk.LVM, string, string) {
	t.Helper()
	dir := testDir(t)
	file := filepath.Join(dir, "pv.img")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, pvSize); err != nil {
		t.Fatal(err)
	}
	pv, err := hostblk.AttachLoop(file, hostblk.LoopOptions{SectorSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	lvm := &hostblk.LVM{NoDeviceMapper: true, Devices: []string{pv.Path}}
	name := fmt.Sprintf("bet%d_%d", os.Getpid(), vgCounter.Add(1))
	ctx := context.Background()
	// Registered after testDir's cleanup, so it runs first.
	t.Cleanup(func() {
		// Loop devices are found by what they map, never by the number
		// attached here: once detached, another test package may be
		// given the same /dev/loopN.
		stillOurs := false
		if loops, err := hostblk.FindLoops(file); err == nil {
			for _, l := range loops {
				stillOurs = stillOurs || l.Path == pv.Path
			}
		}
		if stillOurs {
			// The loop-activated LVs sit on the PV: detach them first.
			if uppers, err := hostblk.FindLoops(pv.Path); err == nil {
				for _, u := range uppers {
					if err := hostblk.DetachLoop(u.Path); err != nil {
						t.Errorf("cleanup: %v", err)
					}
				}
			}
			if _, err := lvm.Run(context.Background(), "vgremove", "-ff", "-y", name); err != nil && !errors.Is(err, hostblk.ErrVGNotFound) {
				t.Errorf("cleanup: %v", err)
			}
			_, _ = lvm.Run(context.Background(), "pvremove", "-ff", "-y", pv.Path)
		}
		looptest.DetachUnder(t, dir) // the PV's loop, by its backing file
	})
	if _, err := lvm.Run(ctx, "pvcreate", "-y", pv.Path); err != nil {
		t.Fatalf("pvcreate: %v", err)
	}
	if _, err := lvm.Run(ctx, "vgcreate", "-y", "-s", "4m", name, pv.Path); err != nil {
		t.Fatalf("vgcreate: %v", err)
	}
	return lvm, name, pv.Path
}

// env is one pool of a given type plus a backing root with files.
type env struct {
	t        testing.TB
	poolType PoolType
	cfg      *Config
	lvm      *hostblk.LVM
	vg       string
	pv       string
	roots    string // the backing root directory
	outside  string // a directory outside every root
	poolDir  string // loop pools
}

// importChunkSize is what an import copies at once (qcow2.CopyGuest's
// chunk, with the default cluster size).
const importChunkSize = qcow2.CopyChunkSize

const (
	testInitialSize = 4 << 20
	testChunkSize   = 4 << 20
)

// newEnv makes a pool named "p" of the given type (and policy) with
// backing root e.roots.
func newEnv(t testing.TB, typ PoolType, policy PolicyMode) *env {
	t.Helper()
	requireRootAndTools(t)
	dir := testDir(t)
	e := &env{t: t, poolType: typ, roots: filepath.Join(dir, "images"), outside: filepath.Join(dir, "outside")}
	for _, d := range []string{e.roots, e.outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	pc := PoolConfig{Name: "p", Type: typ, BackingRoots: []string{e.roots}, InitialSize: testInitialSize, ChunkSize: testChunkSize, Policy: policy}
	switch typ {
	case PoolLoop:
		e.poolDir = filepath.Join(dir, "pool")
		pc.Directory = e.poolDir
		e.lvm = &hostblk.LVM{NoDeviceMapper: true}
	case PoolLVM:
		e.lvm, e.vg, e.pv = newTestVG(t, 512<<20)
		pc.VolumeGroup, pc.Activation = e.vg, "loop"
	}
	e.cfg = &Config{Pools: []PoolConfig{pc}}
	return e
}

// manager makes and loads a Manager over the env's pool, closed at cleanup.
// newLoopOverlay is a loop-pool Manager (policy enforce) with one overlay,
// "vm", over a 1 MiB raw base: the start of every test that needs one
// volume and nothing else.
func newLoopOverlay(t testing.TB) (*Manager, VolumeInfo) {
	t.Helper()
	e := newEnv(t, PoolLoop, PolicyEnforce)
	m := e.manager()
	base := filepath.Join(e.roots, "base.raw")
	writeFile(t, base, 1<<20, nil)
	v, err := m.CreateOverlay(context.Background(), Caller{}, OverlayRequest{Pool: "p", Name: "vm", BackingPath: base, BackingFormat: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	return m, v
}

func (e *env) manager() *Manager {
	e.t.Helper()
	m, err := NewManager(e.cfg, ManagerOptions{LVM: e.lvm, Logger: slog.New(slog.NewTextHandler(testWriter{e.t}, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { m.Close() })
	if err := m.Load(context.Background()); err != nil {
		e.t.Fatalf("Load: %v", err)
	}
	return m
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// file writes a file of size bytes with data at the given offsets.
func writeFile(t testing.TB, path string, size int64, chunks map[int64][]byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range chunks {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func pattern(b byte, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = b
	}
	return p
}

// qemuInfo returns qemu-img's facts about the qcow2 image on dev, opened
// with its backing disabled (json: form) so nothing else is opened.
func qemuInfo(t *testing.T, dev string) map[string]any {
	t.Helper()
	out := testutil.QemuImg(t, "info", "--output=json", jsonNoBacking(dev))
	var info map[string]any
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info output: %v\n%s", err, out)
	}
	return info
}

func jsonNoBacking(dev string) string {
	file, _ := json.Marshal(dev)
	return fmt.Sprintf(`json:{"driver":"qcow2","backing":null,"file":{"driver":"host_device","filename":%s}}`, file)
}

// qemuCheck fails the test unless qemu-img check finds the image clean.
func qemuCheck(t *testing.T, dev string) {
	t.Helper()
	testutil.QemuImg(t, "check", jsonNoBacking(dev))
}

func mustErrIs(t *testing.T, err, kind error) {
	t.Helper()
	if !errors.Is(err, kind) {
		t.Fatalf("got error %v, want one wrapping %v", err, kind)
	}
	// Its kind is this one (a wrapped cause may carry another).
	if k := Kind(err); k != kind {
		t.Fatalf("error %v is of kind %v, want %v", err, k, kind)
	}
}

// leftovers lists what the pool holds on the host: LVs (LVM) or files
// (loop pool), and the loop devices over the PV or the pool files.
func (e *env) leftovers() (volumes []string, loops []string) {
	e.t.Helper()
	switch e.poolType {
	case PoolLVM:
		lvs, err := e.lvm.LogicalVolumes(context.Background(), e.vg)
		if err != nil {
			e.t.Fatal(err)
		}
		for _, lv := range lvs {
			volumes = append(volumes, lv.Name)
		}
		ls, err := hostblk.FindLoops(e.pv)
		if err != nil {
			e.t.Fatal(err)
		}
		for _, l := range ls {
			loops = append(loops, l.Path)
		}
	case PoolLoop:
		entries, _ := os.ReadDir(e.poolDir)
		for _, de := range entries {
			volumes = append(volumes, de.Name())
			if ls, err := hostblk.FindLoops(filepath.Join(e.poolDir, de.Name())); err == nil {
				for _, l := range ls {
					loops = append(loops, l.Path)
				}
			}
		}
	}
	return volumes, loops
}

// waitJob waits up to a minute for a job to finish.
func waitJob(t *testing.T, m *Manager, id uint64) JobInfo {
	t.Helper()
	// A bound, not a measure: under -race on a loaded 2-core machine an
	// import that grows an LV many times (each lvextend takes seconds)
	// needs more than a minute.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	info, err := m.waitJob(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// fileSource is a SourceFile over an os.File.
type fileSource struct{ *os.File }

func (f fileSource) Stat() (int64, error) {
	st, err := f.File.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

func openSource(t *testing.T, path string) SourceFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	return fileSource{f}
}
