package qcow2

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// Disk is the guest-visible content of an image: what a virtual machine
// would read from the disk, through the image's whole backing chain.
// ReadAt may be called concurrently. Reads at or past Size return io.EOF.
type Disk interface {
	io.ReaderAt
	Size() int64    // virtual size in bytes
	Format() string // "raw" or "qcow2"
	Close() error   // closes the disk and everything below it in the chain
}

// MappingKind says where the guest-visible bytes of an extent come from.
type MappingKind uint8

const (
	// MapUnallocated: this image does not hold the bytes; they come from
	// the backing disk, or read as zeros without one (or past its end).
	MapUnallocated MappingKind = iota
	// MapZero: reads as zeros, whatever the backing disk holds.
	MapZero
	// MapData: stored uncompressed in this image at Mapping.HostOffset.
	MapData
	// MapCompressed: the whole cluster is stored compressed.
	MapCompressed
)

func (k MappingKind) String() string {
	switch k {
	case MapUnallocated:
		return "unallocated"
	case MapZero:
		return "zero"
	case MapData:
		return "data"
	case MapCompressed:
		return "compressed"
	}
	return fmt.Sprintf("MappingKind(%d)", uint8(k))
}

// Mapping describes the guest bytes from GuestOffset on that share one kind
// and, for MapData, lie contiguously in the image file. An extent never
// crosses the virtual size, nor a cluster boundary, with one exception: where
// an L1 entry has no L2 table, the unallocated extent reaches the end of the
// whole range that table would map.
type Mapping struct {
	Kind        MappingKind
	GuestOffset int64
	Length      int64
	// HostOffset is where the byte at GuestOffset lies in the image file:
	// for MapData the data itself; for MapZero and MapUnallocated the
	// preallocated space, or 0 when the cluster has none; for
	// MapCompressed the start of the compressed stream of the whole cluster.
	HostOffset int64
	// CompressedLength (MapCompressed only) is the length of the area the
	// descriptor gives for the stream, cut at the end of the image file.
	CompressedLength int64
}

// Image reads the guest-visible content of a qcow2 image. It implements Disk.
type Image struct {
	r           io.ReaderAt
	header      *Header
	backing     Disk
	closer      io.Closer // the image file when OpenChain opened it
	l1          []uint64
	l2          *l2Cache
	clusterBits uint32
	clusterSize int64
	subBits     uint32 // log2 of the subcluster size (extended L2 only)
	size        int64
	imageSize   int64

	lastMu         sync.Mutex // guards the one-cluster decompression cache
	lastCompressed int64      // host offset of lastCluster's stream; 0 = none
	lastCluster    []byte

	closeOnce sync.Once
	closeErr  error
}

// ImageOption adjusts OpenImage.
type ImageOption func(*imageOptions)

type imageOptions struct {
	withoutBacking bool
	l2CacheBytes   int64
}

// WithoutBacking reads the image alone, for inspection: clusters it does
// not hold read as zeros even if its header names a backing file. Without
// this option OpenImage refuses an image whose header names a backing file
// when no backing disk is given.
func WithoutBacking() ImageOption { return func(o *imageOptions) { o.withoutBacking = true } }

// WithL2CacheSize bounds the L2 table cache, in bytes. Values are clamped to
// at most MaxL2CacheBytes; the cache always holds at least one table.
func WithL2CacheSize(bytes int64) ImageOption {
	return func(o *imageOptions) { o.l2CacheBytes = bytes }
}

// Table entry bits (qcow2.txt, "Cluster mapping").
const (
	l1ReservedMask  = 0x7f00_0000_0000_01ff // bits 0-8 and 56-62
	tableOffsetMask = 0x00ff_ffff_ffff_fe00 // bits 9-55, L1 and standard L2 entries
	l2Copied        = 1 << 63
	l2Compressed    = 1 << 62
	l2ZeroFlag      = 1 << 0                // v3 without extended L2 only
	l2ReservedMask  = 0x3f00_0000_0000_01fe // bits 1-8 and 56-61 of standard descriptors
	maxHostOffset   = 1 << 56
	subclusters     = 32 // per cluster with extended L2 entries
)

// OpenImage parses and validates the qcow2 header of the image r of
// imageSize bytes and returns a reader of its guest-visible content.
//
// Results, case by case:
//   - a header that breaks any rule: nil and the *ValidationError;
//   - the header names a backing file and backing is nil (without
//     WithoutBacking), or backing is given and the header names none: an error;
//   - backing's format differs from the one the header records: a
//     *FieldError wrapping ErrFormat;
//   - an I/O error reading the header or the L1 table: that error.
//
// On success the Image owns backing (Close closes it) but never closes r.
// Table entries are validated when a read first uses them; a bad one makes
// that read fail with a *FieldError wrapping ErrCorrupt.
func OpenImage(r io.ReaderAt, imageSize int64, backing Disk, opts ...ImageOption) (*Image, error) {
	h, err := ReadHeader(r, imageSize)
	if err != nil {
		return nil, err
	}
	return newImage(r, h, backing, opts...)
}

// newImage builds an Image from a header ReadHeader accepted.
func newImage(r io.ReaderAt, h *Header, backing Disk, opts ...ImageOption) (*Image, error) {
	o := imageOptions{l2CacheBytes: DefaultL2CacheBytes}
	for _, opt := range opts {
		opt(&o)
	}
	switch {
	case o.withoutBacking && backing != nil:
		return nil, errors.New("qcow2: WithoutBacking given together with a backing disk")
	case o.withoutBacking:
	case h.HasBacking() && backing == nil:
		return nil, fmt.Errorf("qcow2: the image names backing file %q (format %s) but no backing disk was given; open the chain, or read the image alone with WithoutBacking", h.BackingFile, h.BackingFormat)
	case !h.HasBacking() && backing != nil:
		return nil, errors.New("qcow2: a backing disk was given but the image names no backing file")
	case backing != nil && backing.Format() != h.BackingFormat:
		return nil, fieldErr(ErrFormat, "backing_format", h.BackingFormat, "the backing disk given is %s", backing.Format())
	}

	img := &Image{
		r:           r,
		header:      h,
		backing:     backing,
		clusterBits: h.ClusterBits,
		clusterSize: h.ClusterSize(),
		size:        int64(h.Size), // ReadHeader refused sizes above MaxInt64
		imageSize:   h.ImageSize,
	}
	if h.ExtendedL2() {
		img.subBits = h.ClusterBits - 5 // 32 subclusters per cluster
	}
	img.l2 = newL2Cache(min(max(o.l2CacheBytes, img.clusterSize), MaxL2CacheBytes))

	// Only the entries the virtual size needs; ReadHeader checked that
	// l1_size covers them, that the table lies in the image and is at most
	// maxL1Bytes, so this allocation is bounded by both.
	n := h.requiredL1Entries()
	if n > 0 {
		raw := make([]byte, n*8)
		if err := readFull(r, raw, int64(h.L1TableOffset)); err != nil {
			return nil, fmt.Errorf("reading the L1 table at %d: %w", h.L1TableOffset, err)
		}
		img.l1 = make([]uint64, n)
		for i := range img.l1 {
			img.l1[i] = beUint64(raw[i*8:])
		}
	}
	return img, nil
}

// Header returns the validated header. Callers must not modify it.
func (img *Image) Header() *Header { return img.header }

// Backing returns the backing disk, or nil.
func (img *Image) Backing() Disk { return img.backing }

// Size is the virtual size in bytes.
func (img *Image) Size() int64 { return img.size }

// Format is "qcow2".
func (img *Image) Format() string { return "qcow2" }

// Close closes the backing disk and, when OpenChain opened this image, its
// file. It is safe to call more than once.
func (img *Image) Close() error {
	img.closeOnce.Do(func() {
		var errs []error
		if img.backing != nil {
			errs = append(errs, img.backing.Close())
		}
		if img.closer != nil {
			errs = append(errs, img.closer.Close())
		}
		img.closeErr = errors.Join(errs...)
	})
	return img.closeErr
}

// Map reports how the guest byte at guestOff is stored in this image (not
// in its backing disk), and how far that extent reaches within its cluster.
// A table entry that breaks the specification yields a *FieldError wrapping
// ErrCorrupt that names the guest offset and the entry.
func (img *Image) Map(guestOff int64) (Mapping, error) {
	if guestOff < 0 || guestOff >= img.size {
		return Mapping{}, fmt.Errorf("qcow2: guest offset %d outside the virtual disk of %d bytes", guestOff, img.size)
	}
	return img.mapAt(guestOff)
}

func corruptEntry(table string, guestOff int64, entry uint64, format string, args ...any) *FieldError {
	return fieldErr(ErrCorrupt, fmt.Sprintf("%s for guest offset %d", table, guestOff),
		fmt.Sprintf("%#016x", entry), format, args...)
}

func (img *Image) mapAt(guestOff int64) (Mapping, error) {
	clusterIndex := uint64(guestOff) >> img.clusterBits
	l2Entries := uint64(img.clusterSize / img.header.L2EntrySize())
	l1Index, l2Index := clusterIndex/l2Entries, clusterIndex%l2Entries
	inCluster := guestOff & (img.clusterSize - 1)
	clusterStart := guestOff - inCluster
	clusterEnd := min(clusterStart+img.clusterSize, img.size)
	unallocated := Mapping{Kind: MapUnallocated, GuestOffset: guestOff, Length: clusterEnd - guestOff}

	l1e := img.l1[l1Index] // guestOff < size, so l1Index < requiredL1Entries
	if l1e&l1ReservedMask != 0 {
		return Mapping{}, corruptEntry("L1 entry", guestOff, l1e, "reserved bits %#x are set", l1e&l1ReservedMask)
	}
	l2Offset := int64(l1e & tableOffsetMask)
	if l2Offset == 0 {
		if l1e != 0 {
			return Mapping{}, corruptEntry("L1 entry", guestOff, l1e, "flags set on an entry without an L2 table")
		}
		l2RangeEnd := int64((l1Index+1)*l2Entries) << img.clusterBits
		if l2RangeEnd <= 0 || l2RangeEnd > img.size { // <= 0: overflow at the top of the int64 range
			l2RangeEnd = img.size
		}
		unallocated.Length = l2RangeEnd - guestOff
		return unallocated, nil
	}
	switch {
	case l2Offset%img.clusterSize != 0:
		return Mapping{}, corruptEntry("L1 entry", guestOff, l1e, "L2 table offset %d is not aligned to the cluster size %d", l2Offset, img.clusterSize)
	case l2Offset > img.imageSize-img.clusterSize:
		return Mapping{}, corruptEntry("L1 entry", guestOff, l1e, "L2 table at %d ends past the end of the image (%d bytes)", l2Offset, img.imageSize)
	}
	table, err := img.l2Table(l2Offset)
	if err != nil {
		return Mapping{}, err
	}
	if !img.header.ExtendedL2() {
		entry := beUint64(table[l2Index*8:])
		return img.mapStandard(guestOff, inCluster, clusterEnd, entry)
	}
	entry, bitmap := beUint64(table[l2Index*16:]), beUint64(table[l2Index*16+8:])
	return img.mapExtended(guestOff, inCluster, clusterEnd, entry, bitmap)
}

func (img *Image) l2Table(offset int64) ([]byte, error) {
	if t, ok := img.l2.get(offset); ok {
		return t, nil
	}
	t := make([]byte, img.clusterSize)
	if err := readFull(img.r, t, offset); err != nil {
		return nil, fmt.Errorf("reading the L2 table at %d: %w", offset, err)
	}
	img.l2.put(offset, t)
	return t, nil
}

// mapCompressed validates a compressed cluster descriptor: the stream must
// start after the header cluster and inside the image, and its last sector
// must start inside the image (qemu writes the stream's exact length, so
// the image may end inside that sector).
func (img *Image) mapCompressed(guestOff, clusterEnd int64, entry uint64) (Mapping, error) {
	if entry&l2Copied != 0 {
		return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "a compressed cluster has the COPIED flag set")
	}
	host, area := compressedDescriptor(entry, img.clusterBits)
	switch {
	case host >= maxHostOffset:
		return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "compressed data offset %d has reserved bits above bit 55 set", host)
	case host < uint64(img.clusterSize):
		return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "compressed data at %d lies in the header cluster", host)
	case host >= uint64(img.imageSize):
		return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "compressed data at %d starts past the end of the image (%d bytes)", host, img.imageSize)
	case host+area-compressedSectorSize >= uint64(img.imageSize):
		return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "compressed data of up to %d bytes at %d runs past the end of the image (%d bytes)", area, host, img.imageSize)
	}
	return Mapping{
		Kind:             MapCompressed,
		GuestOffset:      guestOff,
		Length:           clusterEnd - guestOff,
		HostOffset:       int64(host),
		CompressedLength: min(int64(host+area), img.imageSize) - int64(host),
	}, nil
}

// checkHostCluster validates the host cluster offset of a standard entry.
func (img *Image) checkHostCluster(guestOff int64, entry uint64, host int64) error {
	switch {
	case host%img.clusterSize != 0:
		return corruptEntry("L2 entry", guestOff, entry, "host cluster offset %d is not aligned to the cluster size %d", host, img.clusterSize)
	case host < img.clusterSize:
		return corruptEntry("L2 entry", guestOff, entry, "host cluster offset %d lies in the header cluster", host)
	case host >= img.imageSize:
		return corruptEntry("L2 entry", guestOff, entry, "host cluster offset %d is past the end of the image (%d bytes)", host, img.imageSize)
	}
	return nil
}

// checkDataExtent requires the host bytes of a data extent to exist.
func (img *Image) checkDataExtent(guestOff int64, entry uint64, hostEnd int64) error {
	if hostEnd > img.imageSize {
		return corruptEntry("L2 entry", guestOff, entry, "data ends at host offset %d, past the end of the image (%d bytes)", hostEnd, img.imageSize)
	}
	return nil
}

func (img *Image) mapStandard(guestOff, inCluster, clusterEnd int64, entry uint64) (Mapping, error) {
	if entry&l2Compressed != 0 {
		return img.mapCompressed(guestOff, clusterEnd, entry)
	}
	if entry&l2ReservedMask != 0 {
		return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "reserved bits %#x are set", entry&l2ReservedMask)
	}
	zero := entry&l2ZeroFlag != 0
	if zero && img.header.Version < 3 {
		return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "bit 0 is reserved in version 2 images (zero clusters need version 3)")
	}
	host := int64(entry & tableOffsetMask)
	m := Mapping{GuestOffset: guestOff, Length: clusterEnd - guestOff}
	if host == 0 {
		if entry&l2Copied != 0 {
			return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "COPIED flag without a host cluster (host offset 0 is only valid with an external data file)")
		}
		m.Kind = MapUnallocated
		if zero {
			m.Kind = MapZero
		}
		return m, nil
	}
	if err := img.checkHostCluster(guestOff, entry, host); err != nil {
		return Mapping{}, err
	}
	m.HostOffset = host + inCluster
	if zero {
		m.Kind = MapZero
		return m, nil
	}
	m.Kind = MapData
	if err := img.checkDataExtent(guestOff, entry, host+clusterEnd-(guestOff-inCluster)); err != nil {
		return Mapping{}, err
	}
	return m, nil
}

func (img *Image) mapExtended(guestOff, inCluster, clusterEnd int64, entry, bitmap uint64) (Mapping, error) {
	if entry&l2Compressed != 0 {
		if bitmap != 0 {
			return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "compressed cluster with a non-zero subcluster bitmap %#016x", bitmap)
		}
		return img.mapCompressed(guestOff, clusterEnd, entry)
	}
	if reserved := entry & (l2ReservedMask | l2ZeroFlag); reserved != 0 {
		return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "reserved bits %#x are set (bit 0 is reserved with extended L2 entries)", reserved)
	}
	allocated, zeroes := uint32(bitmap), uint32(bitmap>>32)
	if both := allocated & zeroes; both != 0 {
		return Mapping{}, corruptEntry("L2 bitmap", guestOff, bitmap, "subclusters %#08x are marked both allocated and zero", both)
	}
	host := int64(entry & tableOffsetMask)
	if host == 0 {
		if entry&l2Copied != 0 {
			return Mapping{}, corruptEntry("L2 entry", guestOff, entry, "COPIED flag without a host cluster (host offset 0 is only valid with an external data file)")
		}
		if allocated != 0 {
			return Mapping{}, corruptEntry("L2 bitmap", guestOff, bitmap, "subclusters %#08x allocated in a cluster without a host offset", allocated)
		}
	} else if err := img.checkHostCluster(guestOff, entry, host); err != nil {
		return Mapping{}, err
	}

	kindOf := func(sub int64) MappingKind {
		switch {
		case zeroes&(1<<sub) != 0:
			return MapZero
		case allocated&(1<<sub) != 0:
			return MapData
		}
		return MapUnallocated
	}
	clusterStart := guestOff - inCluster
	first := inCluster >> img.subBits
	kind := kindOf(first)
	next := first + 1
	for next < subclusters && kindOf(next) == kind {
		next++
	}
	end := min(clusterStart+next<<img.subBits, clusterEnd)
	m := Mapping{Kind: kind, GuestOffset: guestOff, Length: end - guestOff}
	if host != 0 {
		m.HostOffset = host + inCluster
	}
	if kind == MapData {
		if err := img.checkDataExtent(guestOff, entry, host+end-clusterStart); err != nil {
			return Mapping{}, err
		}
	}
	return m, nil
}

// ReadAt reads guest-visible bytes. Contiguous data runs are read with one
// ReadAt on the image; unallocated runs with one ReadAt on the backing disk.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("qcow2: negative read offset %d", off)
	}
	if off >= img.size {
		return 0, io.EOF
	}
	want := p
	if int64(len(p)) > img.size-off {
		want = p[:img.size-off]
	}
	if err := img.read(want, off); err != nil {
		return 0, err
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

// pendingRun is a run of extents of one kind waiting to be read at once.
type pendingRun struct {
	kind  MappingKind
	start int // index into the read buffer
	n     int
	host  int64
}

func (img *Image) read(p []byte, off int64) error {
	var run pendingRun
	flush := func() error {
		if run.n == 0 {
			return nil
		}
		buf := p[run.start : run.start+run.n]
		guest := off + int64(run.start)
		run.n = 0
		switch run.kind {
		case MapData:
			if err := readFull(img.r, buf, run.host); err != nil {
				return fmt.Errorf("reading guest offset %d from host offset %d: %w", guest, run.host, err)
			}
		case MapZero:
			clear(buf)
		case MapUnallocated:
			return img.readBacking(buf, guest)
		}
		return nil
	}

	for pos := 0; pos < len(p); {
		m, err := img.mapAt(off + int64(pos))
		if err != nil {
			return err
		}
		n := int(min(m.Length, int64(len(p)-pos)))
		switch {
		case m.Kind == MapCompressed:
			if err := flush(); err != nil {
				return err
			}
			if err := img.readCompressed(p[pos:pos+n], m); err != nil {
				return err
			}
		case run.n > 0 && run.kind == m.Kind && (m.Kind != MapData || run.host+int64(run.n) == m.HostOffset):
			run.n += n
		default:
			if err := flush(); err != nil {
				return err
			}
			run = pendingRun{kind: m.Kind, start: pos, n: n, host: m.HostOffset}
		}
		pos += n
	}
	return flush()
}

// readBacking fills buf with the backing disk's bytes at guest; bytes past
// the backing disk's end (or all of them, without one) read as zeros.
func (img *Image) readBacking(buf []byte, guest int64) error {
	if img.backing == nil || guest >= img.backing.Size() {
		clear(buf)
		return nil
	}
	n := int(min(int64(len(buf)), img.backing.Size()-guest))
	got, err := img.backing.ReadAt(buf[:n], guest)
	if got < n {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("reading guest offset %d from the backing disk: %w", guest, err)
	}
	clear(buf[n:])
	return nil
}

// readCompressed copies the part of a compressed cluster that m covers.
func (img *Image) readCompressed(dst []byte, m Mapping) error {
	cluster, err := img.decompressed(m)
	if err != nil {
		return err
	}
	copy(dst, cluster[m.GuestOffset&(img.clusterSize-1):])
	return nil
}

// decompressed returns the whole decompressed cluster of m. The last one is
// kept, so reading a compressed cluster in small pieces decodes it once.
// Returned slices are never modified afterwards.
func (img *Image) decompressed(m Mapping) ([]byte, error) {
	img.lastMu.Lock()
	if img.lastCompressed == m.HostOffset && img.lastCluster != nil {
		c := img.lastCluster
		img.lastMu.Unlock()
		return c, nil
	}
	img.lastMu.Unlock()

	// CompressedLength is at most two clusters plus a sector (the sector
	// count field has cluster_bits-8 bits) and lies inside the image.
	src := make([]byte, m.CompressedLength)
	if err := readFull(img.r, src, m.HostOffset); err != nil {
		return nil, fmt.Errorf("reading compressed cluster for guest offset %d at host offset %d: %w", m.GuestOffset, m.HostOffset, err)
	}
	cluster := make([]byte, img.clusterSize)
	if err := decompressCluster(img.header.CompressionType, src, cluster); err != nil {
		if errors.Is(err, errDecompress) {
			return nil, fieldErr(ErrCorrupt, fmt.Sprintf("compressed cluster for guest offset %d", m.GuestOffset),
				fmt.Sprintf("%s stream of up to %d bytes at host offset %d", img.header.CompressionName(), len(src), m.HostOffset), "%s", err.Error())
		}
		return nil, err
	}
	img.lastMu.Lock()
	img.lastCompressed, img.lastCluster = m.HostOffset, cluster
	img.lastMu.Unlock()
	return cluster, nil
}
