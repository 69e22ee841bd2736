package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Resize grows the virtual size of the qcow2 image on dev (imageSize bytes
// now; opts as OpenWriter's, without Backing: no guest data is read) to
// newSize, a multiple of 512. Shrinking is refused: it would drop guest
// data. When the new size needs more L1 entries than l1_size, the L1
// table grows in place if its last cluster has room (the entries past
// l1_size must be zero), or else moves: a new table is allocated through
// the refcounts, written and flushed, the header switched to it in one
// write (size, l1_size and l1_table_offset lie in one sector), and the old
// table's clusters freed. At every instant the device holds a consistent
// image: the old one, or the resized one with at worst a leaked cluster.
//
// Errors: OpenWriter's refusals (internal snapshots, the dirty bit, a
// header that breaks a rule); a *FieldError wrapping ErrTooLarge when the
// L1 table would exceed qemu's limit; ErrNoSpace when the container has no
// room for the new table; an I/O error.
func Resize(dev Device, imageSize int64, opts WriterOptions, newSize int64) error {
	if opts.Backing != nil {
		return errors.New("qcow2: Resize reads no guest data; give no backing disk")
	}
	w, err := openWriter(dev, imageSize, opts, WithoutBacking())
	if err != nil {
		return err
	}
	err = w.resize(newSize)
	end := max(imageSize, w.HighestAllocated())
	if err = errors.Join(err, w.Close()); err != nil {
		return err
	}
	// Judge what is on the device now, as any later reader will.
	if _, err := ReadHeader(alignedReader{w.io}, end); err != nil {
		return fmt.Errorf("qcow2: the resized header is refused: %w", err)
	}
	return nil
}

func (w *Writer) resize(newSize int64) error {
	if err := w.usable(); err != nil {
		return err
	}
	switch {
	case newSize%512 != 0 || newSize <= 0:
		return fmt.Errorf("qcow2: virtual size %d: want a positive multiple of 512", newSize)
	case newSize < w.size:
		return fmt.Errorf("qcow2: virtual size %d is smaller than the current %d: only growing is supported", newSize, w.size)
	case newSize == w.size:
		return nil
	}
	perEntry := w.h.L2Entries() * w.c
	needed := ceilDiv(newSize, perEntry)
	if needed*8 > maxL1Bytes {
		return fieldErr(ErrTooLarge, "size", newSize, "needs %d L1 entries (%d bytes); qemu allows at most %d bytes of L1 table", needed, needed*8, maxL1Bytes)
	}
	if err := w.prepare(); err != nil {
		return w.fail(err)
	}
	// The L1 table on the device must be current before it is copied or
	// extended.
	if err := w.flushMetadata(); err != nil {
		return w.fail(err)
	}
	oldEntries := int64(w.h.L1Size)
	l1Size, l1Offset := oldEntries, w.l1Offset
	oldOffset, oldClusters := w.l1Offset, int64(len(w.l1))/w.c
	moved := false
	switch {
	case needed <= oldEntries:
	case needed*8 <= int64(len(w.l1)) && oldEntries > 0:
		// The entries past l1_size become live: they must be empty.
		for _, b := range w.l1[oldEntries*8 : needed*8] {
			if b != 0 {
				return fieldErr(ErrInvalidHeader, "l1_size", oldEntries, "the L1 table has non-zero bytes past its %d entries; run qemu-img check -r all", oldEntries)
			}
		}
		l1Size = needed
	default:
		n := ceilDiv(needed*8, w.c)
		off, err := w.refs.allocate(n)
		if err != nil {
			return w.fail(err)
		}
		buf := alignedBuffer(int(n*w.c), int(w.io.bs))
		copy(buf, w.l1[:oldEntries*8])
		if err := w.io.writeAt(buf, off); err != nil {
			return w.fail(fmt.Errorf("writing the new L1 table at %d: %w", off, err))
		}
		// The new table is durable before the header names it.
		if err := w.io.barrier(); err != nil {
			return w.fail(err)
		}
		w.l1, w.l1Offset = buf, off
		l1Size, l1Offset, moved = needed, off, true
	}
	// size, crypt_method, l1_size and l1_table_offset: 24 bytes in the
	// first sector, written at once, so the switch is atomic.
	var p [offL1TableOffset + 8 - offSize]byte
	binary.BigEndian.PutUint64(p[:], uint64(newSize))
	binary.BigEndian.PutUint32(p[offCryptMethod-offSize:], w.h.CryptMethod)
	binary.BigEndian.PutUint32(p[offL1Size-offSize:], uint32(l1Size))
	binary.BigEndian.PutUint64(p[offL1TableOffset-offSize:], uint64(l1Offset))
	if err := w.writeHeader(p[:], offSize); err != nil {
		return w.fail(err)
	}
	w.h.Size, w.h.L1Size, w.h.L1TableOffset, w.size = uint64(newSize), uint32(l1Size), uint64(l1Offset), newSize
	if moved && oldClusters > 0 && oldOffset > 0 {
		// Nothing references the old table any more.
		if err := w.refs.adjust(oldOffset>>w.cbits, oldClusters, -1); err != nil {
			return w.fail(err)
		}
	}
	return nil
}
