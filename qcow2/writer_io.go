package qcow2

import (
	"errors"
	"fmt"
	"io"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/hostblk"
)

// Device is what a Writer writes an image onto: a block device or a file,
// usually opened with O_DIRECT. Every ReadAt and WriteAt the Writer makes
// has an offset, a length and a buffer address that are multiples of the
// block size given in WriterOptions.
type Device interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
}

// Errors of the writer. They are not verdicts on the image (IsRefusal is
// false), except the refusals OpenWriter returns as *FieldError.
var (
	// ErrNoSpace: the image would grow past the end of its container (the
	// block device). The image stays consistent; HighestAllocated tells how
	// big the container must at least be.
	ErrNoSpace = errors.New("no space left in the image's container")
	// ErrTargetBusy: another writer holds the image (an exclusive open of
	// the block device, or a lock on the file).
	ErrTargetBusy = errors.New("image is held by another writer")
	// ErrNoDirectIO: the target cannot do O_DIRECT (tmpfs, some network
	// filesystems); ask for buffered I/O explicitly to use the page cache.
	ErrNoDirectIO = errors.New("target does not support O_DIRECT")
	// ErrWriterFailed: an earlier I/O error stopped the writer; the image on
	// the device is consistent (leaks at worst), but this Writer is done.
	ErrWriterFailed = errors.New("writer stopped after an earlier error")
)

// blockIO does aligned I/O on a Device: requests that are already aligned
// go straight through, others are widened to whole logical blocks with a
// read-modify-write through an aligned bounce buffer.
type blockIO struct {
	dev Device
	bs  int64
	// limit is the container size; 0 means unbounded (a regular file that
	// grows, where reads past its end return zeros).
	limit int64
	// writes counts requests since the last Sync; a barrier syncs only
	// when something was written.
	writes int64
}

func isAligned(p []byte, off, bs int64) bool {
	if off%bs != 0 || int64(len(p))%bs != 0 {
		return false
	}
	return len(p) == 0 || uintptr(unsafe.Pointer(&p[0]))%uintptr(bs) == 0
}

func alignDown(x, a int64) int64 { return x - x%a }
func alignUp(x, a int64) int64   { return alignDown(x+a-1, a) }

// rawRead reads an aligned range; past the end of an unbounded file the
// bytes read as zeros.
func (b *blockIO) rawRead(p []byte, off int64) error {
	n, err := b.dev.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if (err == nil || err == io.EOF) && b.limit == 0 {
		clear(p[n:])
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("reading %d bytes at host offset %d: %w", len(p), off, err)
}

// readAt reads len(p) bytes at off, whatever their alignment.
func (b *blockIO) readAt(p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if isAligned(p, off, b.bs) {
		return b.rawRead(p, off)
	}
	start, end := alignDown(off, b.bs), alignUp(off+int64(len(p)), b.bs)
	buf := alignedBuffer(int(end-start), int(b.bs))
	if err := b.rawRead(buf, start); err != nil {
		return err
	}
	copy(p, buf[off-start:])
	return nil
}

// writeAt writes p at off. An unaligned request reads the logical blocks
// at its edges first, so neighbouring bytes are written back unchanged.
func (b *blockIO) writeAt(p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if b.limit > 0 && off+int64(len(p)) > alignUp(b.limit, b.bs) {
		return fmt.Errorf("writing %d bytes at host offset %d: %w (container is %d bytes)", len(p), off, ErrNoSpace, b.limit)
	}
	if isAligned(p, off, b.bs) {
		return b.rawWrite(p, off)
	}
	start, end := alignDown(off, b.bs), alignUp(off+int64(len(p)), b.bs)
	buf := alignedBuffer(int(end-start), int(b.bs))
	if start != off {
		if err := b.rawRead(buf[:b.bs], start); err != nil {
			return err
		}
	}
	headRead := start != off
	if tail := end - b.bs; end != off+int64(len(p)) && !(tail == start && headRead) {
		if err := b.rawRead(buf[tail-start:], tail); err != nil {
			return err
		}
	}
	copy(buf[off-start:], p)
	return b.rawWrite(buf, start)
}

func (b *blockIO) rawWrite(p []byte, off int64) error {
	b.writes++
	n, err := b.dev.WriteAt(p, off)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		if errors.Is(err, unix.ENOSPC) {
			err = fmt.Errorf("%w: %w", ErrNoSpace, err)
		}
		return fmt.Errorf("writing %d bytes at host offset %d: %w", len(p), off, err)
	}
	return nil
}

// barrier makes every write so far durable before the next one is issued:
// the order the qcow2 metadata depends on must survive a device cache that
// reorders, not only a process that dies.
func (b *blockIO) barrier() error {
	if b.writes == 0 {
		return nil
	}
	return b.sync()
}

func (b *blockIO) sync() error {
	if err := b.dev.Sync(); err != nil {
		return fmt.Errorf("flushing the device: %w", err)
	}
	b.writes = 0
	return nil
}

// alignedReader lets the reader code (ReadHeader, Image) read through a
// Device opened with O_DIRECT.
type alignedReader struct{ io *blockIO }

func (r alignedReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative read offset %d", off)
	}
	want := p
	if r.io.limit > 0 {
		if off >= r.io.limit {
			return 0, io.EOF
		}
		want = p[:min(int64(len(p)), r.io.limit-off)]
	}
	if err := r.io.readAt(want, off); err != nil {
		return 0, err
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

// Target is an image container opened for writing: a block device opened
// exclusively, or a regular file holding an exclusive lock.
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
	dev    *hostblk.Device
}

// ReadAt, WriteAt and Sync make a Target a Device.
func (t *Target) ReadAt(p []byte, off int64) (int, error)  { return t.File.ReadAt(p, off) }
func (t *Target) WriteAt(p []byte, off int64) (int, error) { return t.File.WriteAt(p, off) }
func (t *Target) Sync() error                              { return t.File.Sync() }

// ContainerSize is the bound to give WriterOptions: the device size for a
// block device, 0 (unbounded) for a file.
func (t *Target) ContainerSize() int64 {
	if t.BlockDevice {
		return t.Size
	}
	return 0
}

// Close releases the target (and its exclusive claim or lock).
func (t *Target) Close() error {
	if t.dev != nil {
		return t.dev.Close()
	}
	return t.File.Close()
}

// OpenTarget opens the image container at path read-write for one writer:
// a block device with O_EXCL (a second writer, or a mount, gets
// ErrTargetBusy) or a regular file with flock(LOCK_EX|LOCK_NB). Both are
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
	dev, err := hostblk.OpenDevice(path, hostblk.OpenOptions{Write: true, Exclusive: true, Direct: !buffered})
	if err != nil {
		if errors.Is(err, hostblk.ErrDeviceBusy) {
			return nil, fmt.Errorf("%w: %w", ErrTargetBusy, err)
		}
		if errors.Is(err, unix.EINVAL) && !buffered {
			return nil, fmt.Errorf("%w: %s: %w (ask for buffered I/O to use the page cache)", ErrNoDirectIO, path, err)
		}
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
		BlockDevice: true, Direct: !buffered, dev: dev}, nil
}

func openFileTarget(path string, buffered bool) (*Target, error) {
	flags := unix.O_RDWR | unix.O_CLOEXEC | unix.O_NOCTTY
	if !buffered {
		flags |= unix.O_DIRECT
	}
	fd, err := unix.Open(path, flags, 0)
	if err != nil {
		if errors.Is(err, unix.EINVAL) && !buffered {
			return nil, fmt.Errorf("%w: %s: the filesystem refuses O_DIRECT (%v); ask for buffered I/O to use the page cache", ErrNoDirectIO, path, err)
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
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	return &Target{File: f, Path: path, Size: st.Size, BlockSize: fileBlockSize(fd, &st), Direct: !buffered}, nil
}

// fileBlockSize is the alignment direct I/O on the file needs: statx's
// dio_offset_align and dio_mem_align (Linux 6.1+), or else st_blksize, the
// filesystem block, which is always a multiple of it.
func fileBlockSize(fd int, st *unix.Stat_t) int {
	var sx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &sx); err == nil &&
		sx.Mask&unix.STATX_DIOALIGN != 0 && sx.Dio_offset_align != 0 {
		a := max(int(sx.Dio_offset_align), int(sx.Dio_mem_align), 512)
		if a&(a-1) == 0 && a <= maxBlockSize {
			return a
		}
	}
	return min(max(int(st.Blksize), 512), maxBlockSize)
}
