package backend

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/bytesize"
	"github.com/volagent/volagent/qcow2"
)

// Volume states recorded in hostblk.VolumeMeta.State while an operation
// is making or removing a volume. Load removes every volume that still
// carries one: the operation that set it did not finish.
const (
	stateCreating  = "creating"
	stateImporting = "importing"
	stateDeleting  = "deleting"
)

// poolSpace returns a pool's capacity and free bytes: the volume group's
// for LVM, the filesystem's for a loop pool.
func (m *Manager) poolSpace(ctx context.Context, p *pool) (capacity, free int64, err error) {
	switch p.cfg.Type {
	case PoolLVM:
		vg, err := m.lvm.VolumeGroup(ctx, p.cfg.VolumeGroup)
		if err != nil {
			return 0, 0, err
		}
		return int64(vg.Size), int64(vg.Free), nil
	default:
		var st unix.Statfs_t
		if err := unix.Statfs(p.cfg.Directory, &st); err != nil {
			return 0, 0, fmt.Errorf("statfs %s: %w", p.cfg.Directory, err)
		}
		return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize, nil
	}
}

// scanPool lists a pool's volumes from the devices, removing the ones
// that crashed operations left marked in progress.
//
// Reading the volumes is most of a start-up over many volumes, so it
// begins as soon as the first device is there: a loop pool hands each
// volume over as it is attached, an LVM pool activates all its LVs with a
// fixed number of lvm commands (Activator.ActivateAll) first.
func (m *Manager) scanPool(ctx context.Context, p *pool) ([]*volume, error) {
	var (
		outMu sync.Mutex
		out   []*volume
		stale []scanFound // marked in progress: removed once the scan is done
	)
	// The headers are read a few volumes at a time: each costs the disk a
	// few small reads (closing a block device drops its page cache), which
	// a deeper queue overlaps.
	next := make(chan scanFound, scanReaders)
	var wg sync.WaitGroup
	for range scanReaders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range next {
				v := m.scanVolume(p, c)
				outMu.Lock()
				out = append(out, v)
				outMu.Unlock()
			}
		}()
	}
	// offer sends a volume to the readers, or sets it aside. It is called
	// from several goroutines at once (loop pools).
	offer := func(c scanFound) {
		switch m.scanAction(p, c) {
		case scanRead:
			next <- c
		case scanRemove:
			outMu.Lock()
			stale = append(stale, c)
			outMu.Unlock()
		}
	}
	err := m.findVolumes(ctx, p, offer)
	close(next)
	wg.Wait()
	if err != nil {
		return nil, err
	}
	for _, c := range stale {
		if err := m.removeDevice(ctx, p, c.name); err != nil {
			m.log.Error("could not remove a volume an interrupted operation left", "pool", p.cfg.Name, "volume", c.name, "state", c.meta.State, "err", err)
		} else {
			m.log.Warn("removed a volume an interrupted operation left", "pool", p.cfg.Name, "volume", c.name, "state", c.meta.State)
		}
	}
	return out, nil
}

// What scanPool does with a volume it found.
type scanActionKind int

const (
	scanSkip   scanActionKind = iota // not this scan's: left alone
	scanRead                         // listed, read from its device
	scanRemove                       // left by an interrupted operation
)

func (m *Manager) scanAction(p *pool, c scanFound) scanActionKind {
	switch {
	case m.isPending(VolumeID(p.cfg.Name, c.name)):
		return scanSkip // an operation of ours is on it; it registers the result
	case c.meta.State == "":
		return scanRead
	case p.shared != nil && (!c.madeHere || c.where != "" && c.where != ActiveLocal):
		// Another host's operation is on it (between lvcreate and its
		// activation nobody holds its lock yet), or its crash is that
		// host's to clean up when it starts again.
		return scanSkip
	}
	return scanRemove
}

// scanFound is a volume scanPool found on a pool's devices.
type scanFound struct {
	name, dev, file string
	meta            hostblk.VolumeMeta
	problem         string
	// Shared pools: the LV's size, where it is active and whether this
	// host made it (sharedLocks).
	lvSize   int64
	where    string
	madeHere bool
}

// findVolumes lists a pool's volumes, attaching or activating them, and
// hands each to offer.
func (m *Manager) findVolumes(ctx context.Context, p *pool, offer func(scanFound)) error {
	if p.cfg.Type == PoolLoop {
		_, err := p.loop.AttachAll(func(pv hostblk.PoolVolume) {
			offer(scanFound{name: pv.Name, dev: pv.Device, file: pv.File, meta: pv.Meta})
		})
		if err != nil {
			// One bad file must not hide the others; AttachAll gave them.
			m.log.Error("loop pool: some volumes could not be attached", "pool", p.cfg.Name, "err", err)
		}
		return nil
	}
	lvs, err := m.lvm.LogicalVolumes(ctx, p.cfg.VolumeGroup)
	if err != nil {
		return err
	}
	var where map[string]lvState
	if p.shared != nil {
		if where, err = m.sharedLocks(ctx, p); err != nil {
			return err
		}
	}
	var found []scanFound
	var toActivate []hostblk.LV
	for _, lv := range lvs {
		meta, owned, err := hostblk.ParseVolumeTags(lv.Tags)
		if !owned && err == nil {
			continue // not volagent's
		}
		st := where[lv.Name]
		f := scanFound{name: lv.Name, meta: meta, lvSize: int64(lv.Size), where: st.where, madeHere: st.madeHere}
		if err != nil {
			// Tags another tool mangled: the LV is volagent's (it has
			// "volagent." tags) but what it is cannot be told.
			f.problem = fmt.Sprintf("its LVM tags cannot be read: %v", err)
		} else if p.shared == nil && m.scanAction(p, f) == scanRead {
			// Shared pools activate on demand, under the VG's locks.
			toActivate = append(toActivate, lv)
		}
		found = append(found, f)
	}
	var activated map[string]hostblk.Activation
	if len(toActivate) > 0 {
		activated = p.act.ActivateAll(ctx, p.cfg.VolumeGroup, toActivate)
	}
	for _, f := range found {
		if a, ok := activated[f.name]; ok {
			f.dev = a.Path
			if a.Err != nil {
				f.problem = fmt.Sprintf("it cannot be activated: %v", a.Err)
			}
		}
		offer(f)
	}
	return nil
}

// scanVolume reads one volume scanPool found.
func (m *Manager) scanVolume(p *pool, c scanFound) *volume {
	id := VolumeID(p.cfg.Name, c.name)
	var v *volume
	if p.shared != nil && c.problem == "" {
		m.mu.Lock()
		prev := m.volumes[id]
		m.mu.Unlock()
		v = m.sharedVolume(p, c.name, c.meta, c.lvSize, c.where, prev)
	} else {
		v = m.readVolume(p, c.name, c.dev, c.file, c.meta)
	}
	if c.problem != "" && v.problem == "" {
		v.problem = c.problem
		v.info.Problem = c.problem
	}
	if v.problem != "" {
		m.log.Error("volume has a problem", "pool", p.cfg.Name, "volume", c.name, "id", id, "problem", v.problem)
	}
	return v
}

// scanReaders is how many volumes a scan reads at once.
const scanReaders = 16

func (m *Manager) isPending(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.pending[id]
	return ok
}

// createdVolume builds the volume CreateOverlay just made from what it
// wrote, as readVolume would read it back: the header Create wrote says
// the format, virtual size and backing, and its metadata clusters are
// all the image has allocated (consecutive from 0, each with refcount 1),
// so a check would find it clean, ending where the metadata ends.
func (m *Manager) createdVolume(p *pool, name, dev, file string, meta hostblk.VolumeMeta, opts qcow2.CreateOptions, img newImage) *volume {
	v := &volume{
		info: VolumeInfo{
			ID: VolumeID(p.cfg.Name, name), Name: name, Pool: p.cfg.Name, DevicePath: dev, Role: Role(meta.Role),
			Origin:           meta.Origin,
			ActiveOn:         ActiveLocal,
			Format:           "qcow2",
			VirtualSize:      img.layout.VirtualSize,
			DeviceSize:       img.deviceSize,
			HighestAllocated: img.layout.MetadataClusters * img.layout.ClusterSize,
			BackingName:      opts.BackingFile,
			BackingFormat:    opts.BackingFormat,
		},
		meta: meta, file: file, backingPath: dev, clusterSize: img.layout.ClusterSize,
	}
	if file != "" {
		v.backingPath = file
	}
	return v
}

// readVolume builds a volume from its device: the qcow2 header says the
// format, virtual size and backing; the refcount structures say how far
// the image reaches (qcow2.AllocationEnd, a few reads whatever the
// image's size). A header that is refused becomes the volume's problem, as
// does what the background check found (bgcheck.go), which reads every
// table.
func (m *Manager) readVolume(p *pool, name, dev, file string, meta hostblk.VolumeMeta) *volume {
	v := &volume{
		info: VolumeInfo{ID: VolumeID(p.cfg.Name, name), Name: name, Pool: p.cfg.Name, DevicePath: dev, Role: Role(meta.Role), Origin: meta.Origin, ActiveOn: ActiveLocal},
		meta: meta, file: file, backingPath: dev,
	}
	if file != "" {
		v.backingPath = file
	}
	setProblem := func(format string, args ...any) {
		v.problem = fmt.Sprintf(format, args...)
		v.info.Problem = v.problem
	}
	if dev == "" {
		setProblem("it has no block device")
		return v
	}
	d, err := hostblk.OpenDevice(dev, hostblk.OpenOptions{})
	if err != nil {
		setProblem("its device cannot be opened: %v", err)
		return v
	}
	defer d.Close()
	size, err := d.Size()
	if err != nil {
		setProblem("its device size cannot be read: %v", err)
		return v
	}
	v.info.DeviceSize = size
	h, end, err := qcow2.AllocationEnd(d.File(), size)
	if h == nil {
		setProblem("its qcow2 header is refused: %v", err)
		return v
	}
	v.info.Format = "qcow2"
	v.info.VirtualSize = int64(h.Size)
	v.clusterSize = h.ClusterSize()
	v.info.BackingName, v.info.BackingFormat = h.BackingFile, h.BackingFormat
	if err != nil {
		setProblem("its refcount structures cannot be read: %v", err)
		return v
	}
	v.info.HighestAllocated = end
	m.mu.Lock()
	problem := m.checked[v.info.ID]
	m.mu.Unlock()
	if problem != "" {
		setProblem("%s", problem)
	}
	return v
}

// createDevice makes the device of a new volume, marked with meta (whose
// State says the volume is in progress), and returns its block device and
// (loop pools) backing file. op names the operation for crash points.
func (m *Manager) createDevice(ctx context.Context, p *pool, op, name string, size int64, meta hostblk.VolumeMeta) (dev, file string, err error) {
	switch p.cfg.Type {
	case PoolLVM:
		if err := p.refuseIfLeaseLost("make volume " + name); err != nil {
			return "", "", err
		}
		vg, err := m.lvm.VolumeGroup(ctx, p.cfg.VolumeGroup)
		if err != nil {
			return "", "", fmt.Errorf("%w: pool %q: %w", ErrFailed, p.cfg.Name, err)
		}
		if int64(vg.Free) < size {
			return "", "", fmt.Errorf("%w: pool %q: volume group %q has %s free, the volume needs %s (initial size)",
				ErrNoSpace, p.cfg.Name, p.cfg.VolumeGroup, bytesize.Format(vg.Free), bytesize.Format(size))
		}
		tags, err := meta.Tags()
		if err != nil {
			return "", "", fmt.Errorf("%w: volume %q: metadata does not fit in LVM tags: %w", ErrInvalidArgument, name, err)
		}
		_, err = m.lvm.CreateLV(ctx, p.cfg.VolumeGroup, name, uint64(size), hostblk.CreateOptions{
			Tags:       tags,
			Contiguous: p.act.Mode() == hostblk.ActivationLoop,
		})
		switch {
		case errors.Is(err, hostblk.ErrLVExists):
			return "", "", fmt.Errorf("%w: pool %q: a logical volume named %q already exists in volume group %q (not a volagent volume, or one being made)", ErrInvalidArgument, p.cfg.Name, name, p.cfg.VolumeGroup)
		case errors.Is(err, hostblk.ErrNoSpace):
			return "", "", fmt.Errorf("%w: pool %q: volume group %q cannot hold %s more (contiguous=%v): %w", ErrNoSpace, p.cfg.Name, p.cfg.VolumeGroup, bytesize.Format(size), p.act.Mode() == hostblk.ActivationLoop, err)
		case err != nil:
			return "", "", fmt.Errorf("%w: pool %q: creating LV %q: %w", ErrFailed, p.cfg.Name, name, err)
		}
		if err := m.crashPoint(op + ":device"); err != nil {
			return "", "", err
		}
		dev, err = p.act.Activate(ctx, p.cfg.VolumeGroup, name)
		if err != nil {
			if rerr := m.removeDevice(context.WithoutCancel(ctx), p, name); rerr != nil {
				m.log.Error("could not remove a half-made volume; the next Load removes it", "pool", p.cfg.Name, "volume", name, "err", rerr)
			}
			return "", "", fmt.Errorf("%w: pool %q: activating LV %q: %w", ErrFailed, p.cfg.Name, name, err)
		}
		if err := m.crashPoint(op + ":activated"); err != nil {
			return "", "", err
		}
		return dev, "", nil
	default:
		pv, err := p.loop.Create(name, size, meta)
		switch {
		case errors.Is(err, hostblk.ErrVolumeExists):
			return "", "", fmt.Errorf("%w: pool %q: a file for %q already exists in %s", ErrInvalidArgument, p.cfg.Name, name, p.cfg.Directory)
		case errors.Is(err, unix.ENOSPC):
			return "", "", fmt.Errorf("%w: pool %q: %w", ErrNoSpace, p.cfg.Name, err)
		case err != nil:
			return "", "", fmt.Errorf("%w: pool %q: %w", ErrFailed, p.cfg.Name, err)
		}
		if err := m.crashPoint(op + ":device"); err != nil {
			return "", "", err
		}
		return pv.Device, pv.File, nil
	}
}

// removeDevice deactivates and removes a volume's device. A device already
// gone is not an error, so a retried cleanup completes.
func (m *Manager) removeDevice(ctx context.Context, p *pool, name string) error {
	switch p.cfg.Type {
	case PoolLVM:
		// Loop activation: detach first, or the loop device would keep
		// mapping the freed extents.
		if err := p.act.Deactivate(ctx, p.cfg.VolumeGroup, name); err != nil && !errors.Is(err, hostblk.ErrLVNotFound) {
			return fmt.Errorf("deactivating LV %q: %w", name, err)
		}
		if err := m.lvm.RemoveLV(ctx, p.cfg.VolumeGroup, name); err != nil && !errors.Is(err, hostblk.ErrLVNotFound) {
			return fmt.Errorf("removing LV %q: %w", name, err)
		}
	default:
		if err := p.loop.Remove(name); err != nil && !errors.Is(err, hostblk.ErrVolumeNotFound) {
			return err
		}
	}
	return nil
}

// setState records a volume's state ("" when finished) on its device's
// metadata, in one atomic step (one lvchange, one setxattr). On a loop
// pool the finished mark ("") is also made durable (fsync of the file);
// a lost in-progress mark needs no such care (a lost "deleting" leaves a
// complete volume whose Delete never returned). For LVM see commit.
func (m *Manager) setState(ctx context.Context, p *pool, name string, meta hostblk.VolumeMeta, from, to string) error {
	switch p.cfg.Type {
	case PoolLVM:
		if from != "" {
			tag, err := stateTag(meta, from)
			if err != nil {
				return err
			}
			if err := m.lvm.DeleteLVTags(ctx, p.cfg.VolumeGroup, name, tag); err != nil {
				return err
			}
		}
		if to != "" {
			tag, err := stateTag(meta, to)
			if err != nil {
				return err
			}
			return m.lvm.AddLVTags(ctx, p.cfg.VolumeGroup, name, tag)
		}
		return nil
	default:
		meta.State = to
		if to == "" {
			return p.loop.SetMetaDurable(name, meta)
		}
		return p.loop.SetMeta(name, meta)
	}
}

// stateTag is the LVM tag that records state: the one tag VolumeMeta.Tags
// adds for it (hostblk keeps the key to itself).
func stateTag(meta hostblk.VolumeMeta, state string) (string, error) {
	meta.State = ""
	without, err := meta.Tags()
	if err != nil {
		return "", err
	}
	meta.State = state
	with, err := meta.Tags()
	if err != nil {
		return "", err
	}
	have := map[string]bool{}
	for _, t := range without {
		have[t] = true
	}
	for _, t := range with {
		if !have[t] {
			return t, nil
		}
	}
	return "", fmt.Errorf("no LVM tag records state %q", state)
}

// growDevice grows a volume's device to at least size bytes and returns
// its new size.
func (m *Manager) growDevice(ctx context.Context, p *pool, v *volume, size int64) (int64, error) {
	return m.growDeviceWithin(ctx, p, v, size, size)
}

// growDeviceWithin grows a volume's device to preferred bytes, or, when
// the pool cannot give that much, to minimum (what the caller cannot do
// without), and returns its new size. So a pool's last extents are used
// rather than refused because a whole ChunkSize no longer fits. When not
// even minimum fits, the error wraps ErrNoSpace and names the pool, the
// volume, the sizes and the pool's free space; the device is unchanged.
func (m *Manager) growDeviceWithin(ctx context.Context, p *pool, v *volume, minimum, preferred int64) (int64, error) {
	if err := p.refuseIfLeaseLost("grow volume " + v.info.Name); err != nil {
		return 0, err
	}
	minimum = roundUp(minimum, sizeAlignment)
	preferred = roundUp(max(preferred, minimum), sizeAlignment)
	var lvSize uint64 // the extended LV's size, for RefreshSize
	grow := func(size int64) error {
		if p.cfg.Type == PoolLVM {
			lv, err := m.lvm.ExtendLV(ctx, p.cfg.VolumeGroup, v.info.Name, uint64(size))
			lvSize = lv.Size
			return err
		}
		_, err := p.loop.Grow(v.info.Name, size)
		return err
	}
	noSpace := func(err error) bool { return errors.Is(err, hostblk.ErrNoSpace) || errors.Is(err, unix.ENOSPC) }
	err := grow(preferred)
	if noSpace(err) && minimum < preferred {
		err = grow(minimum)
	}
	if noSpace(err) {
		return 0, m.poolFull(ctx, p, v, minimum, err)
	}
	if err != nil {
		return 0, fmt.Errorf("%w: growing volume %q: %w", ErrFailed, v.info.Name, err)
	}
	if p.cfg.Type == PoolLVM {
		refresh := func() error { return p.act.Refresh(ctx, p.cfg.VolumeGroup, v.info.Name) }
		if r, ok := p.act.(hostblk.SizeRefresher); ok && lvSize > 0 {
			refresh = func() error { return r.RefreshSize(ctx, p.cfg.VolumeGroup, v.info.Name, lvSize) }
		}
		if err := refresh(); err != nil {
			return 0, fmt.Errorf("%w: refreshing volume %q after growing it: %w", ErrFailed, v.info.Name, err)
		}
	}
	info, err := hostblk.Inspect(v.info.DevicePath)
	if err != nil {
		return 0, fmt.Errorf("%w: volume %q: %w", ErrFailed, v.info.Name, err)
	}
	return info.Size, nil
}

// poolFull is the ErrNoSpace error of a device that cannot grow to size:
// it names the pool, the volume, the sizes and what the pool has left.
func (m *Manager) poolFull(ctx context.Context, p *pool, v *volume, size int64, cause error) error {
	where := fmt.Sprintf("pool %q", p.cfg.Name)
	if p.cfg.Type == PoolLVM {
		where += fmt.Sprintf(" (volume group %q)", p.cfg.VolumeGroup)
	}
	left := "unknown free space"
	if capacity, free, err := m.poolSpace(context.WithoutCancel(ctx), p); err == nil {
		left = fmt.Sprintf("%s free of %s", bytesize.Format(free), bytesize.Format(capacity))
	}
	if p.cfg.Type == PoolLVM && p.act.Mode() == hostblk.ActivationLoop {
		// Free extents elsewhere in the volume group do not help.
		left += "; loop activation can only grow a volume into the extents right after it"
	}
	return fmt.Errorf("%w: %s is full: volume %q needs its device grown from %s to %s, and the pool has %s (%w)",
		ErrNoSpace, where, v.info.Name, bytesize.Format(v.info.DeviceSize), bytesize.Format(size), left, cause)
}

func roundUp(x, a int64) int64 { return (x + a - 1) / a * a }
