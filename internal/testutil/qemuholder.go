package testutil

// qemu processes that hold an image open read-write, with qemu's image
// locks, for the tests of volagent's side of qemu's locking protocol. The
// judge of "qemu holds it" is the kernel's /proc/locks, polled, not a
// sleep and not volagent's own code.

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// QemuHolder is a running qemu that holds an image.
type QemuHolder struct {
	PID int
	// Name is the program's name as volagent reports holders
	// (qemu-storage-daemon, qemu-system-x86_64).
	Name string
	// Domain is the guest name qemu runs under (-name guest=...), as
	// libvirt starts every domain; "" for a holder without one.
	Domain string
	stderr *bytes.Buffer
	exited chan struct{}
}

// HoldImageWithStorageDaemon starts qemu-storage-daemon with the qcow2
// image at path (a file or a block device) exported writable over NBD,
// waits until qemu's write lock on it shows in /proc/locks, and kills the
// daemon at cleanup.
func HoldImageWithStorageDaemon(t testing.TB, path string) *QemuHolder {
	t.Helper()
	RequireTool(t, "qemu-storage-daemon")
	driver := "file"
	if isBlockDevice(t, path) {
		driver = "host_device"
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	return startHolder(t, path, "qemu-storage-daemon",
		"--blockdev", fmt.Sprintf("driver=%s,filename=%s,node-name=file0,cache.direct=on", driver, path),
		"--blockdev", "driver=qcow2,file=file0,node-name=disk0",
		"--nbd-server", "addr.type=unix,addr.path="+sock,
		"--export", "type=nbd,id=export0,node-name=disk0,writable=on")
}

// HoldImageWithGuest starts a firmware-only qemu-system-x86_64 guest
// (KVM where /dev/kvm exists, else TCG) named as libvirt names a domain's
// qemu (-name guest=HolderGuestName), with the qcow2 image at path as a
// virtio disk (cache=none), waits until its write lock shows in
// /proc/locks, and kills it at cleanup.
func HoldImageWithGuest(t testing.TB, path string) *QemuHolder {
	t.Helper()
	RequireTool(t, "qemu-system-x86_64")
	accel := "tcg"
	if _, err := os.Stat("/dev/kvm"); err == nil {
		accel = "kvm"
	}
	h := startHolder(t, path, "qemu-system-x86_64",
		"-name", "guest="+HolderGuestName+",debug-threads=on",
		"-accel", accel, "-nographic", "-nodefaults", "-m", "64",
		"-drive", fmt.Sprintf("file=%s,format=qcow2,cache=none,if=virtio", path))
	h.Domain = HolderGuestName
	return h
}

// HolderGuestName is the guest name of HoldImageWithGuest's qemu.
const HolderGuestName = TestDomainPrefix + "holder"

// String is the holder as volagent names it in a refusal:
// "qemu-system-x86_64 (pid 4242, domain vm1)".
func (h *QemuHolder) String() string {
	if h.Domain != "" {
		return fmt.Sprintf("%s (pid %d, domain %s)", h.Name, h.PID, h.Domain)
	}
	return fmt.Sprintf("%s (pid %d)", h.Name, h.PID)
}

// HoldImageReadOnly runs qemu-io -r on the qcow2 image at path (it holds
// qemu's reader locks: consistent read, write and resize not shared) for
// up to ten minutes, waits until its lock on byte 100 shows in
// /proc/locks, and kills it at cleanup.
func HoldImageReadOnly(t testing.TB, path string) *QemuHolder {
	t.Helper()
	RequireTool(t, "qemu-io")
	return startHolderWaiting(t, path, 100, "qemu-io", "-r", "-f", "qcow2", "-c", "sleep 600000", path)
}

// Stop kills the holder and waits until it is gone (its locks with it).
func (h *QemuHolder) Stop(t testing.TB) {
	t.Helper()
	if p, err := os.FindProcess(h.PID); err == nil {
		p.Kill()
	}
	select {
	case <-h.exited:
	case <-time.After(60 * time.Second):
		t.Fatalf("%s (pid %d) still runs 60 s after SIGKILL", h.Name, h.PID)
	}
}

func startHolder(t testing.TB, path, prog string, args ...string) *QemuHolder {
	t.Helper()
	return startHolderWaiting(t, path, 101, prog, args...)
}

func startHolderWaiting(t testing.TB, path string, lockByte int64, prog string, args ...string) *QemuHolder {
	t.Helper()
	h := &QemuHolder{Name: prog, stderr: &bytes.Buffer{}, exited: make(chan struct{})}
	cmd := exec.Command(prog, args...)
	cmd.Stdout, cmd.Stderr = h.stderr, h.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", prog, err)
	}
	h.PID = cmd.Process.Pid
	go func() { cmd.Wait(); close(h.exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-h.exited
	})
	waitLocked(t, path, lockByte, h)
	return h
}

// WaitImageLocked polls /proc/locks until a lock covers byte 101 (qemu's
// "write" permission) of the image at path, for up to 60 s. It fails the
// test if h (when not nil) exits first.
func WaitImageLocked(t testing.TB, path string, h *QemuHolder) {
	t.Helper()
	waitLocked(t, path, 101, h)
}

func waitLocked(t testing.TB, path string, off int64, h *QemuHolder) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !ImageLockedAt(t, path, off) {
		if h != nil {
			select {
			case <-h.exited:
				t.Fatalf("%s (pid %d) exited before it locked %s: %s", h.Name, h.PID, path, h.stderr.String())
			default:
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no lock on byte %d of %s in /proc/locks after 60 s", off, path)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ImageLockedAt reports whether /proc/locks has a lock covering byte off
// of the file or device node at path.
func ImageLockedAt(t testing.TB, path string, off int64) bool {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	id := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	b, err := os.ReadFile("/proc/locks")
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		// "1:" OFDLCK ADVISORY READ -1 maj:min:ino start end (a blocked
		// waiter adds "->" first).
		if len(f) < 8 || f[1] == "->" {
			continue
		}
		start, err1 := strconv.ParseInt(f[6], 10, 64)
		end, err2 := strconv.ParseInt(f[7], 10, 64)
		if f[5] == id && err1 == nil && err2 == nil && start <= off && off <= end {
			return true
		}
	}
	return false
}

func isBlockDevice(t testing.TB, path string) bool {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Mode&unix.S_IFMT == unix.S_IFBLK
}

// QemuOpenError runs a qemu tool that opens an image (qemu-io, qemu-img
// info without -U, ...) and returns its combined output; it fails the test
// if the tool succeeds.
func QemuOpenError(t testing.TB, name string, args ...string) string {
	t.Helper()
	RequireTool(t, name)
	out, err := exec.Command(name, args...).CombinedOutput()
	if err == nil {
		t.Fatalf("%s %q succeeded, want it refused by qemu's image locks; output: %s", name, args, out)
	}
	return string(out)
}

// GuestRefusedError starts qemu-system-x86_64 on the qcow2 image at path
// and returns its output when it exits; it fails the test if qemu is
// still running after 60 s (it opened the image).
func GuestRefusedError(t testing.TB, path string) string {
	t.Helper()
	RequireTool(t, "qemu-system-x86_64")
	var out bytes.Buffer
	cmd := exec.Command("qemu-system-x86_64", "-accel", "tcg", "-nographic", "-nodefaults", "-m", "64", "-S",
		"-drive", fmt.Sprintf("file=%s,format=qcow2,cache=none,if=virtio", path))
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatalf("qemu-system-x86_64 on %s exited 0: %s", path, out.String())
		}
		return out.String()
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("qemu-system-x86_64 opened %s (still running after 60 s), want it refused", path)
		return ""
	}
}
