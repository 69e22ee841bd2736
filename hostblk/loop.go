package hostblk

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	loopControlPath = "/dev/loop-control"
	// attachAttempts bounds the retries when another process takes the
	// free loop device between LOOP_CTL_GET_FREE and LOOP_CONFIGURE.
	attachAttempts = 100
	// DefaultLoopSectorSize is the loop sector size when LoopOptions
	// leaves it 0: 4096 matches qcow2 clusters and modern disks, and lets
	// direct I/O work on backing filesystems with 4 KiB blocks.
	DefaultLoopSectorSize = 4096
)

// ErrDirectIONotSupported means the backing file's filesystem cannot do
// O_DIRECT (tmpfs before 6.6, some FUSE and network filesystems), or the
// kernel did not enable direct I/O for the chosen sector size.
var ErrDirectIONotSupported = errors.New("direct I/O not supported for loop backing file")

// LoopOptions configure AttachLoop.
type LoopOptions struct {
	// ReadOnly attaches the loop device read-only.
	ReadOnly bool
	// SectorSize is the loop device's logical block size: 512, 1024, 2048
	// or 4096; 0 means DefaultLoopSectorSize.
	SectorSize uint32
	// BufferedIO turns direct I/O off. Direct I/O is the default: without
	// it every block is cached twice, once for the loop device and once for
	// the backing file.
	BufferedIO bool
	// Offset is where the device starts in the backing file, in bytes.
	Offset uint64
	// SizeLimit caps the device size in bytes; 0 means up to the end of
	// the backing file.
	SizeLimit uint64
}

// LoopDevice describes an attached loop device, as the kernel reports it.
type LoopDevice struct {
	// Path is /dev/loopN.
	Path   string
	Number int
	// BackingFile is the backing file's path as the kernel recorded it at
	// attach time (it is not updated on rename; " (deleted)" is stripped
	// and BackingDeleted set if the file was removed).
	BackingFile    string
	BackingDeleted bool
	Offset         uint64
	SizeLimit      uint64
	ReadOnly       bool
	DirectIO       bool
	SectorSize     uint32

	backingIsBlock bool
	backingRdev    uint64 // backing block device's number
	backingDev     uint64 // backing file's filesystem device
	backingIno     uint64
	backingKnown   bool // backing file could be stat'ed
}

// AttachLoop attaches backing (a regular file or a block device) to a free
// loop device with a single LOOP_CONFIGURE, so the device never appears
// half-configured. The loop device outlives the process (no autoclear);
// DetachLoop removes it.
func AttachLoop(backing string, opts LoopOptions) (LoopDevice, error) {
	sectorSize := opts.SectorSize
	if sectorSize == 0 {
		sectorSize = DefaultLoopSectorSize
	}
	switch sectorSize {
	case 512, 1024, 2048, 4096:
	default:
		return LoopDevice{}, fmt.Errorf("attach loop on %s: sector size %d: want 512, 1024, 2048 or 4096", backing, sectorSize)
	}
	if opts.Offset%uint64(sectorSize) != 0 || opts.SizeLimit%uint64(sectorSize) != 0 {
		return LoopDevice{}, fmt.Errorf("attach loop on %s: offset %d and size limit %d must be multiples of the sector size %d",
			backing, opts.Offset, opts.SizeLimit, sectorSize)
	}

	flags := unix.O_RDWR | unix.O_CLOEXEC
	if opts.ReadOnly {
		flags = unix.O_RDONLY | unix.O_CLOEXEC
	}
	if !opts.BufferedIO {
		// Opening with O_DIRECT both checks support up front and is what
		// makes the kernel keep direct I/O on for the loop device.
		flags |= unix.O_DIRECT
	}
	backingFd, err := unix.Open(backing, flags, 0)
	if err != nil {
		if errors.Is(err, unix.EINVAL) && !opts.BufferedIO {
			return LoopDevice{}, fmt.Errorf("attach loop on %s: open with O_DIRECT: %w (%w)", backing, ErrDirectIONotSupported, err)
		}
		return LoopDevice{}, fmt.Errorf("attach loop: %w", &os.PathError{Op: "open", Path: backing, Err: err})
	}
	defer unix.Close(backingFd)

	var loFlags uint32
	if opts.ReadOnly {
		loFlags |= unix.LO_FLAGS_READ_ONLY
	}
	if !opts.BufferedIO {
		loFlags |= unix.LO_FLAGS_DIRECT_IO
	}
	config := unix.LoopConfig{
		Fd:   uint32(backingFd),
		Size: sectorSize,
		Info: unix.LoopInfo64{Offset: opts.Offset, Sizelimit: opts.SizeLimit, Flags: loFlags},
	}
	copy(config.Info.File_name[:unix.LO_NAME_SIZE-1], backing)

	ctl, err := unix.Open(loopControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return LoopDevice{}, fmt.Errorf("attach loop on %s: %w", backing, &os.PathError{Op: "open", Path: loopControlPath, Err: err})
	}
	defer unix.Close(ctl)

	number, loopFd, err := configureFreeLoop(ctl, &config)
	if err != nil {
		return LoopDevice{}, fmt.Errorf("attach loop on %s: %w", backing, err)
	}
	dev, err := attachedLoopInfo(number, loopFd, backingFd)
	unix.Close(loopFd)
	if err != nil {
		_ = DetachLoop(loopPath(number))
		return LoopDevice{}, fmt.Errorf("attach loop on %s: reading back %s: %w", backing, loopPath(number), err)
	}
	if !opts.BufferedIO && !dev.DirectIO {
		// The kernel silently falls back to buffered I/O when the backing
		// file cannot be accessed directly with this sector size.
		_ = DetachLoop(dev.Path)
		return LoopDevice{}, fmt.Errorf("attach loop on %s with sector size %d: kernel left direct I/O off: %w",
			backing, sectorSize, ErrDirectIONotSupported)
	}
	loopIdx.added(dev)
	return dev, nil
}

// attachedLoopInfo reads back the configuration of loop device number,
// which this process just attached to backingFd and still has open as
// loopFd, from the kernel: LOOP_GET_STATUS64 (offset, size limit,
// read-only and direct I/O flags as the kernel settled them), BLKSSZGET
// (sector size), and the backing file's path and identity from the
// descriptor the kernel took (its path is what sysfs loop/backing_file
// shows: both are the path of the same open file). Four system calls
// instead of reading six sysfs files; loopDeviceInfo reads a device this
// process did not attach.
func attachedLoopInfo(number, loopFd, backingFd int) (LoopDevice, error) {
	info, err := unix.IoctlLoopGetStatus64(loopFd)
	if err != nil {
		return LoopDevice{}, fmt.Errorf("LOOP_GET_STATUS64: %w", err)
	}
	sector, err := unix.IoctlGetInt(loopFd, unix.BLKSSZGET)
	if err != nil {
		return LoopDevice{}, fmt.Errorf("BLKSSZGET: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(backingFd, &st); err != nil {
		return LoopDevice{}, fmt.Errorf("fstat backing file: %w", err)
	}
	if uint64(st.Dev) != info.Device || st.Ino != info.Inode {
		// Not the file this process handed over: someone else's device.
		return LoopDevice{}, fmt.Errorf("%s maps device %d inode %d, not the backing file (device %d inode %d)",
			loopPath(number), info.Device, info.Inode, st.Dev, st.Ino)
	}
	backing, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(backingFd))
	if err != nil {
		// No /proc: sysfs has the same path.
		if backing, err = readSysfs(fmt.Sprintf("/sys/block/loop%d/loop/backing_file", number)); err != nil {
			return LoopDevice{}, err
		}
	}
	return LoopDevice{
		Path: loopPath(number), Number: number, BackingFile: backing,
		Offset: info.Offset, SizeLimit: info.Sizelimit,
		ReadOnly:       info.Flags&unix.LO_FLAGS_READ_ONLY != 0,
		DirectIO:       info.Flags&unix.LO_FLAGS_DIRECT_IO != 0,
		SectorSize:     uint32(sector),
		backingKnown:   true,
		backingIsBlock: st.Mode&unix.S_IFMT == unix.S_IFBLK,
		backingRdev:    st.Rdev,
		backingDev:     st.Dev,
		backingIno:     st.Ino,
	}, nil
}

// configureFreeLoop finds a free loop device and configures it. Between
// LOOP_CTL_GET_FREE and LOOP_CONFIGURE another attacher (this process,
// losetup, a container runtime) may take the same device: LOOP_CONFIGURE
// then fails with EBUSY and we ask for the next free one. It returns the
// device's number and a descriptor of it, still open, which the caller
// closes.
func configureFreeLoop(ctl int, config *unix.LoopConfig) (int, int, error) {
	var lastErr error
	for attempt := 0; attempt < attachAttempts; attempt++ {
		number, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return 0, -1, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		loopFd, err := unix.Open(loopPath(number), unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			// ENOENT/ENXIO: the device node is not there yet, or another
			// process removed the device (LOOP_CTL_REMOVE) meanwhile.
			if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENXIO) {
				lastErr = err
				time.Sleep(time.Millisecond)
				continue
			}
			return 0, -1, &os.PathError{Op: "open", Path: loopPath(number), Err: err}
		}
		err = unix.IoctlLoopConfigure(loopFd, config)
		if err == nil {
			return number, loopFd, nil
		}
		unix.Close(loopFd)
		if errors.Is(err, unix.EBUSY) {
			lastErr = err
			continue
		}
		return 0, -1, fmt.Errorf("LOOP_CONFIGURE %s: %w", loopPath(number), err)
	}
	return 0, -1, fmt.Errorf("no free loop device after %d attempts: %w", attachAttempts, lastErr)
}

func loopPath(number int) string { return "/dev/loop" + strconv.Itoa(number) }

// loopDeviceInfo reads an attached loop device's configuration from sysfs;
// os.ErrNotExist if loopN is not attached.
func loopDeviceInfo(number int) (LoopDevice, error) {
	dir := fmt.Sprintf("/sys/block/loop%d", number)
	backing, err := readSysfs(filepath.Join(dir, "loop", "backing_file"))
	if err != nil {
		return LoopDevice{}, err
	}
	dev := LoopDevice{Path: loopPath(number), Number: number, BackingFile: backing}
	if b, ok := strings.CutSuffix(backing, " (deleted)"); ok {
		dev.BackingFile, dev.BackingDeleted = b, true
	}
	var f fieldErrs
	read := func(name string) uint64 {
		n, err := readSysfsUint(filepath.Join(dir, name))
		f.keep(err)
		return n
	}
	dev.Offset = read("loop/offset")
	dev.SizeLimit = read("loop/sizelimit")
	dev.DirectIO = read("loop/dio") == 1
	dev.ReadOnly = read("ro") == 1
	dev.SectorSize = uint32(read("queue/logical_block_size"))
	if f.err != nil {
		if errors.Is(f.err, unix.ENODEV) || errors.Is(f.err, unix.ENXIO) {
			// Detached (and perhaps removed) between the reads.
			return LoopDevice{}, fmt.Errorf("loop%d: %w (%w)", number, os.ErrNotExist, f.err)
		}
		return LoopDevice{}, f.err
	}
	if !dev.BackingDeleted {
		var st unix.Stat_t
		if err := unix.Stat(dev.BackingFile, &st); err == nil {
			dev.backingKnown = true
			dev.backingIsBlock = st.Mode&unix.S_IFMT == unix.S_IFBLK
			dev.backingRdev = st.Rdev
			dev.backingDev, dev.backingIno = st.Dev, st.Ino
		}
	}
	return dev, nil
}

// listLoops returns every attached loop device, by device number.
func listLoops() ([]LoopDevice, error) {
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		return nil, err
	}
	var loops []LoopDevice
	for _, e := range entries {
		numStr, ok := strings.CutPrefix(e.Name(), "loop")
		if !ok {
			continue
		}
		number, err := strconv.Atoi(numStr)
		if err != nil {
			continue
		}
		dev, err := loopDeviceInfo(number)
		if errors.Is(err, os.ErrNotExist) {
			continue // not attached, or detached while we looked
		}
		if err != nil {
			return nil, err
		}
		loops = append(loops, dev)
	}
	sort.Slice(loops, func(i, j int) bool { return loops[i].Number < loops[j].Number })
	return loops, nil
}

// LoopDevices returns every attached loop device on the host.
func LoopDevices() ([]LoopDevice, error) { return listLoops() }

// FindLoops returns the loop devices attached to backing, in device order,
// or none. It compares files, not path strings: the same file under
// another path (a symlink, a bind mount) matches, and a block device
// matches by device number. It answers from the loop index (loopindex.go):
// no sysfs scan of every loop device per call.
func FindLoops(backing string) ([]LoopDevice, error) {
	return findLoops(backing, true)
}

func findLoops(backing string, refreshOnMiss bool) ([]LoopDevice, error) {
	var st unix.Stat_t
	if err := unix.Stat(backing, &st); err != nil {
		return nil, fmt.Errorf("find loop devices: %w", &os.PathError{Op: "stat", Path: backing, Err: err})
	}
	found, err := loopIdx.find(&st, refreshOnMiss)
	if err != nil {
		return nil, fmt.Errorf("find loop devices of %s: %w", backing, err)
	}
	return found, nil
}

// DetachLoop detaches the loop device at path (LOOP_CLR_FD). A device that
// is not attached is not an error, so a retried cleanup succeeds. If the
// device is still open elsewhere, the kernel detaches it when the last
// opener closes it.
func DetachLoop(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENXIO) {
			return nil
		}
		return fmt.Errorf("detach loop: %w", &os.PathError{Op: "open", Path: path, Err: err})
	}
	defer unix.Close(fd)
	defer loopIdx.removed(path)
	if err := unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0); err != nil {
		if errors.Is(err, unix.ENXIO) {
			return nil // not attached
		}
		return fmt.Errorf("LOOP_CLR_FD %s: %w", path, err)
	}
	return nil
}

// DetachLoopDevice detaches l only while its device still has l's backing
// file (by device and inode, read through the open device): a device that
// another process detached and attached to a file of its own since l was
// listed is left alone. Without a known backing file it is DetachLoop.
func DetachLoopDevice(l LoopDevice) error {
	if !l.backingKnown {
		return DetachLoop(l.Path)
	}
	fd, err := unix.Open(l.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENXIO) {
			return nil
		}
		return fmt.Errorf("detach loop: %w", &os.PathError{Op: "open", Path: l.Path, Err: err})
	}
	defer unix.Close(fd)
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		if errors.Is(err, unix.ENXIO) {
			return nil // not attached
		}
		return fmt.Errorf("LOOP_GET_STATUS64 %s: %w", l.Path, err)
	}
	if info.Device != l.backingDev || info.Inode != l.backingIno {
		return nil // someone else's now
	}
	defer loopIdx.removed(l.Path)
	if err := unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("LOOP_CLR_FD %s: %w", l.Path, err)
	}
	return nil
}

// SetLoopCapacity makes the loop device at path re-read its backing file's
// size (LOOP_SET_CAPACITY), after the file grew.
func SetLoopCapacity(path string) error {
	return withLoopFd(path, func(fd int) error {
		if err := unix.IoctlSetInt(fd, unix.LOOP_SET_CAPACITY, 0); err != nil {
			return fmt.Errorf("LOOP_SET_CAPACITY %s: %w", path, err)
		}
		return nil
	})
}

// SetLoopSizeLimit changes the size limit of the loop device at path and
// makes it take effect (LOOP_SET_STATUS64, then LOOP_SET_CAPACITY). Used
// when the region of a backing device the loop maps grows, e.g. an
// extended loop-activated LV.
func SetLoopSizeLimit(path string, sizeLimit uint64) error {
	return withLoopFd(path, func(fd int) error {
		info, err := unix.IoctlLoopGetStatus64(fd)
		if err != nil {
			return fmt.Errorf("LOOP_GET_STATUS64 %s: %w", path, err)
		}
		if info.Sizelimit != sizeLimit {
			info.Sizelimit = sizeLimit
			// EAGAIN: the kernel could not drop the device's page cache
			// while changing the size; it is transient.
			for attempt := 0; ; attempt++ {
				err = unix.IoctlLoopSetStatus64(fd, info)
				if !errors.Is(err, unix.EAGAIN) || attempt == 50 {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			if err != nil {
				return fmt.Errorf("LOOP_SET_STATUS64 %s size limit %d: %w", path, sizeLimit, err)
			}
			loopIdx.sizeLimitSet(path, sizeLimit)
		}
		if err := unix.IoctlSetInt(fd, unix.LOOP_SET_CAPACITY, 0); err != nil {
			return fmt.Errorf("LOOP_SET_CAPACITY %s: %w", path, err)
		}
		return nil
	})
}

func withLoopFd(path string, fn func(fd int) error) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	return fn(fd)
}

// GrowLoopFile grows the regular file backing to size bytes (never
// shrinks it) and tells every loop device attached to it about the new
// size. Growing to the current size only refreshes the loop devices, so a
// retried grow after a crash completes the job.
func GrowLoopFile(backing string, size int64) error {
	fi, err := os.Stat(backing)
	if err != nil {
		return fmt.Errorf("grow loop file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("grow loop file %s: not a regular file", backing)
	}
	if size < fi.Size() {
		return fmt.Errorf("grow loop file %s to %d bytes: smaller than its size %d; shrinking is not supported", backing, size, fi.Size())
	}
	if size > fi.Size() {
		if err := truncateSync(backing, size); err != nil {
			return fmt.Errorf("grow loop file: %w", err)
		}
	}
	loops, err := FindLoops(backing)
	if err != nil {
		return err
	}
	for _, l := range loops {
		if err := SetLoopCapacity(l.Path); err != nil {
			return fmt.Errorf("grow loop file %s: %w", backing, err)
		}
	}
	return nil
}

// truncateSync sets the file's size and makes the new size durable, so a
// crash cannot leave a loop device larger than its file after restart.
func truncateSync(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// RemoveLoopDevice removes the unattached loop device /dev/loopN
// (LOOP_CTL_REMOVE), which the kernel otherwise keeps after a detach. It
// fails with EBUSY for a device that is attached or open.
func RemoveLoopDevice(n int) error {
	ctl, err := unix.Open(loopControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: loopControlPath, Err: err}
	}
	defer unix.Close(ctl)
	// The device number is the ioctl's argument itself, not a pointer.
	if err := unix.IoctlSetInt(ctl, unix.LOOP_CTL_REMOVE, n); err != nil {
		return fmt.Errorf("LOOP_CTL_REMOVE /dev/loop%d: %w", n, err)
	}
	return nil
}

// LoopBackingFile returns the backing file of the loop device at path
// (/dev/loopN as named, symlinks not followed), from sysfs, without the
// kernel's " (deleted)" mark; "" if path is not an attached loop device.
// It reads one sysfs file: the qemu hook calls it for every disk.
func LoopBackingFile(path string) string {
	numStr, ok := strings.CutPrefix(path, "/dev/loop")
	if !ok {
		return ""
	}
	if _, err := strconv.Atoi(numStr); err != nil {
		return ""
	}
	b, err := readSysfs("/sys/block/loop" + numStr + "/loop/backing_file")
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(b, " (deleted)")
}
