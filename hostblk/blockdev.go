package hostblk

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrDeviceBusy means an exclusive open found the device already claimed:
// opened exclusively by another writer, mounted, or held by the kernel
// (an LVM PV with active LVs, a RAID member, ...).
var ErrDeviceBusy = errors.New("block device is busy")

// OpenOptions choose how OpenDevice opens a block device.
type OpenOptions struct {
	// Write opens the device read-write; otherwise read-only.
	Write bool
	// Exclusive opens with O_EXCL. The kernel then refuses a second
	// exclusive opener and mounting the device for as long as it is open,
	// and the open fails with ErrDeviceBusy if either already happened.
	// Plain (non-exclusive) opens by other processes are still allowed.
	Exclusive bool
	// Direct opens with O_DIRECT: I/O bypasses the page cache and buffers,
	// offsets and lengths must be aligned to the logical block size.
	Direct bool
}

// Device is an open block device.
type Device struct {
	file *os.File
}

// OpenDevice opens the block device at path. It fails if path is not a
// block device (ioctls on a regular file would fail later, confusingly),
// and with an error matching ErrDeviceBusy if Exclusive and the device is
// claimed.
func OpenDevice(path string, opts OpenOptions) (*Device, error) {
	flags := unix.O_RDONLY | unix.O_CLOEXEC
	if opts.Write {
		flags = unix.O_RDWR | unix.O_CLOEXEC
	}
	if opts.Exclusive {
		flags |= unix.O_EXCL
	}
	if opts.Direct {
		flags |= unix.O_DIRECT
	}
	fd, err := unix.Open(path, flags, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) && opts.Exclusive {
			return nil, fmt.Errorf("open %s exclusively: %w (%w)", path, ErrDeviceBusy, err)
		}
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		unix.Close(fd)
		return nil, fmt.Errorf("open %s: not a block device (mode %#o)", path, st.Mode&unix.S_IFMT)
	}
	return &Device{file: os.NewFile(uintptr(fd), path)}, nil
}

// File returns the underlying file for reads and writes (ReadAt, WriteAt).
// It stays owned by the Device: do not close it.
func (d *Device) File() *os.File { return d.file }

// Path returns the path the device was opened with.
func (d *Device) Path() string { return d.file.Name() }

// Close closes the device, releasing an exclusive claim.
func (d *Device) Close() error { return d.file.Close() }

// ioctl runs fn with the device's file descriptor, keeping the file alive.
func (d *Device) ioctl(name string, fn func(fd int) error) error {
	conn, err := d.file.SyscallConn()
	if err != nil {
		return err
	}
	var ioctlErr error
	if err := conn.Control(func(fd uintptr) { ioctlErr = fn(int(fd)) }); err != nil {
		return err
	}
	if ioctlErr != nil {
		return fmt.Errorf("%s on %s: %w", name, d.Path(), ioctlErr)
	}
	return nil
}

// Size returns the device size in bytes (BLKGETSIZE64).
func (d *Device) Size() (int64, error) {
	var size uint64
	err := d.ioctl("BLKGETSIZE64", func(fd int) error {
		return ioctlPtr(fd, unix.BLKGETSIZE64, unsafe.Pointer(&size))
	})
	return int64(size), err
}

// LogicalBlockSize returns the smallest unit the device can address, in
// bytes (BLKSSZGET): 512 or 4096 in practice. O_DIRECT I/O, discard and
// zero-out must be aligned to it.
func (d *Device) LogicalBlockSize() (int, error) {
	var n int
	err := d.ioctl("BLKSSZGET", func(fd int) (err error) {
		n, err = unix.IoctlGetInt(fd, unix.BLKSSZGET)
		return err
	})
	return n, err
}

// PhysicalBlockSize returns the device's physical block size in bytes
// (BLKPBSZGET): writes smaller than it cost a read-modify-write.
func (d *Device) PhysicalBlockSize() (int, error) {
	var n uint32
	err := d.ioctl("BLKPBSZGET", func(fd int) (err error) {
		n, err = unix.IoctlGetUint32(fd, unix.BLKPBSZGET)
		return err
	})
	return int(n), err
}

// ReadOnly reports whether the kernel marks the device read-only (BLKROGET),
// e.g. a loop device attached read-only.
func (d *Device) ReadOnly() (bool, error) {
	var ro int
	err := d.ioctl("BLKROGET", func(fd int) (err error) {
		ro, err = unix.IoctlGetInt(fd, unix.BLKROGET)
		return err
	})
	return ro != 0, err
}

// Discard tells the device that bytes [offset, offset+length) are unused
// (BLKDISCARD). What reads return afterwards is device-specific: a loop
// device over a file punches a hole and reads zeros, an SSD may not. Use
// ZeroOut when zeros are required. Both bounds must be multiples of the
// logical block size.
func (d *Device) Discard(offset, length int64) error {
	if err := d.checkRange("discard", offset, length); err != nil {
		return err
	}
	r := [2]uint64{uint64(offset), uint64(length)}
	return d.ioctl("BLKDISCARD", func(fd int) error {
		return ioctlPtr(fd, unix.BLKDISCARD, unsafe.Pointer(&r))
	})
}

// ZeroOut makes bytes [offset, offset+length) read as zeros (BLKZEROOUT),
// using the device's fastest way (write-zeroes, unmap) and falling back to
// writing zeros. Both bounds must be multiples of the logical block size.
func (d *Device) ZeroOut(offset, length int64) error {
	if err := d.checkRange("zero-out", offset, length); err != nil {
		return err
	}
	r := [2]uint64{uint64(offset), uint64(length)}
	return d.ioctl("BLKZEROOUT", func(fd int) error {
		return ioctlPtr(fd, unix.BLKZEROOUT, unsafe.Pointer(&r))
	})
}

// checkRange rejects ranges the kernel would reject with a bare EINVAL, so
// the error says which value is wrong.
func (d *Device) checkRange(op string, offset, length int64) error {
	if offset < 0 || length <= 0 {
		return fmt.Errorf("%s %s: offset %d length %d: want offset >= 0 and length > 0", op, d.Path(), offset, length)
	}
	bs, err := d.LogicalBlockSize()
	if err != nil {
		return err
	}
	if offset%int64(bs) != 0 || length%int64(bs) != 0 {
		return fmt.Errorf("%s %s: offset %d length %d: not multiples of the logical block size %d", op, d.Path(), offset, length, bs)
	}
	size, err := d.Size()
	if err != nil {
		return err
	}
	if offset > size || length > size-offset {
		return fmt.Errorf("%s %s: offset %d length %d: beyond the device size %d", op, d.Path(), offset, length, size)
	}
	return nil
}

// Info returns all block-device facts at once.
func (d *Device) Info() (DeviceInfo, error) {
	var info DeviceInfo
	var err error
	info.Path = d.Path()
	if info.Size, err = d.Size(); err != nil {
		return DeviceInfo{}, err
	}
	if info.LogicalBlockSize, err = d.LogicalBlockSize(); err != nil {
		return DeviceInfo{}, err
	}
	if info.PhysicalBlockSize, err = d.PhysicalBlockSize(); err != nil {
		return DeviceInfo{}, err
	}
	if info.ReadOnly, err = d.ReadOnly(); err != nil {
		return DeviceInfo{}, err
	}
	return info, nil
}

// DeviceInfo are the facts about a block device the qcow2 writer needs.
type DeviceInfo struct {
	Path              string
	Size              int64
	LogicalBlockSize  int
	PhysicalBlockSize int
	ReadOnly          bool
}

// FlushDevice makes what was written to the block device at path durable
// (fsync: the kernel sends a cache flush down through device-mapper and
// loop devices to the disks), including writes other processes made with
// O_DIRECT, which bypass the page cache but not a volatile write cache.
func FlushDevice(path string) error {
	d, err := OpenDevice(path, OpenOptions{})
	if err != nil {
		return err
	}
	err = d.file.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("flush %s: %w", path, err)
	}
	return nil
}

// Inspect opens path read-only (not exclusively) and returns its facts.
func Inspect(path string) (DeviceInfo, error) {
	d, err := OpenDevice(path, OpenOptions{})
	if err != nil {
		return DeviceInfo{}, err
	}
	defer d.Close()
	return d.Info()
}

// Usage says who uses a block device. A device is in use if any field is
// set.
type Usage struct {
	// Holders are the kernel devices stacked on it (/sys/block/X/holders),
	// e.g. dm-0 for an active LVM LV on a PV.
	Holders []string
	// LoopDevices are loop devices whose backing file is this device, e.g.
	// LVs activated by loop over this PV.
	LoopDevices []string
	// Claimed means an exclusive open failed with EBUSY: the device is
	// mounted, opened with O_EXCL by a writer, or claimed by a kernel
	// driver.
	Claimed bool
}

// InUse reports whether anything is in use.
func (u Usage) InUse() bool {
	return len(u.Holders) > 0 || len(u.LoopDevices) > 0 || u.Claimed
}

// DeviceUsage finds out who uses the block device at path. The exclusive
// open it uses as a probe is released at once; the answer can be stale as
// soon as it is returned, so callers that need to keep others away should
// hold an exclusive Device instead.
func DeviceUsage(path string) (Usage, error) {
	var u Usage
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return Usage{}, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return Usage{}, fmt.Errorf("device usage of %s: not a block device", path)
	}
	sysDir, err := sysfsBlockDir(st.Rdev)
	if err != nil {
		return Usage{}, err
	}
	entries, err := os.ReadDir(filepath.Join(sysDir, "holders"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return Usage{}, err
	}
	for _, e := range entries {
		u.Holders = append(u.Holders, e.Name())
	}
	loops, err := listLoops()
	if err != nil {
		return Usage{}, err
	}
	for _, l := range loops {
		if l.backingRdev == st.Rdev && l.backingIsBlock {
			u.LoopDevices = append(u.LoopDevices, l.Path)
		}
	}
	d, err := OpenDevice(path, OpenOptions{Exclusive: true})
	switch {
	case errors.Is(err, ErrDeviceBusy):
		u.Claimed = true
	case err != nil:
		return Usage{}, err
	default:
		d.Close()
	}
	return u, nil
}

// sysfsBlockDir returns /sys/dev/block/MAJ:MIN resolved, the sysfs
// directory of a block device (a partition's directory too).
func sysfsBlockDir(rdev uint64) (string, error) {
	link := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(rdev), unix.Minor(rdev))
	dir, err := filepath.EvalSymlinks(link)
	if err != nil {
		return "", fmt.Errorf("sysfs entry of block device %d:%d: %w", unix.Major(rdev), unix.Minor(rdev), err)
	}
	return dir, nil
}

// readSysfs reads a one-line sysfs attribute.
func readSysfs(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

func readSysfsUint(path string) (uint64, error) {
	s, err := readSysfs(path)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("sysfs %s=%q: not a number", path, s)
	}
	return n, nil
}

// ioctlPtr is an ioctl whose argument is a pointer; x/sys/unix exports
// helpers only for specific argument types.
func ioctlPtr(fd int, req uint, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}
