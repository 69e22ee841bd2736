// Package looptest gives tests loop devices and directories for them,
// through hostblk (the one place that touches block devices), removed at
// cleanup even when a test fails. hostblk's own tests cannot use it (it
// imports hostblk); every other package's tests do.
package looptest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/testutil"
)

// Device attaches a sparse file of sizeBytes as a loop device with the
// given logical sector size (512 or 4096) and direct I/O, and returns its
// path (/dev/loopN). The device is detached at cleanup. It needs root.
func Device(t testing.TB, sizeBytes, sectorSize int) string {
	t.Helper()
	testutil.RequireRoot(t)
	if sizeBytes <= 0 || sizeBytes%sectorSize != 0 {
		t.Fatalf("looptest.Device: size %d must be > 0 and a multiple of the sector size %d", sizeBytes, sectorSize)
	}
	backing := filepath.Join(Dir(t, "volagent-loop-"), "loop.img")
	if err := os.WriteFile(backing, nil, 0o600); err != nil {
		t.Fatalf("looptest.Device: %v", err)
	}
	if err := os.Truncate(backing, int64(sizeBytes)); err != nil {
		t.Fatalf("looptest.Device: %v", err)
	}
	dev, err := hostblk.AttachLoop(backing, hostblk.LoopOptions{SectorSize: uint32(sectorSize)})
	if err != nil {
		t.Fatalf("looptest.Device: attaching %s: %v", backing, err)
	}
	return dev.Path
}

// Dir returns an empty directory on a filesystem that supports O_DIRECT
// (loop devices use direct I/O; tmpfs may not have it, so /var/tmp is
// tried next). At cleanup every loop device over a file in it is detached
// (devices stacked on those first), then the directory is removed.
func Dir(t testing.TB, prefix string) string {
	t.Helper()
	for _, base := range []string{os.TempDir(), "/var/tmp"} {
		dir, err := os.MkdirTemp(base, prefix)
		if err != nil {
			continue
		}
		if !supportsDirectIO(dir) {
			os.RemoveAll(dir)
			continue
		}
		t.Cleanup(func() {
			DetachUnder(t, dir)
			os.RemoveAll(dir)
		})
		return dir
	}
	t.Fatalf("looptest.Dir: neither %s nor /var/tmp supports O_DIRECT", os.TempDir())
	return ""
}

// DetachUnder detaches every loop device whose backing file is under dir,
// and first the loop devices stacked on those; failures are test errors.
func DetachUnder(t testing.TB, dir string) {
	loops, err := hostblk.LoopDevices()
	if err != nil {
		t.Errorf("cleanup: listing loop devices: %v", err)
		return
	}
	for _, l := range loops {
		if !strings.HasPrefix(l.BackingFile, dir+"/") {
			continue
		}
		for _, upper := range loops {
			if upper.BackingFile == l.Path {
				if err := hostblk.DetachLoopDevice(upper); err != nil {
					t.Errorf("cleanup: %v", err)
				}
			}
		}
		if err := hostblk.DetachLoopDevice(l); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	}
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
