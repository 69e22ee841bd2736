package qcow2

import (
	"errors"
	"fmt"
	"io"
	"unsafe"

	"golang.org/x/sys/unix"
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
	// ErrWriterFailed: an earlier I/O error stopped the writer; the image on
	// the device is consistent (leaks at worst), but this Writer is done.
	ErrWriterFailed = errors.New("writer stopped after an earlier error")
)

// blockIO does aligned I/O on a Device: requests that are already aligned
// go straight through, others are widened to whole logical blocks.
//
// The widened edges come from one copy per logical block (the block
// cache), never from a caller's buffer: when clusters are smaller than the
// device's logical block, several structures (the header, the L1 table,
// refcount table and blocks, L2 tables, data) share one block, and a write
// of one of them must carry the others' current bytes. The cache is
// write-through (the device always has what it holds), so dropping an
// entry is always safe; every write updates the entries it overlaps.
type blockIO struct {
	dev Device
	bs  int64
	// limit is the container size; 0 means unbounded (a regular file that
	// grows, where reads past its end return zeros).
	limit int64
	// writes counts requests since the last Sync; a barrier syncs only
	// when something was written.
	writes int64
	// blocks caches logical blocks that partial writes touched, by offset.
	blocks map[int64][]byte
}

// maxCachedBytes bounds the block cache.
const maxCachedBytes = 4 << 20

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

// block returns the cached copy of the logical block at off (a multiple
// of bs), reading it on a miss.
func (b *blockIO) block(off int64) ([]byte, error) {
	if blk, ok := b.blocks[off]; ok {
		return blk, nil
	}
	blk := alignedBuffer(int(b.bs), int(b.bs))
	if err := b.rawRead(blk, off); err != nil {
		return nil, err
	}
	if b.blocks == nil {
		b.blocks = map[int64][]byte{}
	}
	for k := range b.blocks { // any entry can go: the device has its bytes
		if int64(len(b.blocks)) < max(16, maxCachedBytes/b.bs) {
			break
		}
		delete(b.blocks, k)
	}
	b.blocks[off] = blk
	return blk, nil
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
	if blk, ok := b.blocks[start]; ok && end-start == b.bs {
		copy(p, blk[off-start:])
		return nil
	}
	buf := alignedBuffer(int(end-start), int(b.bs))
	if err := b.rawRead(buf, start); err != nil {
		return err
	}
	copy(p, buf[off-start:])
	return nil
}

// writeAt writes p at off. An unaligned request takes the logical blocks
// at its edges from the block cache, so neighbouring bytes are written
// back as they are now.
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
	if end-start == b.bs { // inside one block: patch the cached copy
		blk, err := b.block(start)
		if err != nil {
			return err
		}
		copy(blk[off-start:], p)
		return b.rawWrite(blk, start)
	}
	buf := alignedBuffer(int(end-start), int(b.bs))
	if start != off {
		head, err := b.block(start)
		if err != nil {
			return err
		}
		copy(buf, head)
	}
	if tail := end - b.bs; end != off+int64(len(p)) {
		blk, err := b.block(tail)
		if err != nil {
			return err
		}
		copy(buf[tail-start:], blk)
	}
	copy(buf[off-start:], p)
	return b.rawWrite(buf, start)
}

// rawWrite writes an aligned range and brings the cached blocks it covers
// up to date (or drops them when the write failed: the device's bytes
// are then unknown).
func (b *blockIO) rawWrite(p []byte, off int64) error {
	b.writes++
	n, err := b.dev.WriteAt(p, off)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	b.refreshCached(p, off, err == nil)
	if err != nil {
		if errors.Is(err, unix.ENOSPC) {
			err = fmt.Errorf("%w: %w", ErrNoSpace, err)
		}
		return fmt.Errorf("writing %d bytes at host offset %d: %w", len(p), off, err)
	}
	return nil
}

func (b *blockIO) refreshCached(p []byte, off int64, ok bool) {
	if len(b.blocks) == 0 {
		return
	}
	update := func(at int64, blk []byte) {
		src := p[at-off : at-off+b.bs]
		switch {
		case !ok:
			delete(b.blocks, at)
		case &src[0] != &blk[0]:
			copy(blk, src)
		}
	}
	if n := int64(len(p)) / b.bs; n <= int64(len(b.blocks)) {
		for at := off; at < off+int64(len(p)); at += b.bs {
			if blk, hit := b.blocks[at]; hit {
				update(at, blk)
			}
		}
		return
	}
	for at, blk := range b.blocks {
		if at >= off && at < off+int64(len(p)) {
			update(at, blk)
		}
	}
}

// writeOwned writes buf[lo:hi] at base+lo, where buf is the aligned
// in-memory copy of a structure at base. When the range widened to
// logical blocks stays inside buf it is written from buf directly;
// otherwise the edge blocks come from the block cache.
func (b *blockIO) writeOwned(buf []byte, base, lo, hi int64) error {
	wlo, whi := alignDown(lo, b.bs), alignUp(hi, b.bs)
	if base%b.bs == 0 && whi <= int64(len(buf)) {
		return b.writeAt(buf[wlo:whi], base+wlo)
	}
	return b.writeAt(buf[lo:hi], base+lo)
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
