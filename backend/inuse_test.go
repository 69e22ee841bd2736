package backend

import (
	"context"
	"crypto/sha256"
	"os"
	"strings"
	"testing"

	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

func hashDevice(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestMutationsRefusedWhileQemuHolds: a qemu-storage-daemon and a
// firmware-only guest hold a volume's device; Write, Resize, Delete,
// Check and writing a new image onto the device (CreateOverlay's
// writeNewImage) are refused with ErrBusy naming the holder, the device's
// bytes stay as they were, and the volume is not marked for deletion.
// Once qemu is gone, the same calls work.
func TestMutationsRefusedWhileQemuHolds(t *testing.T) {
	for name, hold := range map[string]func(testing.TB, string) *testutil.QemuHolder{
		"storage-daemon": testutil.HoldImageWithStorageDaemon,
		"guest":          testutil.HoldImageWithGuest,
	} {
		t.Run(name, func(t *testing.T) {
			m, v := newLoopOverlay(t)
			ctx := context.Background()
			h := hold(t, v.DevicePath)
			before := hashDevice(t, v.DevicePath)
			holder := "in use by " + h.String()
			refused := func(what string, err error) {
				t.Helper()
				mustErrIs(t, err, ErrBusy)
				if !strings.Contains(err.Error(), holder) {
					t.Errorf("%s: %v does not name the holder (%q)", what, err, holder)
				}
			}
			refused("Write", m.Write(ctx, Caller{}, v.ID, 0, []byte("guest data")))
			refused("Resize", m.Resize(ctx, Caller{}, v.ID, 2*v.VirtualSize))
			refused("Delete", m.Delete(ctx, Caller{}, v.ID))
			_, err := m.Check(ctx, v.ID)
			refused("Check", err)
			_, err = writeNewImage(v.DevicePath, 1<<20, qcow2.CreateOptions{VirtualSize: 1 << 20})
			refused("writeNewImage", err)
			if after := hashDevice(t, v.DevicePath); after != before {
				t.Fatal("the device's bytes changed while qemu held it")
			}
			if _, _, err := m.lookup(v.ID); err != nil {
				t.Fatalf("volume gone after a refused Delete: %v", err)
			}

			h.Stop(t)
			if err := m.Write(ctx, Caller{}, v.ID, 0, []byte("guest data")); err != nil {
				t.Fatalf("Write after qemu stopped: %v", err)
			}
			if err := m.Resize(ctx, Caller{}, v.ID, 2*v.VirtualSize); err != nil {
				t.Fatalf("Resize after qemu stopped: %v", err)
			}
			if res, err := m.Check(ctx, v.ID); err != nil || res.Corruptions+res.Leaks+res.CheckErrors != 0 {
				t.Fatalf("Check after qemu stopped: %+v, %v", res, err)
			}
			qemuCheck(t, v.DevicePath)
			if err := m.Delete(ctx, Caller{}, v.ID); err != nil {
				t.Fatalf("Delete after qemu stopped: %v", err)
			}
		})
	}
}

// TestQemuRefusedWhileDaemonWrites: while the daemon's writer holds a
// volume (a write session open), qemu cannot open it.
func TestQemuRefusedWhileDaemonWrites(t *testing.T) {
	m, v := newLoopOverlay(t)
	got, p, err := m.lookup(v.ID)
	if err != nil {
		t.Fatal(err)
	}
	s, err := m.openWriteSession(p, &got)
	if err != nil {
		t.Fatal(err)
	}
	out := testutil.QemuOpenError(t, "qemu-io", "-f", "qcow2", "-c", "write 0 512", v.DevicePath)
	if !strings.Contains(out, `Failed to get "write" lock`) {
		t.Errorf("qemu-io while the daemon writes: %s", out)
	}
	if err := s.close(); err != nil {
		t.Fatal(err)
	}
	testutil.QemuIO(t, "qcow2", v.DevicePath, "write 0 512")
}
