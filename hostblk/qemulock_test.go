package hostblk

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/internal/testutil"
)

// qcow2File makes a 16 MiB qcow2 image with qemu-img in an O_DIRECT-capable
// directory (cache=none needs it).
func qcow2File(t *testing.T) string {
	t.Helper()
	path := filepath.Join(testDir(t), "disk.qcow2")
	testutil.MakeQcow2(t, path, "", "16M", "", "")
	return path
}

// qcow2Loop makes a qcow2 image and attaches it as a loop device.
func qcow2Loop(t *testing.T) string {
	t.Helper()
	testRoot(t)
	file := qcow2File(t)
	// Room for qemu's writes: a device does not grow.
	if err := os.Truncate(file, 32<<20); err != nil {
		t.Fatal(err)
	}
	return attachTestLoop(t, file, LoopOptions{}).Path
}

// wantInUse checks that err is qemu's lock refusal naming h.
func wantInUse(t *testing.T, what string, err error, h *testutil.QemuHolder) {
	t.Helper()
	if !errors.Is(err, ErrImageInUse) || !errors.Is(err, ErrTargetBusy) {
		t.Fatalf("%s while %s holds the image: %v, want ErrImageInUse and ErrTargetBusy", what, h.Name, err)
	}
	if want := "in use by " + h.String(); !strings.Contains(err.Error(), want) {
		t.Fatalf("%s: error %q does not name the holder (%q)", what, err, want)
	}
}

// TestOpenTargetRefusesImageQemuHolds: qemu-storage-daemon (a file, a loop
// device) and a qemu-system guest hold an image read-write; OpenTarget,
// buffered or not, is refused naming the holder.
func TestOpenTargetRefusesImageQemuHolds(t *testing.T) {
	for _, tc := range []struct {
		name  string
		image func(t *testing.T) string
		hold  func(testing.TB, string) *testutil.QemuHolder
	}{
		{"storage-daemon/file", qcow2File, testutil.HoldImageWithStorageDaemon},
		{"storage-daemon/loop", qcow2Loop, testutil.HoldImageWithStorageDaemon},
		{"guest/loop", qcow2Loop, testutil.HoldImageWithGuest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			image := tc.image(t)
			h := tc.hold(t, image)
			for _, buffered := range []bool{false, true} {
				tgt, err := OpenTarget(image, buffered)
				if err == nil {
					tgt.Close()
				}
				wantInUse(t, fmt.Sprintf("OpenTarget(buffered=%t)", buffered), err, h)
			}
		})
	}
}

// TestQemuRefusesWhileTargetOpen: while OpenTarget holds an image, qemu-io,
// qemu-img info without -U and qemu-system fail with qemu's own lock
// error; after Close qemu-io opens and writes it.
func TestQemuRefusesWhileTargetOpen(t *testing.T) {
	for name, image := range map[string]func(*testing.T) string{"file": qcow2File, "loop": qcow2Loop} {
		t.Run(name, func(t *testing.T) {
			path := image(t)
			tgt, err := OpenTarget(path, false)
			if err != nil {
				t.Fatal(err)
			}
			defer tgt.Close()
			for _, c := range []struct {
				tool, want string
				args       []string
			}{
				{"qemu-io", `Failed to get "write" lock`, []string{"-f", "qcow2", "-c", "read 0 512", path}},
				{"qemu-img", `Failed to get shared "write" lock`, []string{"info", "-f", "qcow2", path}},
			} {
				if out := testutil.QemuOpenError(t, c.tool, c.args...); !strings.Contains(out, c.want) {
					t.Errorf("%s while OpenTarget holds %s: %s, want %q", c.tool, path, out, c.want)
				}
			}
			if out := testutil.GuestRefusedError(t, path); !strings.Contains(out, `Failed to get "write" lock`) {
				t.Errorf("qemu-system-x86_64 while OpenTarget holds %s: %s", path, out)
			}
			if err := tgt.Close(); err != nil {
				t.Fatal(err)
			}
			testutil.QemuIO(t, "qcow2", path, "write -P 0x5a 0 64k")
		})
	}
}

// TestLockImageAgainstQemuIO checks each lock set against qemu-io as the
// other party: who refuses whom, in qemu's terms.
func TestLockImageAgainstQemuIO(t *testing.T) {
	path := qcow2File(t)
	open := func() *os.File {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}

	// A read-only qemu (qemu-io -r: consistent read, write and resize not
	// shared) lets readers in and keeps writers out.
	ro := testutil.HoldImageReadOnly(t, path)
	for _, c := range []struct {
		name string
		set  LockSet
		ok   bool
	}{{"reader", ReaderLocks, true}, {"shared reader", SharedReaderLocks, true}, {"writer", WriterLocks, false}} {
		l, err := LockImage(open(), c.set)
		if c.ok && err != nil {
			t.Errorf("%s locks while qemu-io -r holds the image: %v", c.name, err)
		}
		if !c.ok {
			wantInUse(t, c.name+" locks", err, ro)
			if !strings.Contains(err.Error(), `Failed to get "write" lock`) {
				t.Errorf("writer refusal %q lacks qemu's words", err)
			}
		}
		l.Release()
	}
	u, err := ProbeImagePath(path)
	if err != nil {
		t.Fatal(err)
	}
	if u.Held != PermSet(PermConsistentRead) || !u.Unshared.Has(PermWrite) || u.Unshared.Has(PermConsistentRead) ||
		len(u.Holders) != 1 || u.Holders[0].PID != ro.PID {
		t.Errorf("ProbeImage while qemu-io -r holds the image = %+v", u)
	}
	ro.Stop(t)

	// A read-write qemu keeps readers out unless they share everything.
	rw := testutil.HoldImageWithStorageDaemon(t, path)
	if l, err := LockImage(open(), ReaderLocks); err == nil {
		l.Release()
		t.Error("reader locks taken while qemu-storage-daemon writes the image")
	} else {
		wantInUse(t, "reader locks", err, rw)
		if !strings.Contains(err.Error(), `Failed to get shared "write" lock`) {
			t.Errorf("reader refusal %q lacks qemu's words", err)
		}
	}
	l, err := LockImage(open(), SharedReaderLocks)
	if err != nil {
		t.Errorf("shared reader locks while qemu-storage-daemon writes: %v", err)
	}
	l.Release()
	rw.Stop(t)

	// Our reader locks keep qemu-io's writes out but not qemu-io -r.
	f := open()
	l, err = LockImage(f, ReaderLocks)
	if err != nil {
		t.Fatal(err)
	}
	if out := testutil.QemuOpenError(t, "qemu-io", "-f", "qcow2", "-c", "write 0 512", path); !strings.Contains(out, `Failed to get "write" lock`) {
		t.Errorf("qemu-io write while reader locks are held: %s", out)
	}
	testutil.Run(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", path)
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	testutil.QemuIO(t, "qcow2", path, "write 0 512")
}

// TestFindHoldersOtherNode: a qemu holding a loop device through another
// device node (as qemu in libvirt's private /dev does) is still found,
// and a writer is refused.
func TestFindHoldersOtherNode(t *testing.T) {
	dev := qcow2Loop(t)
	st := mustStatRdev(t, dev)
	node := filepath.Join(testDir(t), "othernode")
	if err := mknodBlock(node, st); err != nil {
		t.Fatal(err)
	}
	h := testutil.HoldImageWithStorageDaemon(t, node)
	tgt, err := OpenTarget(dev, false)
	if err == nil {
		tgt.Close()
	}
	wantInUse(t, "OpenTarget through the other node", err, h)
}

func mustStatRdev(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Rdev
}

// mknodBlock makes a second device node for the block device rdev.
func mknodBlock(path string, rdev uint64) error {
	return unix.Mknod(path, unix.S_IFBLK|0o600, int(rdev))
}

func TestQemuGuestName(t *testing.T) {
	for opt, want := range map[string]string{
		"guest=vm1,debug-threads=on":  "vm1",
		"guest=vm1":                   "vm1",
		"guest=a,,b,debug-threads=on": "a,b",
		"legacy-name":                 "legacy-name",
		"process=qemu:vm1":            "",
	} {
		if got := qemuGuestName(opt); got != want {
			t.Errorf("qemuGuestName(%q) = %q, want %q", opt, got, want)
		}
	}
}

// TestCheckImageLocksOtherNode: the hook's check, with one reading of
// /proc/locks, sees a qemu holding the device through a node of its own
// (as in libvirt's private /dev), which the lock test on the host's node
// cannot.
func TestCheckImageLocksOtherNode(t *testing.T) {
	dev := qcow2Loop(t)
	if err := CheckImageLocksPath(NewLockTable(), dev, GuestDiskLocks(false, false)); err != nil {
		t.Fatalf("CheckImageLocksPath before anyone holds %s: %v", dev, err)
	}
	node := filepath.Join(testDir(t), "othernode")
	if err := mknodBlock(node, mustStatRdev(t, dev)); err != nil {
		t.Fatal(err)
	}
	h := testutil.HoldImageWithStorageDaemon(t, node)
	err := CheckImageLocksPath(NewLockTable(), dev, GuestDiskLocks(false, false))
	wantInUse(t, "CheckImageLocksPath through the other node", err, h)
}
