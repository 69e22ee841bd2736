package backend

// What the libvirt integration (package virt) needs of the Manager beyond
// the D-Bus API: a pool's settings (backing roots, chunk size), finding
// the volume behind a disk path, growing a thin volume's device while a
// domain writes to it, and signalling what it refused.

import (
	"context"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/qcow2"
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
		return VolumeInfo{}, fmt.Errorf("%w: volume %q (%s): %w", ErrFailed, v.info.Name, id, err)
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

// Domains is what the Manager asks libvirt, through the libvirt
// integration (package virt implements it), so that backend stays free
// of libvirt: which domains exist and what their disks name, a storage
// volume's path, and the resize of a running domain's disk.
type Domains interface {
	// ListDomains returns every domain libvirt knows, running or only
	// defined, with the XML its disks are read from (the live one for a
	// running domain).
	ListDomains(ctx context.Context) ([]DomainState, error)
	// ResolveVolume is the path of a storage pool's volume
	// (virStoragePoolLookupByName, virStorageVolLookupByName, GetPath).
	ResolveVolume(ctx context.Context, pool, volume string) (string, error)
	// DiskAllocation is the highest offset qemu wrote on a running
	// domain's disk (virDomainGetBlockInfo's allocation).
	DiskAllocation(ctx context.Context, domain, disk string) (int64, error)
	// BlockResize sets a running domain's disk to size bytes of guest
	// size (virDomainBlockResize): qemu rewrites its own header and the
	// guest sees the new size.
	BlockResize(ctx context.Context, domain, disk string, size int64) error
}

// DomainState is one domain as Domains lists it.
type DomainState struct {
	Name string
	// State is libvirt's, as virsh domstate says it: "running",
	// "paused", "shut off", ...
	State string
	// Active: qemu runs (running, paused, ...); false for a domain that
	// is only defined.
	Active bool
	XML    []byte
}

// SetDomains gives the Manager its view of libvirt (nil: none). With it,
// Delete, Resize and Write consult the domains that name a volume's
// device, and CheckDomain resolves <disk type='volume'>.
func (m *Manager) SetDomains(d Domains) {
	m.mu.Lock()
	m.domains = d
	m.mu.Unlock()
}

func (m *Manager) domainsAPI() Domains {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.domains
}

// DomainUse is one disk of a domain that names a volume's device.
type DomainUse struct {
	Domain  string
	State   string // as DomainState.State
	Active  bool
	Disk    string // the disk's target, e.g. "vda"
	Backing bool   // the volume is a backing image of the disk, not its top
}

func (u DomainUse) String() string {
	s := fmt.Sprintf("in use by domain %s (%s) as disk %s", u.Domain, u.State, u.Disk)
	if u.Backing {
		s += " (a backing image of it)"
	}
	return s
}

// fileID identifies what a path opens: a device by its number, a file by
// its device and inode.
type fileID struct {
	block    bool
	dev, ino uint64
}

// identities are the fileIDs path stands for: what it resolves to, and
// for a loop device over a regular file, that file too (so /dev/loopN
// and the loop-pool file under it are one volume).
func identities(path string) []fileID {
	var st unix.Stat_t
	if path == "" || unix.Stat(path, &st) != nil {
		return nil
	}
	var ids []fileID
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		ids = append(ids, fileID{block: true, dev: uint64(st.Rdev)})
		if real, err := filepath.EvalSymlinks(path); err == nil {
			if file := hostblk.LoopBackingFile(real); file != "" {
				var fst unix.Stat_t
				// Only a regular file: an LV activated by loop has the PV's
				// device behind it, shared by every LV of the group.
				if unix.Stat(file, &fst) == nil && fst.Mode&unix.S_IFMT == unix.S_IFREG {
					ids = append(ids, fileID{dev: uint64(fst.Dev), ino: fst.Ino})
				}
			}
		}
	case unix.S_IFREG:
		ids = append(ids, fileID{dev: uint64(st.Dev), ino: st.Ino})
	}
	return ids
}

// domainsUsing lists the disks of libvirt's domains (running, paused or
// only defined) that name volume v's device or file under any name:
// /dev/VG/LV, /dev/mapper/VG-LV, /dev/dm-N, /dev/loopN, a request link,
// any symlink, a storage pool volume — compared by what they open
// (device number, inode), not by string. Without libvirt it returns
// nothing; when libvirt cannot be asked it returns an error (ErrBusy).
func (m *Manager) domainsUsing(ctx context.Context, v *volume) ([]DomainUse, error) {
	d := m.domainsAPI()
	if d == nil {
		return nil, nil
	}
	want := map[fileID]bool{}
	for _, p := range []string{v.info.DevicePath, v.backingPath, v.file} {
		for _, id := range identities(p) {
			want[id] = true
		}
	}
	if len(want) == 0 {
		return nil, nil
	}
	names := func(path string) bool {
		for _, id := range identities(path) {
			if want[id] {
				return true
			}
		}
		return false
	}
	doms, err := d.ListDomains(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: volume %q (%s): libvirt cannot be asked which domains use it (%w); retry once libvirtd answers", ErrBusy, v.info.Name, v.info.ID, err)
	}
	var uses []DomainUse
	for _, dom := range doms {
		name, disks, err := DomainDisks(dom.XML)
		if err != nil {
			return nil, fmt.Errorf("%w: volume %q (%s): domain %q: %w", ErrBusy, v.info.Name, v.info.ID, dom.Name, err)
		}
		if name == "" {
			name = dom.Name
		}
		for _, disk := range disks {
			path := disk.Path
			if disk.Type == "volume" && disk.Pool != "" && disk.Volume != "" {
				// A volume that no longer resolves names nothing here.
				path, _ = d.ResolveVolume(ctx, disk.Pool, disk.Volume)
			}
			use := DomainUse{Domain: name, State: dom.State, Active: dom.Active, Disk: disk.Target}
			if names(path) {
				uses = append(uses, use)
				continue
			}
			for _, b := range disk.Backing {
				if names(b) {
					use.Backing = true
					uses = append(uses, use)
					break
				}
			}
		}
	}
	return uses, nil
}

// refuseIfDomainsUse returns ErrBusy naming the domain when a running or
// paused domain uses volume v, and also for a domain that is only defined
// (shut off) unless allowInactive. op names the operation in the error.
func (m *Manager) refuseIfDomainsUse(ctx context.Context, v *volume, op string, allowInactive bool) error {
	uses, err := m.domainsUsing(ctx, v)
	if err != nil {
		return err
	}
	for _, u := range uses {
		if u.Active {
			return fmt.Errorf("%w: volume %q (%s): %s refused: %s; stop the domain first", ErrBusy, v.info.Name, v.info.ID, op, u)
		}
	}
	for _, u := range uses {
		if !allowInactive {
			return fmt.Errorf("%w: volume %q (%s): %s refused: %s; remove the disk from the domain's definition, or delete with the force option", ErrBusy, v.info.Name, v.info.ID, op, u)
		}
	}
	return nil
}

// resizeUnderDomain grows the guest size of a volume a running domain
// uses, through libvirt: qemu owns the image header while it runs, so
// volagent never writes it then. The device first grows by what qemu
// needs for a larger L1 table (and a chunk, when little is left past
// what qemu wrote). handled is false when no running domain uses v, and
// the caller resizes the image itself. Called with v's operation lock.
func (m *Manager) resizeUnderDomain(ctx context.Context, p *pool, v *volume, virtualSize int64) (handled bool, err error) {
	uses, err := m.domainsUsing(ctx, v)
	if err != nil {
		return true, err
	}
	var active []DomainUse
	for _, u := range uses {
		if u.Active {
			active = append(active, u)
		}
	}
	switch {
	case len(active) == 0:
		return false, nil
	case len(active) > 1 || active[0].Backing:
		return true, fmt.Errorf("%w: volume %q (%s): resize refused: %s; only the one domain whose disk it is may be running", ErrBusy, v.info.Name, v.info.ID, active[len(active)-1])
	}
	u := active[0]
	d := m.domainsAPI()
	// The header's cluster size does not change under qemu; reading it is
	// safe while qemu runs.
	dev, err := hostblk.OpenDevice(v.info.DevicePath, hostblk.OpenOptions{})
	if err != nil {
		return true, fmt.Errorf("%w: volume %q (%s): %w", ErrFailed, v.info.Name, v.info.ID, err)
	}
	size, err := dev.Size()
	var h *qcow2.Header
	if err == nil {
		h, err = qcow2.ReadHeader(dev.File(), size)
	}
	dev.Close()
	if err != nil {
		return true, fmt.Errorf("%w: volume %q (%s): reading its header: %w", ErrFailed, v.info.Name, v.info.ID, err)
	}
	c := h.ClusterSize()
	perL1 := h.L2Entries() * c
	need := roundUp((virtualSize+perL1-1)/perL1*8, c) + 2*c
	alloc, err := d.DiskAllocation(ctx, u.Domain, u.Disk)
	if err != nil {
		return true, fmt.Errorf("%w: volume %q (%s): domain %s disk %s: %w", ErrFailed, v.info.Name, v.info.ID, u.Domain, u.Disk, err)
	}
	if alloc = max(alloc, v.info.HighestAllocated); size-alloc < need {
		if size, err = m.growDeviceWithin(ctx, p, v, alloc+need, roundUp(alloc+need+p.cfg.ChunkSize, sizeAlignment)); err != nil {
			return true, err
		}
		m.poolChanged(p)
	}
	if err := d.BlockResize(ctx, u.Domain, u.Disk, virtualSize); err != nil {
		return true, fmt.Errorf("%w: volume %q (%s): resizing disk %s of domain %s through libvirt: %w", ErrFailed, v.info.Name, v.info.ID, u.Disk, u.Domain, err)
	}
	// Not re-read from the device: qemu owns the image while it runs.
	m.mu.Lock()
	if stored, ok := m.volumes[v.info.ID]; ok {
		stored.info.VirtualSize, stored.info.DeviceSize = virtualSize, size
		v.info = stored.info
	}
	m.mu.Unlock()
	info := v.info
	m.emit(Event{Kind: EventVolumeChanged, Volume: &info})
	m.log.Info("volume resized through libvirt", "pool", p.cfg.Name, "volume", v.info.Name, "id", v.info.ID, "domain", u.Domain, "disk", u.Disk, "virtual_size", virtualSize, "device_size", size)
	return true, nil
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
