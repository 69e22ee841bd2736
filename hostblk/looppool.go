package hostblk

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Errors of LoopPool operations, for errors.Is.
var (
	ErrVolumeExists   = errors.New("pool volume already exists")
	ErrVolumeNotFound = errors.New("pool volume not found")
)

const (
	poolFileSuffix = ".img"
	// poolMetaXattr holds a volume's VolumeMeta as JSON. An xattr, not a
	// sidecar file, so a volume and its metadata appear in one atomic step
	// (see Create) and can never be separated by a crash.
	poolMetaXattr = "user.volagent.meta"
	// poolTempSuffix marks files of an interrupted Create; they start
	// with '.', which volume names cannot.
	poolTempSuffix = ".tmp"
	// maxPoolMeta bounds the metadata JSON: on ext4 an xattr value must
	// fit in one filesystem block together with the xattr header.
	maxPoolMeta = 3072
)

// marshalPoolMeta encodes meta for the xattr, refusing what ext4 cannot
// store with an error that says so (instead of a bare ENOSPC).
func marshalPoolMeta(name string, meta VolumeMeta) ([]byte, error) {
	b, err := json.Marshal(meta)
	if err != nil {
		return nil, err
	}
	if len(b) > maxPoolMeta {
		return nil, fmt.Errorf("pool volume %s: metadata is %d bytes encoded, at most %d fit in an xattr", name, len(b), maxPoolMeta)
	}
	return b, nil
}

// LoopPool is a directory of backing files that volagent owns, each
// attached as a loop device: NAME.img, with its VolumeMeta in an extended
// attribute. Everything about the pool can be rebuilt from the directory
// and the kernel's loop devices after a restart or a crash (AttachAll).
// Methods are safe for concurrent use within one process.
type LoopPool struct {
	dir  string
	opts LoopOptions
	mu   sync.Mutex
}

// PoolVolume is one volume of a LoopPool.
type PoolVolume struct {
	Name string
	// File is the backing file's path.
	File string
	// Size is the backing file's size in bytes.
	Size int64
	Meta VolumeMeta
	// Device is the attached loop device (/dev/loopN), or "" if the volume
	// is not attached.
	Device string
}

// OpenLoopPool opens (creating if needed) the pool directory dir and makes
// it traversable but not listable by others (0711): an overlay over a pool
// volume names the volume's file as its backing, and qemu, running as its
// own user (libvirt-qemu on Debian), must reach that file; libvirt chowns
// the file itself, never its directory. opts apply to every loop device the pool attaches; Offset and
// SizeLimit must be zero because a pool volume is its whole file.
func OpenLoopPool(dir string, opts LoopOptions) (*LoopPool, error) {
	if opts.Offset != 0 || opts.SizeLimit != 0 {
		return nil, fmt.Errorf("open loop pool %s: offset %d and size limit %d must be 0", dir, opts.Offset, opts.SizeLimit)
	}
	if opts.SectorSize == 0 {
		opts.SectorSize = DefaultLoopSectorSize
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("open loop pool %s: %w", dir, err)
	}
	if err := os.MkdirAll(abs, 0o711); err != nil {
		return nil, fmt.Errorf("open loop pool: %w", err)
	}
	if err := makeTraversable(abs); err != nil {
		return nil, fmt.Errorf("open loop pool: %w", err)
	}
	return &LoopPool{dir: abs, opts: opts}, nil
}

// makeTraversable adds search permission for group and others to dir, which
// MkdirAll may have left out under a umask such as the unit's 0077, and
// which a pool directory made by an older volagent (0700) lacks.
func makeTraversable(dir string) error {
	st, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if perm := st.Mode().Perm(); perm&0o011 != 0o011 {
		return os.Chmod(dir, perm|0o011)
	}
	return nil
}

// Dir returns the pool directory (absolute).
func (p *LoopPool) Dir() string { return p.dir }

func (p *LoopPool) file(name string) string { return filepath.Join(p.dir, name+poolFileSuffix) }

func validatePoolName(name string) error {
	if err := validateName("pool volume", name); err != nil {
		return err
	}
	if name[0] == '.' {
		return fmt.Errorf("pool volume name %q: must not start with '.'", name)
	}
	return nil
}

func (p *LoopPool) checkSize(op, name string, size int64) error {
	if size <= 0 || size%int64(p.opts.SectorSize) != 0 {
		return fmt.Errorf("%s pool volume %s: size %d: want a positive multiple of the sector size %d", op, name, size, p.opts.SectorSize)
	}
	return nil
}

// Create makes a sparse backing file of size bytes (a multiple of the
// sector size) with meta, and attaches it. The file appears under its
// final name only complete, metadata included: it is written under a
// temporary name and hard-linked into place, which also fails atomically
// (ErrVolumeExists) if the name is taken. If attaching fails the file is
// removed again.
//
// Create makes nothing durable: nothing is synced. A volume is made with
// meta.State saying it is in progress, and is complete only once its
// maker has written the image, flushed it, and replaced the metadata with
// SetMetaDurable. The crash-safety argument, for a crash at any point:
//
//   - Metadata changes to one filesystem reach the disk in the order they
//     were made: the journal of ext4, XFS and btrfs commits transactions
//     in order, each with everything before it (loop pools need a local
//     filesystem with O_DIRECT). So if the final name survives a crash,
//     the xattr and size set before the link survive with it: a file
//     under a volume name always has its metadata, and until the
//     SetMetaDurable it says "in progress". The next Load removes such a
//     volume (and AttachAll the temporary names); if the link did not
//     survive, nothing under a volume name is left at all. Syncing the
//     temporary file before the link, or the directory after it, would
//     only order what the journal orders anyway.
//   - The image is data, not metadata: the journal does not order it
//     against the completion mark. So the maker flushes the image (the
//     qcow2.Create sync on the loop device, which fsyncs this file)
//     before SetMetaDurable: a durable completion mark implies a durable
//     image.
//   - SetMetaDurable's fsync commits the journal up to the completion
//     mark, hence (first point) the link, the size and the tmp unlink
//     too: when it returns the volume is complete and durable, under its
//     name. That is the one sync the reply waits for besides the image
//     flush.
func (p *LoopPool) Create(name string, size int64, meta VolumeMeta) (PoolVolume, error) {
	if err := validatePoolName(name); err != nil {
		return PoolVolume{}, err
	}
	if err := p.checkSize("create", name, size); err != nil {
		return PoolVolume{}, err
	}
	metaJSON, err := marshalPoolMeta(name, meta)
	if err != nil {
		return PoolVolume{}, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()

	final := p.file(name)
	if _, err := os.Lstat(final); err == nil {
		return PoolVolume{}, fmt.Errorf("create pool volume %s: %w", final, ErrVolumeExists)
	}
	tmp, err := os.CreateTemp(p.dir, "."+name+".*"+poolTempSuffix)
	if err != nil {
		return PoolVolume{}, fmt.Errorf("create pool volume %s: %w", name, err)
	}
	tmpName := tmp.Name()
	defer os.Remove(tmpName) // after a successful link only the name goes
	// No sync, here or after the link: see the crash-safety argument above.
	err = unix.Fsetxattr(int(tmp.Fd()), poolMetaXattr, metaJSON, 0)
	if err == nil {
		err = tmp.Truncate(size)
	}
	if closeErr := tmp.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		return PoolVolume{}, fmt.Errorf("create pool volume %s: writing %s: %w", name, tmpName, err)
	}
	if err := os.Link(tmpName, final); err != nil {
		if errors.Is(err, os.ErrExist) {
			return PoolVolume{}, fmt.Errorf("create pool volume %s: %w", final, ErrVolumeExists)
		}
		return PoolVolume{}, fmt.Errorf("create pool volume %s: %w", name, err)
	}
	dev, err := AttachLoop(final, p.opts)
	if err != nil {
		os.Remove(final)
		return PoolVolume{}, fmt.Errorf("create pool volume %s: %w", name, err)
	}
	return PoolVolume{Name: name, File: final, Size: size, Meta: meta, Device: dev.Path}, nil
}

// Volume returns one volume with its loop device, if attached;
// ErrVolumeNotFound if the pool has no such volume.
func (p *LoopPool) Volume(name string) (PoolVolume, error) {
	if err := validatePoolName(name); err != nil {
		return PoolVolume{}, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.volume(name)
}

// volume reads one volume; its loop device comes from the loop index,
// refreshed when it has none for the file.
func (p *LoopPool) volume(name string) (PoolVolume, error) {
	return p.volumeFrom(name, true)
}

// volumeFrom is volume; refreshOnMiss false trusts the loop index to hold
// every attached device (the caller refreshed it just before).
func (p *LoopPool) volumeFrom(name string, refreshOnMiss bool) (PoolVolume, error) {
	file := p.file(name)
	fi, err := os.Stat(file)
	if errors.Is(err, os.ErrNotExist) {
		return PoolVolume{}, fmt.Errorf("pool volume %s: %w", file, ErrVolumeNotFound)
	}
	if err != nil {
		return PoolVolume{}, err
	}
	if !fi.Mode().IsRegular() {
		return PoolVolume{}, fmt.Errorf("pool volume %s: not a regular file", file)
	}
	meta, err := readPoolMeta(file)
	if err != nil {
		return PoolVolume{}, err
	}
	vol := PoolVolume{Name: name, File: file, Size: fi.Size(), Meta: meta}
	dev, ok, err := p.poolLoop(file, refreshOnMiss)
	if err != nil {
		return PoolVolume{}, err
	}
	if ok {
		vol.Device = dev.Path
	}
	return vol, nil
}

// poolLoop finds the loop device of a pool file: one over the whole file.
func (p *LoopPool) poolLoop(file string, refreshOnMiss bool) (LoopDevice, bool, error) {
	loops, err := findLoops(file, refreshOnMiss)
	if err != nil {
		return LoopDevice{}, false, err
	}
	for _, l := range loops {
		if l.Offset == 0 && l.SizeLimit == 0 {
			return l, true, nil
		}
	}
	return LoopDevice{}, false, nil
}

func readPoolMeta(file string) (VolumeMeta, error) {
	// Ask for the size first: a long BackingName can exceed any fixed
	// buffer. Retry if SetMeta grew the value in between (ERANGE).
	var buf []byte
	var n int
	for attempt := 0; ; attempt++ {
		size, err := unix.Getxattr(file, poolMetaXattr, nil)
		if err == nil {
			buf = make([]byte, size)
			n, err = unix.Getxattr(file, poolMetaXattr, buf)
		}
		if errors.Is(err, unix.ERANGE) && attempt < 3 {
			continue
		}
		if err != nil {
			return VolumeMeta{}, fmt.Errorf("pool volume %s: reading metadata xattr %s: %w", file, poolMetaXattr, err)
		}
		break
	}
	var meta VolumeMeta
	if err := json.Unmarshal(buf[:n], &meta); err != nil {
		return VolumeMeta{}, fmt.Errorf("pool volume %s: metadata xattr %s=%q: %w", file, poolMetaXattr, buf[:n], err)
	}
	return meta, nil
}

// SetMeta replaces a volume's metadata in one setxattr, which is atomic
// but not durable: after a crash the old value may be back. Use
// SetMetaDurable for a change that must survive one.
func (p *LoopPool) SetMeta(name string, meta VolumeMeta) error {
	return p.setMeta(name, meta, false)
}

// SetMetaDurable replaces a volume's metadata in one setxattr and fsyncs
// the file: when it returns the new value survives a crash, and so does
// everything Create did for the volume (see Create).
func (p *LoopPool) SetMetaDurable(name string, meta VolumeMeta) error {
	return p.setMeta(name, meta, true)
}

func (p *LoopPool) setMeta(name string, meta VolumeMeta, durable bool) error {
	if err := validatePoolName(name); err != nil {
		return err
	}
	metaJSON, err := marshalPoolMeta(name, meta)
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	file := p.file(name)
	notFound := func(err error) error {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("pool volume %s: %w", file, ErrVolumeNotFound)
		}
		return fmt.Errorf("pool volume %s: writing metadata: %w", file, err)
	}
	if !durable {
		if err := unix.Setxattr(file, poolMetaXattr, metaJSON, 0); err != nil {
			return notFound(err)
		}
		return nil
	}
	// Read-only is enough for fsetxattr (permission is the inode's) and
	// fsync; the pool file never follows a symlink (O_NOFOLLOW).
	fd, err := unix.Open(file, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return notFound(err)
	}
	defer unix.Close(fd)
	if err := unix.Fsetxattr(fd, poolMetaXattr, metaJSON, 0); err != nil {
		return notFound(err)
	}
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("pool volume %s: flushing metadata: %w", file, err)
	}
	return nil
}

// Volumes lists the pool's volumes by name, with their loop devices if
// attached. It does not attach anything.
func (p *LoopPool) Volumes() ([]PoolVolume, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	names, err := p.names()
	if err != nil {
		return nil, err
	}
	var vols []PoolVolume
	for _, name := range names {
		vol, err := p.volume(name)
		if err != nil {
			return nil, err
		}
		vols = append(vols, vol)
	}
	return vols, nil
}

// names returns the volume names in the directory, sorted.
func (p *LoopPool) names() ([]string, error) {
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return nil, fmt.Errorf("list loop pool: %w", err)
	}
	var names []string
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), poolFileSuffix)
		if !ok || validatePoolName(name) != nil {
			continue
		}
		names = append(names, name)
	}
	sort.Strings(names)
	return names, nil
}

// AttachAll is the start-up step: it removes files left by an interrupted
// Create, and attaches every volume that has no loop device yet (volumes
// still attached from before a restart keep theirs). It returns every
// volume it could attach; errors for single volumes are joined, so one bad
// file does not keep the others down.
//
// ready, if not nil, is called with each of those volumes as soon as it
// has its device, before AttachAll returns and from several goroutines at
// once: the caller reads the volumes already attached while the others
// still attach. It must not call the pool's methods (the pool is locked).
func (p *LoopPool) AttachAll(ready func(PoolVolume)) ([]PoolVolume, error) {
	if ready == nil {
		ready = func(PoolVolume) {}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return nil, fmt.Errorf("attach loop pool: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") && strings.HasSuffix(e.Name(), poolTempSuffix) {
			if err := os.Remove(filepath.Join(p.dir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	names, err := p.names()
	if err != nil {
		return nil, err
	}
	// One refresh of the loop index for all the pool's files: a file it
	// has no device for is not attached (a refresh per file would read
	// every unattached loop device once per volume).
	if err := loopIdx.refresh(); err != nil {
		return nil, fmt.Errorf("attach loop pool: listing loop devices: %w", err)
	}
	found := make([]PoolVolume, 0, len(names))
	for _, name := range names {
		vol, err := p.volumeFrom(name, false)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		found = append(found, vol)
		if vol.Device != "" {
			ready(vol)
		}
	}
	attachErrs := make([]error, len(found))
	inParallel(len(found), func(i int) {
		v := &found[i]
		if v.Device != "" {
			return
		}
		dev, err := AttachLoop(v.File, p.opts)
		if err != nil {
			attachErrs[i] = fmt.Errorf("attach pool volume %s: %w", v.Name, err)
			return
		}
		v.Device = dev.Path
		ready(*v)
	})
	vols := found[:0]
	for i, v := range found {
		if attachErrs[i] != nil {
			errs = append(errs, attachErrs[i])
			continue
		}
		vols = append(vols, v)
	}
	return vols, errors.Join(errs...)
}

// parallelAttaches bounds the loop devices attached at once (loop pools,
// loop activation).
const parallelAttaches = 16

// inParallel runs fn(0) ... fn(n-1), parallelAttaches at a time, and
// returns when all have. Attaching waits in the kernel (LOOP_CONFIGURE
// freezes the device's queue: RCU grace periods, not CPU), so after a
// reboot a pool's devices are attached several at a time.
func inParallel(n int, fn func(i int)) {
	sem := make(chan struct{}, parallelAttaches)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			fn(i)
		}()
	}
	wg.Wait()
}

// Grow grows a volume's backing file to size bytes and its loop device
// with it. Growing to the current size is a no-op that still refreshes
// the loop device; shrinking is refused.
func (p *LoopPool) Grow(name string, size int64) (PoolVolume, error) {
	if err := validatePoolName(name); err != nil {
		return PoolVolume{}, err
	}
	if err := p.checkSize("grow", name, size); err != nil {
		return PoolVolume{}, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := p.volume(name); err != nil {
		return PoolVolume{}, err
	}
	if err := GrowLoopFile(p.file(name), size); err != nil {
		return PoolVolume{}, err
	}
	return p.volume(name)
}

// Remove detaches a volume's loop device and deletes its file.
// ErrVolumeNotFound if there is no such volume, so a retried Remove can
// tell that the first one finished.
func (p *LoopPool) Remove(name string) error {
	if err := validatePoolName(name); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	file := p.file(name)
	if _, err := os.Stat(file); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove pool volume %s: %w", file, ErrVolumeNotFound)
		}
		return err
	}
	loops, err := FindLoops(file)
	if err != nil {
		return err
	}
	for _, l := range loops {
		if err := DetachLoop(l.Path); err != nil {
			return fmt.Errorf("remove pool volume %s: %w", name, err)
		}
	}
	if err := os.Remove(file); err != nil {
		return fmt.Errorf("remove pool volume %s: %w", name, err)
	}
	return syncDir(p.dir)
}

// syncDir makes a directory's entries (a new link, a removal) durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if closeErr := d.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// IsLoopPoolVolume reports whether path (symlinks followed) is a loop
// pool's volume file, or a loop device over one, by the metadata xattr
// every pool volume carries. It reads sysfs and one xattr's size only, so
// it needs no configuration: the hook uses it when it has none.
func IsLoopPoolVolume(path string) bool {
	file := path
	if real, err := filepath.EvalSymlinks(path); err == nil {
		file = real
	}
	if b := LoopBackingFile(file); b != "" {
		file = b
	} else if strings.HasPrefix(file, "/dev/loop") {
		return false // a loop device not attached, or not a loop device
	}
	_, err := unix.Getxattr(file, poolMetaXattr, nil)
	return err == nil || errors.Is(err, unix.ERANGE)
}
