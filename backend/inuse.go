package backend

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/hostblk"
)

// checkNotInUse is the one place that decides whether a volume's device is
// in use by someone other than this daemon, before Delete, Resize and
// Write change it: qemu's image locks (a running or paused guest, a
// qemu-storage-daemon, qemu-img, another volagent), then an exclusive open
// or kernel holders (a mount, stacked devices, loop devices over it).
// The answer is ErrBusy naming the holder, its error an
// *hostblk.ImageInUseError for lock holders (whose Holders' Domain a
// libvirt lookup may fill in). The writers also hold qemu-img's writer
// locks while they write (hostblk.OpenTarget), which closes the gap
// between this check and the write.
func (m *Manager) checkNotInUse(ctx context.Context, v *volume) error {
	path := v.info.DevicePath
	if path == "" {
		return nil
	}
	u, err := hostblk.ProbeImagePath(path)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENXIO) {
		return nil // no device (a half-made or broken volume): nobody can use it
	}
	if err != nil {
		return fmt.Errorf("%w: volume %q (%s): cannot tell whether device %s is in use: %w", ErrFailed, v.info.Name, v.info.ID, path, err)
	}
	if err := u.Err(path); err != nil {
		return fmt.Errorf("%w: volume %q (%s): %w", ErrBusy, v.info.Name, v.info.ID, err)
	}
	du, err := hostblk.DeviceUsage(path)
	if err != nil {
		return fmt.Errorf("%w: volume %q (%s): cannot tell whether device %s is in use: %w", ErrFailed, v.info.Name, v.info.ID, path, err)
	}
	if du.InUse() {
		return fmt.Errorf("%w: volume %q (%s): device %s is in use (opened exclusively elsewhere or mounted: %v; holders %v; loop devices %v)",
			ErrBusy, v.info.Name, v.info.ID, path, du.Claimed, du.Holders, du.LoopDevices)
	}
	return nil
}
