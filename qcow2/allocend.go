package qcow2

import (
	"encoding/binary"
	"fmt"
	"io"
)

// AllocationEnd reads the header of the qcow2 image r of imageSize bytes
// and, from its refcount structures alone, the end of the highest host
// cluster with a non-zero refcount: what Check reports as ImageEndOffset
// for a clean image (the end is capped at the image's last cluster). It
// reads the header, the refcount table and the refcount blocks from the
// last one that counts anything down to the one that holds the highest
// count: usually two reads beside the header, whatever the image's size,
// where Check reads every table. It does not find corruption in the L1
// and L2 tables (run Check for that); a refcount table entry it has to
// follow that is invalid is a *FieldError wrapping ErrCorrupt. A header
// ReadHeader refuses is its error with a nil Header; errors after it come
// with the Header.
func AllocationEnd(r io.ReaderAt, imageSize int64) (*Header, int64, error) {
	h, err := ReadHeader(r, imageSize)
	if err != nil {
		return nil, 0, err
	}
	cs := h.ClusterSize()
	cb := h.ClusterBits
	imageClusters := (imageSize + cs - 1) >> cb
	// ReadHeader bounded the table to qemu's 8 MiB and to the image.
	tableBytes := int64(h.RefcountTableClusters) << cb
	tableOff := int64(h.RefcountTableOffset)
	tableBytes = min(tableBytes, imageSize-tableOff)
	table := make([]byte, tableBytes/8*8)
	if err := readFull(r, table, tableOff); err != nil {
		return h, 0, fmt.Errorf("reading the refcount table (%d bytes at %d): %w", len(table), tableOff, err)
	}
	perBlock := int64(1) << (cb + 3 - h.RefcountOrder)
	block := make([]byte, cs)
	for k := int64(len(table)/8) - 1; k >= 0; k-- {
		e := binary.BigEndian.Uint64(table[k*8:])
		if e == 0 {
			continue
		}
		off := int64(e & reftOffsetMask)
		bad := func(format string, args ...any) error {
			return fieldErr(ErrCorrupt, fmt.Sprintf("refcount table entry %d", k), fmt.Sprintf("%#016x", e), format, args...)
		}
		switch {
		case e&reftReservedMask != 0:
			return h, 0, bad("reserved bits %#x are set", e&reftReservedMask)
		case off%cs != 0:
			return h, 0, bad("refcount block offset %d is not aligned to the cluster size %d", off, cs)
		case off < cs:
			return h, 0, bad("refcount block at %d lies in the header cluster", off)
		case off > imageSize-cs:
			return h, 0, bad("refcount block at %d ends past the end of the image (%d bytes)", off, imageSize)
		}
		first := k * perBlock
		if first >= imageClusters {
			// Counts of clusters past the image's end: Check does not
			// compare them either.
			continue
		}
		if err := readFull(r, block, off); err != nil {
			return h, 0, fmt.Errorf("reading refcount block %d at %d: %w", k, off, err)
		}
		for i := min(perBlock, imageClusters-first) - 1; i >= 0; i-- {
			if refcountAt(block, uint64(i), h.RefcountOrder) != 0 {
				return h, (first + i + 1) << cb, nil
			}
		}
	}
	// Nothing counted at all: Check's end is the header cluster.
	return h, cs, nil
}
