package hostblk

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Errors of OpenTarget.
var (
	// ErrTargetBusy: another writer holds the image (an exclusive open of
	// the block device, a lock on the file, or qemu's image locks: then
	// the error is also ErrImageInUse).
	ErrTargetBusy = errors.New("image is held by another writer")
	// ErrNoDirectIO: the target cannot do O_DIRECT (tmpfs, some network
	// filesystems); ask for buffered I/O explicitly to use the page cache.
	ErrNoDirectIO = errors.New("target does not support O_DIRECT")
)

// maxDirectIOAlign bounds the alignment OpenTarget reports: no logical
// block is larger.
const maxDirectIOAlign = 64 << 10

// Target is an image container opened for writing: a block device opened
// exclusively, or a regular file holding an exclusive lock; both hold
// qemu-img's writer locks (WriterLocks) until Close.
type Target struct {
	File *os.File
	Path string
	// Size is the container's current size in bytes.
	Size int64
	// BlockSize is the I/O alignment the target needs: the device's logical
	// block size, or the file's direct I/O alignment.
	BlockSize int
	// BlockDevice is true for block devices, whose size bounds the image.
	BlockDevice bool
	// Direct is true when the target is open with O_DIRECT.
	Direct bool
	dev    *Device
	lock   *ImageLock
}

// ReadAt, WriteAt and Sync make a Target what the qcow2 writer writes on.
func (t *Target) ReadAt(p []byte, off int64) (int, error)  { return t.File.ReadAt(p, off) }
func (t *Target) WriteAt(p []byte, off int64) (int, error) { return t.File.WriteAt(p, off) }
func (t *Target) Sync() error                              { return t.File.Sync() }

// ContainerSize is the bound on the image's growth: the device size for a
// block device, 0 (unbounded) for a file.
func (t *Target) ContainerSize() int64 {
	if t.BlockDevice {
		return t.Size
	}
	return 0
}

// Close releases the target (and its exclusive claim and locks).
func (t *Target) Close() error {
	t.lock.Release()
	if t.dev != nil {
		return t.dev.Close()
	}
	return t.File.Close()
}

// OpenTarget opens the image container at path read-write for one writer:
// a block device with O_EXCL (a second writer, or a mount, gets
// ErrTargetBusy) or a regular file with flock(LOCK_EX|LOCK_NB). Before it
// returns, and so before anything is written, it takes qemu-img's writer
// locks (WriterLocks): an image qemu holds is refused with an
// *ImageInUseError (ErrImageInUse and ErrTargetBusy) that names the
// holder, and qemu refuses to open the image until Close. Both are
// opened with O_DIRECT unless buffered is true; a target that cannot do
// O_DIRECT fails with ErrNoDirectIO. BlockSize is queried, never assumed:
// BLKSSZGET for devices, statx's direct I/O alignment (or st_blksize) for
// files.
func OpenTarget(path string, buffered bool) (*Target, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		return openDeviceTarget(path, buffered)
	case unix.S_IFREG:
		return openFileTarget(path, buffered)
	}
	return nil, fmt.Errorf("%s: only block devices and regular files can hold an image", path)
}

func openDeviceTarget(path string, buffered bool) (*Target, error) {
	dev, err := OpenDevice(path, OpenOptions{Write: true, Exclusive: true, Direct: !buffered})
	if err != nil {
		if errors.Is(err, ErrDeviceBusy) {
			return nil, fmt.Errorf("%w: %w", ErrTargetBusy, err)
		}
		if errors.Is(err, unix.EINVAL) && !buffered {
			return nil, fmt.Errorf("%w: %s: %w (ask for buffered I/O to use the page cache)", ErrNoDirectIO, path, err)
		}
		return nil, err
	}
	// The locks come first, so the size is read when nobody else may
	// change it.
	lock, err := LockImage(dev.File(), WriterLocks)
	if err != nil {
		dev.Close()
		return nil, err
	}
	info, err := dev.Info()
	if err != nil {
		dev.Close()
		return nil, err
	}
	if info.ReadOnly {
		dev.Close()
		return nil, fmt.Errorf("%s: the block device is read-only", path)
	}
	return &Target{File: dev.File(), Path: path, Size: info.Size, BlockSize: info.LogicalBlockSize,
		BlockDevice: true, Direct: !buffered, dev: dev, lock: lock}, nil
}

func openFileTarget(path string, buffered bool) (*Target, error) {
	flags := unix.O_RDWR | unix.O_CLOEXEC | unix.O_NOCTTY
	if !buffered {
		flags |= unix.O_DIRECT
	}
	fd, err := unix.Open(path, flags, 0)
	if err != nil {
		if errors.Is(err, unix.EINVAL) && !buffered {
			return nil, fmt.Errorf("%w: %s: the filesystem refuses O_DIRECT (%w); ask for buffered I/O to use the page cache", ErrNoDirectIO, path, err)
		}
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s is locked by another process", ErrTargetBusy, path)
		}
		return nil, &os.PathError{Op: "flock", Path: path, Err: err}
	}
	lock, err := LockImage(f, WriterLocks)
	if err != nil {
		f.Close()
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	return &Target{File: f, Path: path, Size: st.Size, BlockSize: fileBlockSize(fd, &st), Direct: !buffered, lock: lock}, nil
}

// fileBlockSize is the alignment direct I/O on the file needs: statx's
// dio_offset_align and dio_mem_align (Linux 6.1+), or else st_blksize, the
// filesystem block, which is always a multiple of it.
func fileBlockSize(fd int, st *unix.Stat_t) int {
	var sx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &sx); err == nil &&
		sx.Mask&unix.STATX_DIOALIGN != 0 && sx.Dio_offset_align != 0 {
		a := max(int(sx.Dio_offset_align), int(sx.Dio_mem_align), 512)
		if a&(a-1) == 0 && a <= maxDirectIOAlign {
			return a
		}
	}
	return min(max(int(st.Blksize), 512), maxDirectIOAlign)
}
