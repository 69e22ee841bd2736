package hostblk

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/volagent/volagent/internal/testutil"
	"golang.org/x/sys/unix"
)

// testDirPrefix names every directory the tests create backing files in,
// with the test process's PID, so sweepLeftovers can find loop devices and
// volume groups left by a test binary that was killed (a timeout does not
// run t.Cleanup).
var testDirPrefix = fmt.Sprintf("hostblk-test-%d-", os.Getpid())

func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		sweepLeftovers()
	}
	os.Exit(m.Run())
}

// sweepLeftovers detaches loop devices (and removes the volume groups on
// them) whose backing files are in test directories of test processes that
// no longer run.
func sweepLeftovers() {
	loops, err := listLoops()
	if err != nil {
		return
	}
	for _, l := range loops {
		pid, ok := testPIDOf(l.BackingFile)
		if !ok || syscall.Kill(pid, 0) == nil {
			continue
		}
		for _, upper := range loops {
			if upper.backingIsBlock && upper.BackingFile == l.Path {
				_ = DetachLoop(upper.Path)
			}
		}
		lvm := &LVM{NoDeviceMapper: true, Devices: []string{l.Path}}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if vgs, err := lvm.VolumeGroups(ctx); err == nil {
			for _, vg := range vgs {
				_, _ = lvm.Run(ctx, "vgremove", "-ff", "-y", vg.Name)
			}
		}
		_, _ = lvm.Run(ctx, "pvremove", "-ff", "-y", l.Path)
		cancel()
		_ = DetachLoop(l.Path)
		fmt.Fprintf(os.Stderr, "hostblk tests: removed leftover %s (%s) of dead test process %d\n", l.Path, l.BackingFile, pid)
	}
	for _, base := range []string{os.TempDir(), "/var/tmp"} {
		dirs, _ := filepath.Glob(filepath.Join(base, "hostblk-test-*"))
		for _, dir := range dirs {
			if pid, ok := testPIDOf(dir + "/"); ok && syscall.Kill(pid, 0) != nil {
				os.RemoveAll(dir)
			}
		}
	}
}

func testPIDOf(path string) (int, bool) {
	i := strings.Index(path, "/hostblk-test-")
	if i < 0 {
		return 0, false
	}
	rest := path[i+len("/hostblk-test-"):]
	pidStr, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	pid, err := strconv.Atoi(pidStr)
	return pid, err == nil
}

// testDir returns a fresh directory for backing files on a filesystem that
// supports O_DIRECT (loop direct I/O needs it), removed after the test.
func testDir(t *testing.T) string {
	t.Helper()
	for _, base := range []string{os.TempDir(), "/var/tmp"} {
		dir, err := os.MkdirTemp(base, testDirPrefix)
		if err != nil {
			continue
		}
		probe := filepath.Join(dir, "probe")
		fd, err := unix.Open(probe, unix.O_CREAT|unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0o600)
		if err != nil {
			os.RemoveAll(dir)
			continue
		}
		unix.Close(fd)
		os.Remove(probe)
		t.Cleanup(func() { os.RemoveAll(dir) })
		return dir
	}
	t.Fatalf("no temporary directory supports O_DIRECT (tried %s and /var/tmp)", os.TempDir())
	return ""
}

// sparseFile creates a sparse file of size bytes.
func sparseFile(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	path := filepath.Join(dir, name)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return path
}

// attachTestLoop attaches file and detaches it when the test ends, even if
// it fails.
func attachTestLoop(t *testing.T, file string, opts LoopOptions) LoopDevice {
	t.Helper()
	dev, err := AttachLoop(file, opts)
	if err != nil {
		t.Fatalf("AttachLoop(%s, %+v): %v", file, opts, err)
	}
	// Detach by backing file, not by the saved path: if the test detached
	// the device itself, the number may already belong to someone else.
	t.Cleanup(func() { detachAllOver(t, file) })
	return dev
}

// detachAllOver detaches every loop device whose backing file is path,
// and first the loop devices stacked on those (loop-activated LVs on a
// test PV).
func detachAllOver(t *testing.T, path string) {
	loops, err := FindLoops(path)
	if err != nil {
		t.Errorf("cleanup: %v", err)
		return
	}
	for _, l := range loops {
		detachAllOver(t, l.Path)
		if err := DetachLoopDevice(l); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	}
}

// testRoot fails the test unless it can touch loop devices.
func testRoot(t *testing.T) {
	t.Helper()
	testutil.RequireRoot(t)
	if _, err := os.Stat(loopControlPath); err != nil {
		t.Fatalf("this test needs loop devices: %v", err)
	}
}

var vgCounter atomic.Int32

// testVG is a real volume group on a loop device over a sparse file.
type testVG struct {
	lvm  *LVM
	name string
	pv   string // the PV's loop device
}

// newTestVG creates a volume group of one PV of pvSize bytes with 4 MiB
// extents. The LVM instance sees only that PV (--devices), so tests never
// touch the host's own disks. The VG, the PV label and every loop device
// are removed when the test ends, pass or fail.
func newTestVG(t *testing.T, pvSize int64) *testVG {
	t.Helper()
	testRoot(t)
	testutil.RequireTool(t, "lvm")
	dir := testDir(t)
	file := sparseFile(t, dir, "pv.img", pvSize)
	// 512-byte sectors, like most disks; AttachLoop's default is 4096.
	pv := attachTestLoop(t, file, LoopOptions{SectorSize: 512})
	lvm := &LVM{NoDeviceMapper: true, Devices: []string{pv.Path}}
	name := fmt.Sprintf("hbt%d_%d", os.Getpid(), vgCounter.Add(1))
	ctx := context.Background()
	if _, err := lvm.Run(ctx, "pvcreate", "-y", pv.Path); err != nil {
		t.Fatalf("pvcreate: %v", err)
	}
	t.Cleanup(func() {
		// Loop-activated LVs first: they are loop devices over the PV.
		detachAllOver(t, pv.Path)
		if _, err := lvm.Run(context.Background(), "vgremove", "-ff", "-y", name); err != nil && !errors.Is(err, ErrVGNotFound) {
			t.Errorf("cleanup: %v", err)
		}
		if _, err := lvm.Run(context.Background(), "pvremove", "-ff", "-y", pv.Path); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if _, err := lvm.Run(ctx, "vgcreate", "-y", "-s", "4m", name, pv.Path); err != nil {
		t.Fatalf("vgcreate: %v", err)
	}
	return &testVG{lvm: lvm, name: name, pv: pv.Path}
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// readAt reads n bytes at off from path, bypassing nothing: block devices
// are read through the page cache, which the writers sync.
func readAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("read %s at %d: %v", path, off, err)
	}
	return b
}

// writeSync writes b at off on path and flushes it to the backing store.
func writeSync(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatalf("write %s at %d: %v", path, off, err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// dropCaches makes later reads of a block device go to the medium, not to
// pages cached before another device wrote the same bytes underneath.
func dropCaches(t *testing.T, path string) {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.IoctlSetInt(fd, unix.BLKFLSBUF, 0); err != nil {
		t.Fatalf("BLKFLSBUF %s: %v", path, err)
	}
}

func requireEqualBytes(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: bytes differ from offset %d (len got %d, want %d)", what, i, len(got), len(want))
	}
}
