package backend

// What the libvirt integration (package virt) needs of the Manager beyond
// the D-Bus API: a pool's settings (backing roots, chunk size), finding
// the volume behind a disk path, growing a thin volume's device while a
// domain writes to it, and signalling what it refused.

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/volagent/volagent/hostblk"
)

// PoolSettings returns an opened pool's configuration (after ParseConfig's
// defaults): its type, backing roots, initial and chunk sizes, policy.
func (m *Manager) PoolSettings(name string) (PoolConfig, error) {
	p, err := m.openedPool(name)
	if err != nil {
		return PoolConfig{}, err
	}
	pc := p.cfg
	pc.BackingRoots = append([]string(nil), pc.BackingRoots...)
	return pc, nil
}

// VolumeByDevice returns the complete volume whose block device (or
// loop-pool file) is path, after resolving symlinks (a request pool's link,
// /dev/VG/LV); ok is false when path is no volume of this Manager.
func (m *Manager) VolumeByDevice(path string) (info VolumeInfo, ok bool) {
	if path == "" {
		return VolumeInfo{}, false
	}
	candidates := []string{filepath.Clean(path)}
	if real, err := filepath.EvalSymlinks(path); err == nil && real != candidates[0] {
		candidates = append(candidates, real)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range m.volumes {
		for _, c := range candidates {
			if c == v.info.DevicePath || c == v.backingPath {
				return v.info, true
			}
		}
	}
	return VolumeInfo{}, false
}

// GrowVolume grows a volume's block device to at least newDeviceSize bytes
// (rounded up to 4 KiB) while it may be in use by a running domain: an LV
// is extended and its device refreshed, a loop-pool file is grown and its
// loop device told (LOOP_SET_CAPACITY). Only the device grows; the image
// is not read or written, since qemu owns it while the domain runs. A size
// not larger than the device is a no-op that returns the volume as it is.
// Results: ErrNotFound; ErrInvalidArgument for a size that is not
// positive; ErrNoSpace when the pool cannot give more; ErrFailed.
func (m *Manager) GrowVolume(ctx context.Context, c Caller, id string, newDeviceSize int64) (VolumeInfo, error) {
	if newDeviceSize <= 0 {
		return VolumeInfo{}, fmt.Errorf("%w: new device size %d: want a positive byte count", ErrInvalidArgument, newDeviceSize)
	}
	done, err := m.beginOp("GrowVolume")
	if err != nil {
		return VolumeInfo{}, err
	}
	defer done()
	lock := m.opLock(id)
	lock.Lock()
	defer lock.Unlock()
	v, p, err := m.lookup(id)
	if err != nil {
		return VolumeInfo{}, err
	}
	if v.info.DevicePath == "" {
		return VolumeInfo{}, fmt.Errorf("%w: volume %q (%s) has no block device", ErrFailed, v.info.Name, id)
	}
	current, err := hostblk.Inspect(v.info.DevicePath)
	if err != nil {
		return VolumeInfo{}, fmt.Errorf("%w: volume %q (%s): %v", ErrFailed, v.info.Name, id, err)
	}
	size := current.Size
	if newDeviceSize > current.Size {
		if size, err = m.growDevice(ctx, p, &v, newDeviceSize); err != nil {
			return VolumeInfo{}, err
		}
	}
	m.mu.Lock()
	if stored, ok := m.volumes[id]; ok {
		stored.info.DeviceSize = size
		v.info = stored.info
	} else {
		v.info.DeviceSize = size
	}
	m.mu.Unlock()
	if size != current.Size {
		info := v.info
		m.emit(Event{Kind: EventVolumeChanged, Volume: &info})
		// The pool's free space costs an lvm command: not on the path
		// of a running guest's growth. Counted as an operation (this one
		// still is, so the count is not zero): Close waits for it.
		m.opWG.Add(1)
		go func() {
			defer m.opWG.Done()
			m.poolChanged(p)
		}()
		m.log.Info("volume device grown for a running domain", "pool", p.cfg.Name, "volume", v.info.Name, "id", id, "from", current.Size, "device_size", size, "uid", c.UID)
	}
	return v.info, nil
}

// SignalPolicyViolation logs a refusal the libvirt integration made on its
// own (a request file, a vol-delete of a volume in use) and sends it as
// EventPolicyViolation, so D-Bus clients see PolicyViolation.
func (m *Manager) SignalPolicyViolation(subject, code, message string) {
	m.log.Warn("policy violation", "subject", subject, "code", code, "violation", message)
	m.emit(Event{Kind: EventPolicyViolation, Violation: &Violation{Subject: subject, Code: code, Message: message}})
}

// NoteAllocation records how far a running guest's image reaches, as
// libvirt reports it (the disk's allocation: qemu's highest written
// offset on the device), and sends EventVolumeChanged when the volume's
// HighestAllocated moves. qemu allocates at the end of the image only, and
// its figure counts the writes of its run only, so a figure below what is
// known is ignored. Unknown volumes are ignored.
func (m *Manager) NoteAllocation(id string, allocation int64) {
	m.mu.Lock()
	v, ok := m.volumes[id]
	if !ok || allocation <= v.info.HighestAllocated {
		m.mu.Unlock()
		return
	}
	v.info.HighestAllocated = allocation
	info := v.info
	m.mu.Unlock()
	m.emit(Event{Kind: EventVolumeChanged, Volume: &info})
}
