package qcow2

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// compressedSectorSize is the unit of the sector count in a compressed
// cluster descriptor.
const compressedSectorSize = 512

// errDecompress marks a compressed stream that does not decode to exactly
// one cluster; the caller turns it into an ErrCorrupt FieldError naming the
// guest offset.
var errDecompress = errors.New("compressed cluster does not decode to exactly one cluster")

// decompressCluster decodes one compressed cluster from src into dst, whose
// length is the cluster size. It fails unless the stream yields exactly
// len(dst) bytes; output never exceeds len(dst) bytes plus a small constant.
func decompressCluster(compressionType uint8, src, dst []byte) error {
	switch compressionType {
	case CompressionZlib:
		return inflateCluster(src, dst)
	case CompressionZstd:
		return zstdCluster(src, dst)
	}
	return fmt.Errorf("%w: unknown compression type %d", errDecompress, compressionType)
}

var flateReaders sync.Pool // of io.ReadCloser implementing flate.Resetter

// inflateCluster decodes a raw deflate stream (qcow2's "zlib" clusters carry
// no zlib header). The compressed area ends on a sector boundary, so bytes
// after the end of the stream are expected and ignored; the stream itself
// must end exactly at the cluster size.
func inflateCluster(src, dst []byte) error {
	in := bytes.NewReader(src)
	var r io.ReadCloser
	if pooled, ok := flateReaders.Get().(io.ReadCloser); ok {
		if err := pooled.(flate.Resetter).Reset(in, nil); err != nil {
			return fmt.Errorf("%w: %w", errDecompress, err)
		}
		r = pooled
	} else {
		r = flate.NewReader(in)
	}
	defer flateReaders.Put(r)

	if _, err := io.ReadFull(r, dst); err != nil {
		return fmt.Errorf("%w: deflate stream ends early: %w", errDecompress, err)
	}
	var extra [1]byte
	for range 4 { // a Reader may return (0, nil); do not spin forever on one
		n, err := r.Read(extra[:])
		if n > 0 {
			return fmt.Errorf("%w: deflate stream continues past the cluster size %d", errDecompress, len(dst))
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: deflate stream not terminated after %d bytes: %w", errDecompress, len(dst), err)
		}
	}
	return fmt.Errorf("%w: deflate stream makes no progress", errDecompress)
}

var (
	zstdDecoderOnce sync.Once
	zstdDecoder     *zstd.Decoder
	zstdDecoderErr  error
)

// sharedZstdDecoder returns a decoder for DecodeAll, which is safe for
// concurrent use. Its window and output are bounded to the largest cluster,
// so no frame header can make it allocate more.
func sharedZstdDecoder() (*zstd.Decoder, error) {
	zstdDecoderOnce.Do(func() {
		zstdDecoder, zstdDecoderErr = zstd.NewReader(nil,
			zstd.WithDecoderMaxMemory(1<<MaxClusterBits),
			zstd.WithDecoderMaxWindow(1<<MaxClusterBits),
			zstd.WithDecodeAllCapLimit(true),
			zstd.WithDecoderConcurrency(0),
		)
	})
	return zstdDecoder, zstdDecoderErr
}

// zstdCluster decodes zstd frames from src until dst is full, as qemu does:
// the cluster may span several frames, each must be complete, and the
// frame that fills the cluster must end exactly there. Bytes after that
// frame belong to the sector padding (or to the next compressed cluster,
// which qemu packs right behind) and are not looked at.
func zstdCluster(src, dst []byte) error {
	dec, err := sharedZstdDecoder()
	if err != nil {
		return err
	}
	out := dst[:0:len(dst)] // capped, so DecodeAll cannot write past the cluster
	for len(out) < len(dst) {
		frameLen, skippable, err := zstdFrameLength(src)
		if err != nil {
			return fmt.Errorf("%w: zstd stream after %d output bytes: %w", errDecompress, len(out), err)
		}
		frame := src[:frameLen]
		src = src[frameLen:]
		if skippable {
			continue
		}
		// The cap limit makes DecodeAll refuse to produce more than the
		// rest of the cluster; out shares dst's array.
		got, err := dec.DecodeAll(frame, out)
		if err != nil {
			return fmt.Errorf("%w: zstd frame after %d output bytes: %w", errDecompress, len(out), err)
		}
		if len(got) > len(dst) || (len(got) > 0 && &got[0] != &dst[0]) {
			return fmt.Errorf("%w: zstd output escaped the cluster buffer", errDecompress)
		}
		out = got
	}
	return nil
}

// zstdFrameLength returns the length of the zstd frame at the start of src
// by walking its block headers (RFC 8878 section 3.1), without decoding.
func zstdFrameLength(src []byte) (n int, skippable bool, err error) {
	var h zstd.Header
	if err := h.Decode(src); err != nil {
		return 0, false, fmt.Errorf("frame header: %w", err)
	}
	if h.Skippable {
		n := int64(h.HeaderSize) + int64(h.SkippableSize)
		if n > int64(len(src)) {
			return 0, false, io.ErrUnexpectedEOF
		}
		return int(n), true, nil
	}
	off := h.HeaderSize
	for {
		if len(src)-off < 3 {
			return 0, false, io.ErrUnexpectedEOF
		}
		bh := uint32(src[off]) | uint32(src[off+1])<<8 | uint32(src[off+2])<<16
		off += 3
		last := bh&1 != 0
		size := int(bh >> 3)
		switch (bh >> 1) & 3 {
		case 0, 2: // raw, compressed: size bytes follow
		case 1: // RLE: one byte repeated size times
			size = 1
		default:
			return 0, false, errors.New("reserved block type")
		}
		if size > len(src)-off {
			return 0, false, io.ErrUnexpectedEOF
		}
		off += size
		if last {
			break
		}
	}
	if h.HasCheckSum {
		if len(src)-off < 4 {
			return 0, false, io.ErrUnexpectedEOF
		}
		off += 4
	}
	return off, false, nil
}

// compressedDescriptor splits a compressed cluster descriptor (L2 entry
// bits 0-61) into the host offset of the data and the length of the
// sector-granular area holding it, as qcow2.txt defines: with
// x = 62 - (cluster_bits - 8), bits 0..x-1 are the host offset and bits
// x..61 the number of additional 512-byte sectors.
func compressedDescriptor(entry uint64, clusterBits uint32) (hostOffset, areaLength uint64) {
	x := 62 - (clusterBits - 8)
	descriptor := entry & (1<<62 - 1)
	hostOffset = descriptor & (1<<x - 1)
	extraSectors := descriptor >> x
	areaLength = (extraSectors+1)*compressedSectorSize - hostOffset%compressedSectorSize
	return hostOffset, areaLength
}

// beUint64 reads a big-endian uint64; L1 and L2 tables are big-endian.
func beUint64(b []byte) uint64 { return binary.BigEndian.Uint64(b) }
