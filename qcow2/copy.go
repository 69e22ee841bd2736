package qcow2

import (
	"bytes"
	"context"
	"fmt"
	"io"
)

// CopyChunkSize is how much CopyGuest reads from its source at once; the
// data runs of one chunk go to the writer as one request each.
const CopyChunkSize = 8 << 20

// GuestWriter is what CopyGuest writes to: a *Writer, or a wrapper
// around one (the daemon's grows the device and retries when it is full).
type GuestWriter interface {
	Header() *Header
	WriteAt(p []byte, off int64) (int, error)
	WriteZeroes(off, n int64) error
	Flush() error
}

// GuestReader is what CopyGuest reads: a Disk, or any source of a guest
// view of Size bytes.
type GuestReader interface {
	io.ReaderAt
	Size() int64
}

// CopyOptions tune CopyGuest; the zero value writes every zero run with
// WriteZeroes and flushes nothing (the caller flushes at the end).
type CopyOptions struct {
	// SkipZeros leaves runs of zero clusters unwritten: for a destination
	// that already reads zeros everywhere (a new image without backing).
	SkipZeros bool
	// FlushEvery makes what was copied durable after every this many
	// bytes of the source (0: never), and then calls Durable.
	FlushEvery int64
	// Durable is told, after each such flush, how many bytes of the
	// source are flushed for good.
	Durable func(done int64)
	// Progress is told how many bytes of the source are copied, after
	// each chunk.
	Progress func(done, total int64)
	// BufferAlign aligns the read buffers (the destination's logical
	// block size, so O_DIRECT writes go straight through); 0 means 4096.
	BufferAlign int
}

// CopyStats counts what CopyGuest did with the source's bytes.
type CopyStats struct {
	Data int64 // written as data
	Zero int64 // runs of zeros: written as zeros, or skipped (SkipZeros)
}

// copyChunk is one chunk read from the source.
type copyChunk struct {
	buf []byte
	off int64
	err error
}

// CopyGuest copies the guest view of src into dst at the same offsets,
// chunk by chunk; a reader goroutine fills the next chunk while the
// current one is written. Runs of whole clusters that are all zero cost
// no data writes (see CopyOptions.SkipZeros). It stops with an error
// wrapping ctx.Err() when ctx is cancelled, checked before each chunk.
// dst must be at least src.Size() bytes; errors from dst are returned
// wrapped, so errors.Is sees their kind.
func CopyGuest(ctx context.Context, dst GuestWriter, src GuestReader, opts CopyOptions) (CopyStats, error) {
	c := dst.Header().ClusterSize()
	size := max(CopyChunkSize/c, 1) * c
	align := opts.BufferAlign
	if align <= 0 {
		align = 4096
	}
	free := make(chan []byte, 2)
	for range 2 {
		free <- AlignedBuffer(int(size), max(align, 4096))
	}
	filled := make(chan copyChunk, 1)
	done := make(chan struct{})
	defer close(done)
	total := src.Size()
	go func() {
		defer close(filled)
		for off := int64(0); off < total; off += size {
			var buf []byte
			select {
			case buf = <-free:
			case <-done:
				return
			}
			n := min(size, total-off)
			got, err := src.ReadAt(buf[:n], off)
			if got == int(n) {
				err = nil
			} else if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			if err != nil {
				err = fmt.Errorf("reading the source at offset %d: %w", off, err)
			}
			select {
			case filled <- copyChunk{buf: buf[:n], off: off, err: err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()

	zeros := make([]byte, c)
	var st CopyStats
	for ch := range filled {
		if ch.err != nil {
			return st, ch.err
		}
		if err := ctx.Err(); err != nil {
			return st, fmt.Errorf("copy stopped at offset %d: %w", ch.off, err)
		}
		isZero := func(p int64) bool {
			end := min(p+c, int64(len(ch.buf)))
			return bytes.Equal(ch.buf[p:end], zeros[:end-p])
		}
		// Runs of whole clusters that are all zero, or not.
		for pos := int64(0); pos < int64(len(ch.buf)); {
			zero := isZero(pos)
			end := pos + c
			for end < int64(len(ch.buf)) && isZero(end) == zero {
				end += c
			}
			end = min(end, int64(len(ch.buf)))
			switch {
			case zero && opts.SkipZeros:
				st.Zero += end - pos
			case zero:
				if err := dst.WriteZeroes(ch.off+pos, end-pos); err != nil {
					return st, err
				}
				st.Zero += end - pos
			default:
				if _, err := dst.WriteAt(ch.buf[pos:end], ch.off+pos); err != nil {
					return st, err
				}
				st.Data += end - pos
			}
			pos = end
		}
		copied := ch.off + int64(len(ch.buf))
		if opts.FlushEvery > 0 && copied/opts.FlushEvery > ch.off/opts.FlushEvery {
			if err := dst.Flush(); err != nil {
				return st, err
			}
			if opts.Durable != nil {
				opts.Durable(copied)
			}
		}
		if opts.Progress != nil {
			opts.Progress(copied, total)
		}
		free <- ch.buf[:cap(ch.buf)]
	}
	return st, nil
}
