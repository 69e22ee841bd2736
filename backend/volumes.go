package backend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/qcow2"
)

// Limits of the guest-facing operations.
const (
	// MaxWriteSize bounds one Write: it is for small guest writes (a
	// config drive, a boot sector), not bulk data (use Import).
	MaxWriteSize = 16 << 20
	// maxGrowAttempts bounds how often one write grows a device and
	// retries before giving up.
	maxGrowAttempts = 8
	// headerBlockSize is the block size new images are planned with: the
	// largest logical block size volagent's devices have (loop devices
	// use 4096), so the metadata fits whatever the device reports.
	headerBlockSize = 4096
)

// resolvedBacking is the backing of a new overlay after the policy
// checks.
type resolvedBacking struct {
	name     string // recorded in the qcow2 header
	format   string
	metaName string // recorded in the volume metadata: the backing volume's ID, or name
	volumeID string // the managed backing volume, "" for a path
	// virtualSize is the backing's guest size; 0 if it could not be read
	// (audit mode let a refused backing through).
	virtualSize int64
}

// CreateOverlay makes a new qcow2 overlay volume over a file under the
// pool's backing roots (BackingPath + BackingFormat) or over a managed
// volume (BackingVolume), and returns it complete.
//
// The overlay is thin: its device starts at the pool's InitialSize (or
// what the metadata needs, if more) and grows by ChunkSize when volagent
// writes to it. The header records the backing name — the path as given
// (cleaned), or for a managed backing the volume's loop-pool file or LV
// device — and its format, so nothing ever probes.
//
// Results: ErrNotFound (pool, backing volume, backing file);
// ErrInvalidArgument (a name that is invalid or taken, both or neither of
// BackingPath and BackingVolume, a relative path, a format other than raw
// or qcow2, sizes); ErrPolicyViolation in enforce mode for a backing
// outside the roots or whose chain is refused (audit mode logs, sends
// EventPolicyViolation and goes on); ErrBusy if the backing volume is
// being deleted; ErrNoSpace; ErrFailed. On any error no volume is left.
func (m *Manager) CreateOverlay(ctx context.Context, c Caller, req OverlayRequest) (VolumeInfo, error) {
	done, err := m.beginOp("CreateOverlay")
	if err != nil {
		return VolumeInfo{}, err
	}
	defer done()
	p, err := m.openedPool(req.Pool)
	if err != nil {
		return VolumeInfo{}, err
	}
	if err := ValidateVolumeName(req.Name); err != nil {
		return VolumeInfo{}, err
	}
	if req.VirtualSize < 0 || req.VirtualSize%512 != 0 {
		return VolumeInfo{}, fmt.Errorf("%w: virtual size %d: want 0 (the backing's size) or a positive multiple of 512", ErrInvalidArgument, req.VirtualSize)
	}
	if !originPattern().MatchString(req.Origin) {
		return VolumeInfo{}, fmt.Errorf("%w: origin %q: want at most 64 characters of [a-zA-Z0-9:._-]", ErrInvalidArgument, req.Origin)
	}
	id := VolumeID(p.cfg.Name, req.Name)
	if err := m.reserve(id, "create", p.cfg.Name, req.Name); err != nil {
		return VolumeInfo{}, err
	}
	defer m.release(id)

	if err := m.ensureBackingActive(ctx, req.BackingVolume); err != nil {
		return VolumeInfo{}, err
	}
	b, err := m.resolveBacking(p, req)
	if err != nil {
		return VolumeInfo{}, err
	}
	if b.volumeID != "" {
		defer m.releaseBacking(b.volumeID)
	}
	opts := qcow2.CreateOptions{VirtualSize: req.VirtualSize, ClusterSize: req.ClusterSize, BackingFile: b.name, BackingFormat: b.format}
	if opts.VirtualSize == 0 {
		if b.virtualSize == 0 {
			return VolumeInfo{}, fmt.Errorf("%w: the backing's virtual size cannot be read (see the policy violation); give VirtualSize", ErrInvalidArgument)
		}
		opts.VirtualSize = roundUp(b.virtualSize, 512)
	}
	meta := hostblk.VolumeMeta{Role: string(RoleOverlay), BackingName: b.metaName, BackingFormat: b.format, State: stateCreating, Origin: req.Origin}
	dev, file, img, err := m.makeVolume(ctx, p, "create", req.Name, opts, meta)
	if err != nil {
		return VolumeInfo{}, err
	}
	if err := m.commit(ctx, p, "create", req.Name, dev, meta); err != nil {
		return VolumeInfo{}, err
	}
	meta.State = ""
	// Not read back and checked: the image is what Create just wrote (Load
	// reads and checks every volume at start).
	v := m.createdVolume(p, req.Name, dev, file, meta, opts, img)
	m.register(v)
	m.poolChanged(p)
	m.log.Info("overlay created", "pool", p.cfg.Name, "volume", req.Name, "id", id, "backing", b.name, "backing_format", b.format, "uid", c.UID)
	return v.info, nil
}

// reserve takes a volume's name for an operation making it.
func (m *Manager) reserve(id, op, poolName, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errShuttingDown(op)
	}
	if _, ok := m.volumes[id]; ok {
		return fmt.Errorf("%w: pool %q already has a volume named %q", ErrInvalidArgument, poolName, name)
	}
	if other, ok := m.pending[id]; ok {
		return fmt.Errorf("%w: pool %q: volume %q is being made or removed (%s)", ErrInvalidArgument, poolName, name, other)
	}
	m.pending[id] = op
	return nil
}

func (m *Manager) release(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.pending, id)
}

func (m *Manager) releaseBacking(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.backingUsers[id]--; m.backingUsers[id] <= 0 {
		delete(m.backingUsers, id)
	}
}

// register lists a complete volume and tells subscribers. The Manager
// made it, so it needs no background check.
func (m *Manager) register(v *volume) {
	m.mu.Lock()
	m.volumes[v.info.ID] = v
	m.checked[v.info.ID] = ""
	m.mu.Unlock()
	info := v.info
	m.emit(Event{Kind: EventVolumeAdded, Volume: &info})
}

// newImage is what makeVolume wrote: the layout of the new image and the
// size of the device it is on.
type newImage struct {
	layout     *qcow2.CreateLayout
	deviceSize int64
}

// makeVolume creates a volume's device marked with meta.State and writes
// a new qcow2 image onto it, flushed. On an error nothing is left behind
// (except after a simulated crash, which skips cleanup as a real one
// would).
func (m *Manager) makeVolume(ctx context.Context, p *pool, op, name string, opts qcow2.CreateOptions, meta hostblk.VolumeMeta) (dev, file string, img newImage, err error) {
	// The refcount table covers what the image can grow to, so neither
	// volagent nor qemu has to move it when the device grows.
	capacity, err := qcow2.MaxImageSize(opts)
	if err != nil {
		return "", "", img, fmt.Errorf("%w: %w", ErrInvalidArgument, err)
	}
	planned := opts
	planned.BlockSize = headerBlockSize
	layout, err := qcow2.PlanCreate(capacity, planned)
	if err != nil {
		if qcow2.IsRefusal(err) {
			return "", "", img, fmt.Errorf("%w: %w", ErrPolicyViolation, err)
		}
		return "", "", img, fmt.Errorf("%w: %w", ErrInvalidArgument, err)
	}
	size := roundUp(max(p.cfg.InitialSize, layout.WriteSize), sizeAlignment)

	dev, file, err = m.createDevice(ctx, p, op, name, size, meta)
	if err != nil {
		return "", "", img, err
	}
	cleanup := func(cause error) error {
		if errors.Is(cause, errSimulatedCrash) {
			return cause
		}
		if rerr := m.removeDevice(context.WithoutCancel(ctx), p, name); rerr != nil {
			m.log.Error("could not remove a half-made volume; the next Load removes it", "pool", p.cfg.Name, "volume", name, "err", rerr)
		}
		return cause
	}
	// A loop pool's device is over a file Create just made sparse: it
	// reads zeros, so only the metadata's non-zero blocks are written. An
	// LV may hold an earlier tenant's data: every block is written.
	opts.TargetZeroed = p.cfg.Type == PoolLoop
	img, err = writeNewImage(dev, capacity, opts)
	if err != nil {
		return "", "", img, cleanup(fmt.Errorf("%w: pool %q: volume %q: %w", ErrFailed, p.cfg.Name, name, err))
	}
	if err := m.crashPoint(op + ":header"); err != nil {
		return "", "", img, err
	}
	return dev, file, img, nil
}

// commit clears a volume's in-progress mark: from now on it is complete.
// When it returns the mark is durable, so a volume reported created
// survives a power loss (without that the next Load would find it still
// in progress and delete it): on a loop pool setState fsyncs the file; on
// LVM, lvchange writes the VG metadata with O_DIRECT and never flushes the
// PV (its only fsyncs are of /etc/lvm/backup), so the write may sit in a
// volatile write cache, or in unjournalled extents of a PV that is a loop
// over a sparse file. A flush of the LV's device reaches the PVs under it
// (device-mapper and loop pass flushes down) and so the new metadata; LVM
// takes the copy with the highest sequence number at the next scan.
// makeVolume flushed the image before, so a durable mark never stands for
// an image that is not (see hostblk.LoopPool.Create for the whole
// argument).
func (m *Manager) commit(ctx context.Context, p *pool, op, name, dev string, meta hostblk.VolumeMeta) error {
	err := m.setState(ctx, p, name, meta, meta.State, "")
	if err == nil && p.cfg.Type == PoolLVM {
		err = hostblk.FlushDevice(dev)
	}
	if err != nil {
		if rerr := m.removeDevice(context.WithoutCancel(ctx), p, name); rerr != nil {
			m.log.Error("could not remove a half-made volume; the next Load removes it", "pool", p.cfg.Name, "volume", name, "err", rerr)
		}
		return fmt.Errorf("%w: pool %q: volume %q: marking it complete: %w", ErrFailed, p.cfg.Name, name, err)
	}
	return m.crashPoint(op + ":committed")
}

// writeNewImage writes a qcow2 image onto the device at path as the CLI's
// create does: an exclusive open holding qemu-img's writer locks (a
// device qemu holds is refused, ErrBusy), direct I/O where the device
// allows it, one write of the metadata (opts.TargetZeroed: of its
// non-zero blocks), a flush.
func writeNewImage(path string, capacity int64, opts qcow2.CreateOptions) (newImage, error) {
	tgt, err := hostblk.OpenTarget(path, false)
	if errors.Is(err, hostblk.ErrNoDirectIO) {
		tgt, err = hostblk.OpenTarget(path, true)
	}
	if errors.Is(err, hostblk.ErrTargetBusy) {
		return newImage{}, fmt.Errorf("%w: %w", ErrBusy, err)
	}
	if err != nil {
		return newImage{}, err
	}
	defer tgt.Close()
	if !tgt.BlockDevice {
		return newImage{}, fmt.Errorf("%s: not a block device", path)
	}
	opts.BlockSize = tgt.BlockSize
	layout, err := qcow2.Create(tgt.File, capacity, opts)
	if err != nil {
		return newImage{}, err
	}
	return newImage{layout: layout, deviceSize: tgt.Size}, nil
}

// resolveBacking applies the policy to an overlay's backing and reads its
// virtual size. A managed backing volume is counted as in use until
// releaseBacking.
func (m *Manager) resolveBacking(p *pool, req OverlayRequest) (resolvedBacking, error) {
	var b resolvedBacking
	gate := m.gateFor(p)
	switch {
	case req.BackingPath != "" && req.BackingVolume != "":
		return b, fmt.Errorf("%w: give BackingPath or BackingVolume, not both", ErrInvalidArgument)
	case req.BackingPath == "" && req.BackingVolume == "":
		return b, fmt.Errorf("%w: give BackingPath (with BackingFormat) or BackingVolume", ErrInvalidArgument)
	case req.BackingVolume != "":
		m.mu.Lock()
		bv, ok := m.volumes[req.BackingVolume]
		op, pending := m.pending[req.BackingVolume]
		if ok && !pending {
			m.backingUsers[req.BackingVolume]++
		}
		m.mu.Unlock()
		switch {
		case !ok:
			return b, fmt.Errorf("%w: backing volume %q", ErrNotFound, req.BackingVolume)
		case pending:
			return b, fmt.Errorf("%w: backing volume %q (%s) is being removed (%s)", ErrBusy, bv.info.Name, req.BackingVolume, op)
		}
		b.volumeID, b.metaName = req.BackingVolume, req.BackingVolume
		b.name, b.format = bv.backingPath, bv.info.Format
		if req.BackingFormat != "" && req.BackingFormat != b.format {
			m.releaseBacking(b.volumeID)
			return b, fmt.Errorf("%w: backing format %q: backing volume %q is %s", ErrInvalidArgument, req.BackingFormat, bv.info.Name, b.format)
		}
		if bv.problem != "" || b.format == "" {
			subject := fmt.Sprintf("backing volume %q (%s)", bv.info.Name, bv.info.ID)
			if err := m.policyRefusal(p, subject, fmt.Errorf("%s", bv.problem)); err != nil || b.format == "" {
				m.releaseBacking(b.volumeID)
				if err == nil {
					err = fmt.Errorf("%w: %s: %s", ErrInvalidArgument, subject, bv.problem)
				}
				return b, err
			}
		}
	default:
		if !filepath.IsAbs(req.BackingPath) {
			return b, fmt.Errorf("%w: backing path %q: must be absolute", ErrInvalidArgument, req.BackingPath)
		}
		if _, err := qcow2.ParseFormat(req.BackingFormat); err != nil {
			return b, fmt.Errorf("%w: backing format: %w", ErrInvalidArgument, err)
		}
		if filepath.Clean(req.BackingPath) != req.BackingPath {
			// The kernel takes ".." after the symlinks before it; a cleaned
			// name could be a different file from the one asked for.
			return b, fmt.Errorf("%w: backing path %q: not a clean path (no . or .. components, no doubled or trailing slash)", ErrInvalidArgument, req.BackingPath)
		}
		b.name, b.format, b.metaName = req.BackingPath, req.BackingFormat, req.BackingPath
		if _, err := os.Stat(b.name); errors.Is(err, os.ErrNotExist) {
			return b, fmt.Errorf("%w: backing path %q does not exist", ErrNotFound, b.name)
		}
		if _, err := gate.Resolve("/", b.name); err != nil {
			if !qcow2.IsRefusal(err) {
				return b, fmt.Errorf("%w: backing path %q: %w", ErrFailed, b.name, err)
			}
			if err := m.policyRefusal(p, fmt.Sprintf("backing %q", b.name), err); err != nil {
				return b, err
			}
		}
	}

	// The backing's own chain must be explicit and clean: opened through
	// the gate, each layer as the format its parent records.
	disk, err := qcow2.OpenChain(b.name, b.format, gate)
	if err == nil {
		b.virtualSize = disk.Size()
		err = headerInRaw(disk, b.name)
		disk.Close()
		if err == nil {
			return b, nil
		}
	}
	if !qcow2.IsRefusal(err) {
		if b.volumeID != "" {
			m.releaseBacking(b.volumeID)
		}
		if errors.Is(err, os.ErrNotExist) {
			return b, fmt.Errorf("%w: backing %q: %w", ErrNotFound, b.name, err)
		}
		return b, fmt.Errorf("%w: backing %q: %w", ErrFailed, b.name, err)
	}
	if perr := m.policyRefusal(p, fmt.Sprintf("backing %q", b.name), err); perr != nil {
		if b.volumeID != "" {
			m.releaseBacking(b.volumeID)
		}
		return b, perr
	}
	// Audit mode: the chain below is refused but allowed; the top may
	// still tell its size.
	if f, ferr := os.Open(b.name); ferr == nil {
		if size, serr := f.Seek(0, 2); serr == nil {
			if vs, verr := qcow2.BackingVirtualSize(f, size, b.format); verr == nil {
				b.virtualSize = vs
			}
		}
		f.Close()
	}
	return b, nil
}

// headerInRaw refuses a chain whose raw layer (the backing itself, or the
// bottom of its qcow2 chain) starts with an image header, as the domain
// policy would at the domain's start: a tool that probes would misread it.
func headerInRaw(d qcow2.Disk, name string) error {
	for {
		img, ok := d.(*qcow2.Image)
		if !ok || img.Backing() == nil {
			break
		}
		d = img.Backing()
	}
	if d.Format() != "raw" {
		return nil
	}
	head := make([]byte, qcow2.DetectSize)
	n, err := d.ReadAt(head, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("reading the first sector of the raw layer of %s: %w", name, err)
	}
	if found := qcow2.DetectImageHeader(head[:n]); found != "" {
		return &qcow2.FieldError{Field: "first sector", Value: found, Err: qcow2.ErrHeaderInRaw,
			Reason: "the raw layer of backing " + name + " starts with a " + found + " header; any tool that probes formats would misread it (was it meant to be " + found + "?)"}
	}
	return nil
}

// policyRefusal applies the pool's policy to a refusal: in enforce mode it
// returns ErrPolicyViolation; in audit mode it logs each violation, sends
// EventPolicyViolation and returns nil.
func (m *Manager) policyRefusal(p *pool, subject string, refusal error) error {
	if p.cfg.Policy != PolicyAudit {
		return fmt.Errorf("%w: pool %q (policy enforce): %s: %w", ErrPolicyViolation, p.cfg.Name, subject, refusal)
	}
	violations := qcow2.Violations(refusal)
	if len(violations) == 0 {
		violations = []*qcow2.FieldError{{Field: "volume", Value: subject, Reason: refusal.Error(), Err: errors.New("policy")}}
	}
	for _, fe := range violations {
		code := fe.Code()
		m.log.Warn("policy violation allowed (audit mode)", "pool", p.cfg.Name, "subject", subject, "code", code, "violation", fe.Error())
		m.emit(Event{Kind: EventPolicyViolation, Violation: &Violation{Subject: subject, Code: code, Message: fe.Error()}})
	}
	return nil
}

// DeleteOptions are Delete's options.
type DeleteOptions struct {
	// Force deletes a volume that shut-off (defined, inactive) libvirt
	// domains still name; a running or paused domain's disk is never
	// deleted.
	Force bool
}

// Delete removes a volume and its device. Results: ErrNotFound; ErrBusy
// if it backs another managed volume (by metadata or by the name in that
// volume's header), an operation or job is using it, its device is in
// use (checkNotInUse: qemu's image locks, an exclusive open, kernel
// holders), a libvirt domain names it (running or paused; a shut-off one
// too, unless opts.Force), or libvirt cannot be asked; ErrFailed. A crash
// during Delete leaves the volume marked "deleting", and the next Load
// finishes removing it.
func (m *Manager) Delete(ctx context.Context, c Caller, id string) error {
	return m.DeleteWith(ctx, c, id, DeleteOptions{})
}

// DeleteWith is Delete with options.
func (m *Manager) DeleteWith(ctx context.Context, c Caller, id string, opts DeleteOptions) error {
	v, p, done, err := m.beginVolumeOp("Delete", id)
	if err != nil {
		return err
	}
	defer done()
	lock := m.opLock(id)
	if !lock.TryLock() {
		return fmt.Errorf("%w: volume %q (%s): another operation on it is running", ErrBusy, v.info.Name, id)
	}
	defer lock.Unlock()

	m.mu.Lock()
	busy := m.dependentLocked(&v)
	if op, ok := m.pending[id]; ok {
		busy = fmt.Sprintf("%s in progress", op)
	}
	if busy == "" {
		m.pending[id] = "delete"
	}
	m.mu.Unlock()
	if busy != "" {
		return fmt.Errorf("%w: volume %q (%s): %s", ErrBusy, v.info.Name, id, busy)
	}
	defer m.release(id)

	// Known to be unused before it is marked for deletion: the domain
	// first, whose name says more than the qemu process holding the locks.
	if err := m.refuseIfDomainsUse(ctx, &v, "delete", opts.Force); err != nil {
		return err
	}
	if err := m.checkNotInUse(ctx, &v); err != nil {
		return err
	}
	// Shared pool: the LV's exclusive lock first, so a volume active on
	// another host is refused (naming it) before anything changes.
	release, err := m.holdLock(ctx, p, &v, hostblk.LockExclusive, "delete")
	if err != nil {
		return err
	}
	defer release()
	meta := v.meta
	if err := m.setState(ctx, p, v.info.Name, meta, "", stateDeleting); err != nil {
		return fmt.Errorf("%w: volume %q (%s): marking it for deletion: %w", ErrFailed, v.info.Name, id, err)
	}
	m.mu.Lock()
	delete(m.volumes, id)
	m.mu.Unlock()
	m.emit(Event{Kind: EventVolumeRemoved, VolumeID: id})
	if err := m.crashPoint("delete:marked"); err != nil {
		return err
	}
	if err := m.removeDevice(context.WithoutCancel(ctx), p, v.info.Name); err != nil {
		// Marked "deleting": the next Load finishes the job.
		return fmt.Errorf("%w: volume %q (%s): %w (it stays marked for deletion; the next Load or Rescan retries)", ErrFailed, v.info.Name, id, err)
	}
	m.poolChanged(p)
	m.log.Info("volume deleted", "pool", p.cfg.Name, "volume", v.info.Name, "id", id, "uid", c.UID)
	return nil
}

// dependentLocked says why v must not change under others: a volume it
// backs (by metadata, or by the name in that volume's header), or an
// overlay being created over it. "" if nothing depends on it.
func (m *Manager) dependentLocked(v *volume) string {
	if n := m.backingUsers[v.info.ID]; n > 0 {
		return fmt.Sprintf("%d overlays are being created over it", n)
	}
	for _, other := range m.volumes {
		if other.info.ID == v.info.ID {
			continue
		}
		if other.meta.BackingName == v.info.ID || other.info.BackingName != "" &&
			(other.info.BackingName == v.backingPath || other.info.BackingName == v.info.DevicePath) {
			return fmt.Sprintf("it backs volume %q in pool %q (%s)", other.info.Name, other.info.Pool, other.info.ID)
		}
	}
	return ""
}

// Resize grows a volume's virtual size (the guest sees a larger disk).
// Only the qcow2 header changes: virtual size and, when the new size
// needs more L1 entries, l1_size — in one write of the header's first
// logical block, which the device writes atomically. The L1 table is
// never moved: if the new size needs more L1 entries than its clusters
// hold, Resize refuses with ErrInvalidArgument and says the largest size
// it can reach. The device is not grown (the image is thin; writes grow
// it). Shrinking is refused (ErrInvalidArgument); the same size is a
// no-op. ErrBusy if the device is in use (checkNotInUse) by anything but
// a libvirt domain that has it as a disk: volagent never writes a header
// qemu has in memory.
//
// When a running or paused libvirt domain has the volume as a disk,
// the device grows by what qemu needs, and libvirt resizes the disk
// (virDomainBlockResize), so qemu updates its own header and the guest
// sees the new size. A domain that only names it (shut off) sees the new
// size at its next start.
func (m *Manager) Resize(ctx context.Context, c Caller, id string, virtualSize int64) error {
	v, p, done, err := m.beginVolumeOp("Resize", id)
	if err != nil {
		return err
	}
	defer done()
	if v.problem != "" {
		return fmt.Errorf("%w: volume %q (%s) cannot be resized: %s", ErrFailed, v.info.Name, id, v.problem)
	}
	lock := m.opLock(id)
	lock.Lock()
	defer lock.Unlock()
	release, err := m.lockForChange(ctx, p, &v, "resize")
	if err != nil {
		return err
	}
	releaseOnce := sync.OnceFunc(release)
	defer releaseOnce()
	switch {
	case virtualSize <= 0 || virtualSize%512 != 0:
		return fmt.Errorf("%w: virtual size %d: want a positive multiple of 512", ErrInvalidArgument, virtualSize)
	case virtualSize < v.info.VirtualSize:
		return fmt.Errorf("%w: virtual size %d is smaller than the current %d: volagent only grows volumes", ErrInvalidArgument, virtualSize, v.info.VirtualSize)
	case virtualSize == v.info.VirtualSize:
		return nil
	}

	// A running domain's disk is resized by its qemu, through libvirt
	// (its qemu holds the image locks checkNotInUse would refuse).
	if handled, err := m.resizeUnderDomain(ctx, p, &v, virtualSize); handled {
		return err
	}
	if err := m.checkNotInUse(ctx, &v); err != nil {
		return err
	}
	// resizeImage holds qemu-img's writer locks while it writes.
	err = resizeImage(v.info.DevicePath, virtualSize)
	if err == nil {
		// Read back before a volume activated for this is deactivated.
		m.refresh(p, &v)
	}
	releaseOnce()
	if p.shared != nil {
		m.refreshShared(p, &v)
	}
	if err != nil {
		return fmt.Errorf("volume %q (%s): %w", v.info.Name, id, err)
	}
	m.log.Info("volume resized", "pool", p.cfg.Name, "volume", v.info.Name, "id", id, "virtual_size", virtualSize, "uid", c.UID)
	return nil
}

// resizeImage grows the qcow2 image on the device (qcow2.Resize: the L1
// table grows in place or moves).
func resizeImage(path string, virtualSize int64) error {
	tgt, err := hostblk.OpenTarget(path, true)
	if err != nil {
		if errors.Is(err, hostblk.ErrTargetBusy) {
			return fmt.Errorf("%w: %w", ErrBusy, err)
		}
		return fmt.Errorf("%w: %w", ErrFailed, err)
	}
	defer tgt.Close()
	err = qcow2.Resize(tgt, tgt.Size, qcow2.WriterOptions{BlockSize: tgt.BlockSize, ContainerSize: tgt.ContainerSize()}, virtualSize)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, qcow2.ErrNoSpace):
		return fmt.Errorf("%w: the device has no room for the larger L1 table: %w", ErrNoSpace, err)
	case errors.Is(err, qcow2.ErrUnsupported), errors.Is(err, qcow2.ErrTooLarge):
		// Internal snapshots, the dirty bit, an L1 table past qemu's limit.
		return fmt.Errorf("%w: %w", ErrInvalidArgument, err)
	case qcow2.IsRefusal(err):
		return fmt.Errorf("%w: header refused: %w", ErrPolicyViolation, err)
	}
	return fmt.Errorf("%w: %w", ErrFailed, err)
}

// refresh re-reads a volume from its device after a change and tells
// subscribers.
func (m *Manager) refresh(p *pool, v *volume) {
	nv := m.readVolume(p, v.info.Name, v.info.DevicePath, v.file, v.meta)
	m.mu.Lock()
	if _, ok := m.volumes[nv.info.ID]; ok {
		m.volumes[nv.info.ID] = nv
	}
	m.mu.Unlock()
	info := nv.info
	m.emit(Event{Kind: EventVolumeChanged, Volume: &info})
}

// Write writes data at guest offset offset of a volume through the qcow2
// writer (copy-on-write from the backing for partial clusters) and flushes
// it. When the writer runs out of device, the device grows by ChunkSize
// (more if the write needs it) and the write is retried. Results:
// ErrInvalidArgument (a range outside the disk, more than MaxWriteSize
// bytes); ErrBusy (the volume backs another volume, a running or paused
// libvirt domain uses it, or its device is in use: checkNotInUse, and the
// writer locks the write holds); ErrNoSpace (the pool cannot grow the
// device); ErrPolicyViolation (the image's chain is refused); ErrFailed.
func (m *Manager) Write(ctx context.Context, c Caller, id string, offset int64, data []byte) error {
	v, p, done, err := m.beginVolumeOp("Write", id)
	if err != nil {
		return err
	}
	defer done()
	if v.problem != "" {
		return fmt.Errorf("%w: volume %q (%s) cannot be written: %s", ErrFailed, v.info.Name, id, v.problem)
	}
	if len(data) == 0 {
		return nil
	}
	lock := m.opLock(id)
	lock.Lock()
	defer lock.Unlock()
	// A shared pool's volume: its lock first (refused, naming the holder,
	// when another host has it), and its header once it is here.
	release, err := m.lockForChange(ctx, p, &v, "write")
	if err != nil {
		return err
	}
	releaseOnce := sync.OnceFunc(release)
	defer releaseOnce()
	switch {
	case len(data) > MaxWriteSize:
		return fmt.Errorf("%w: write of %d bytes: at most %d per call (use Import for bulk data)", ErrInvalidArgument, len(data), MaxWriteSize)
	case offset < 0 || offset > v.info.VirtualSize || int64(len(data)) > v.info.VirtualSize-offset:
		return fmt.Errorf("%w: write of %d bytes at offset %d: outside the virtual disk of %d bytes", ErrInvalidArgument, len(data), offset, v.info.VirtualSize)
	}
	m.mu.Lock()
	busy := m.dependentLocked(&v)
	m.mu.Unlock()
	if busy != "" {
		return fmt.Errorf("%w: volume %q (%s): %s; writing would change that volume's guest view", ErrBusy, v.info.Name, id, busy)
	}
	// A shut-off domain's disk may be written, as an offline edit.
	if err := m.refuseIfDomainsUse(ctx, &v, "write", true); err != nil {
		return err
	}
	if err := m.checkNotInUse(ctx, &v); err != nil {
		return err
	}

	s, err := m.openWriteSession(p, &v)
	if err != nil {
		return err
	}
	err = s.do(ctx, int64(len(data)), func(w *qcow2.Writer) error {
		_, err := w.WriteAt(data, offset)
		return err
	})
	if cerr := s.close(); err == nil && cerr != nil {
		err = fmt.Errorf("%w: volume %q: flushing: %w", ErrFailed, v.info.Name, cerr)
	}
	m.refresh(p, &v)
	if p.shared != nil {
		releaseOnce()
		m.refreshShared(p, &v)
	}
	if err != nil {
		return err
	}
	m.log.Debug("volume written", "pool", p.cfg.Name, "volume", v.info.Name, "offset", offset, "bytes", len(data), "uid", c.UID)
	return nil
}

// Check runs qcow2.Check on a volume's device (read-only, while other
// operations of this Manager on the volume wait), holding qemu-img
// check's reader locks. Results: the check result, counted as qemu-img
// check counts; ErrBusy if another process writes the image (a running
// guest); ErrPolicyViolation if the header is refused; ErrNotFound;
// ErrFailed for I/O errors.
func (m *Manager) Check(ctx context.Context, id string) (*qcow2.CheckResult, error) {
	v, p, err := m.lookup(id)
	if err != nil {
		return nil, err
	}
	lock := m.opLock(id)
	lock.Lock()
	defer lock.Unlock()
	if v.notHere {
		release, err := m.holdLock(ctx, p, &v, hostblk.LockShared, "check")
		if err != nil {
			return nil, err
		}
		defer release()
	}
	d, err := hostblk.OpenDevice(v.info.DevicePath, hostblk.OpenOptions{})
	if err != nil {
		return nil, fmt.Errorf("%w: volume %q: %w", ErrFailed, v.info.Name, err)
	}
	defer d.Close()
	// qemu-img check's locks: nobody writes the image while it is read.
	il, err := hostblk.LockImage(d.File(), hostblk.ReaderLocks)
	if err != nil {
		if errors.Is(err, hostblk.ErrImageInUse) {
			return nil, fmt.Errorf("%w: volume %q: %w", ErrBusy, v.info.Name, err)
		}
		return nil, fmt.Errorf("%w: volume %q: %w", ErrFailed, v.info.Name, err)
	}
	defer il.Release()
	size, err := d.Size()
	if err != nil {
		return nil, fmt.Errorf("%w: volume %q: %w", ErrFailed, v.info.Name, err)
	}
	res, err := qcow2.Check(d.File(), size)
	if err != nil {
		if qcow2.IsRefusal(err) {
			return nil, fmt.Errorf("%w: volume %q: header refused: %w", ErrPolicyViolation, v.info.Name, err)
		}
		return nil, fmt.Errorf("%w: volume %q: %w", ErrFailed, v.info.Name, err)
	}
	return res, nil
}

// writeSession is a qcow2 writer open on a volume's device (with its
// backing chain, through the pool's gate), reopened after the device
// grows.
type writeSession struct {
	m *Manager
	p *pool
	v *volume
	w *ChainWriter
}

func (m *Manager) openWriteSession(p *pool, v *volume) (*writeSession, error) {
	s := &writeSession{m: m, p: p, v: v}
	if err := s.open(); err != nil {
		return nil, err
	}
	return s, nil
}

// open opens the device as the CLI's import does (OpenWriterWithChain).
func (s *writeSession) open() error {
	name := s.v.info.Name
	w, err := OpenWriterWithChain(s.v.info.DevicePath, s.m.gateFor(s.p), false)
	switch {
	case err == nil:
	case errors.Is(err, hostblk.ErrTargetBusy):
		return fmt.Errorf("%w: volume %q: %w", ErrBusy, name, err)
	case qcow2.IsRefusal(err):
		return fmt.Errorf("%w: volume %q: its image or chain is refused: %w", ErrPolicyViolation, name, err)
	default:
		return fmt.Errorf("%w: volume %q: %w", ErrFailed, name, err)
	}
	s.w = w
	s.v.info.DeviceSize = w.Target.Size
	return nil
}

// close flushes and closes the writer, then the chain and the device.
func (s *writeSession) close() error {
	if s.w == nil {
		return nil
	}
	err := s.w.Close()
	s.w = nil
	return err
}

// do runs fn; when the writer reports no space, it grows the device by
// ChunkSize (more if the write needs it; less, down to what the write
// needs, when the pool has no whole chunk left), reopens and runs fn
// again. fn must be safe to repeat. After an error the session may be
// closed; callers only close it then.
func (s *writeSession) do(ctx context.Context, need int64, fn func(w *qcow2.Writer) error) error {
	chunk := s.p.cfg.ChunkSize
	for attempt := 0; ; attempt++ {
		if s.w == nil {
			return fmt.Errorf("%w: volume %q: its writer was closed by an earlier error", ErrFailed, s.v.info.Name)
		}
		err := fn(s.w.Writer)
		if err == nil {
			return nil
		}
		if !errors.Is(err, qcow2.ErrNoSpace) {
			if qcow2.IsRefusal(err) {
				return fmt.Errorf("%w: volume %q: %w", ErrPolicyViolation, s.v.info.Name, err)
			}
			return fmt.Errorf("%w: volume %q: %w", ErrFailed, s.v.info.Name, err)
		}
		if attempt == maxGrowAttempts {
			return fmt.Errorf("%w: volume %q: still out of space after growing the device %d times: %w", ErrNoSpace, s.v.info.Name, attempt, err)
		}
		// need plus a few clusters for the tables the write may allocate.
		used := max(s.v.info.DeviceSize, s.w.HighestAllocated())
		minimum := used + need + 4*s.w.Header().ClusterSize()
		preferred := used + roundUp(minimum-used, chunk)
		if cerr := s.close(); cerr != nil {
			return fmt.Errorf("%w: volume %q: %w", ErrFailed, s.v.info.Name, cerr)
		}
		// A failed grow leaves the session closed: the device is as it
		// was, and nothing is left to write.
		growStart := time.Now()
		size, gerr := s.m.growDeviceWithin(ctx, s.p, s.v, minimum, preferred)
		if gerr != nil {
			return gerr
		}
		s.m.poolChanged(s.p)
		s.m.log.Info("volume device grown", "pool", s.p.cfg.Name, "volume", s.v.info.Name, "device_size", size, "seconds", time.Since(growStart).Seconds())
		if err := s.open(); err != nil {
			return err
		}
	}
}
