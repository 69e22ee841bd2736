package testutil

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// LoopDevice attaches a sparse file of sizeBytes as a loop device with the
// given logical sector size (512 or 4096) and direct I/O, and returns its
// path (/dev/loopN). The device is detached in t.Cleanup, also when the test
// fails. It needs root and losetup.
//
// TODO: switch to hostblk's loop ioctls once they land (losetup for now).
func LoopDevice(t testing.TB, sizeBytes, sectorSize int) string {
	t.Helper()
	RequireRoot(t)
	RequireTool(t, "losetup")
	if sizeBytes <= 0 || sizeBytes%sectorSize != 0 {
		t.Fatalf("LoopDevice: size %d must be > 0 and a multiple of the sector size %d", sizeBytes, sectorSize)
	}
	backing := filepath.Join(directIODir(t), "loop.img")
	if err := os.WriteFile(backing, nil, 0o600); err != nil {
		t.Fatalf("LoopDevice: %v", err)
	}
	if err := os.Truncate(backing, int64(sizeBytes)); err != nil {
		t.Fatalf("LoopDevice: %v", err)
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("losetup", "--find", "--show", "--direct-io=on",
		"--sector-size", strconv.Itoa(sectorSize), backing)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("losetup %s: %v\nstderr: %s", backing, err, stderr.String())
	}
	dev := strings.TrimSpace(stdout.String())
	if !strings.HasPrefix(dev, "/dev/loop") {
		t.Fatalf("losetup printed %q, not a loop device", dev)
	}
	// Registered after the backing file's directory, so it runs before the
	// directory is removed.
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// directIODir returns an empty directory, removed at cleanup, on a
// filesystem that supports O_DIRECT (tmpfs does not, so a TempDir on tmpfs
// is swapped for one under /var/tmp).
func directIODir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	if supportsDirectIO(dir) {
		return dir
	}
	dir, err := os.MkdirTemp("/var/tmp", "volagent-loop-")
	if err != nil {
		t.Fatalf("LoopDevice: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if !supportsDirectIO(dir) {
		t.Fatalf("LoopDevice: neither %s nor /var/tmp supports O_DIRECT", t.TempDir())
	}
	return dir
}

func supportsDirectIO(dir string) bool {
	probe := filepath.Join(dir, ".direct-io-probe")
	fd, err := unix.Open(probe, unix.O_CREAT|unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0o600)
	defer os.Remove(probe)
	if err != nil {
		return false
	}
	unix.Close(fd)
	return true
}
