package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"unsafe"
)

// Errors Create returns for options or targets it cannot use. They are usage
// errors, not verdicts on an image: IsRefusal is false for them. (An unsafe
// backing name is the exception: it comes back as a *ValidationError.)
var (
	// ErrTargetTooSmall: the image metadata does not fit in the target.
	ErrTargetTooSmall = errors.New("target too small for the qcow2 metadata")
	// ErrCreateOption: a CreateOptions field is out of range.
	ErrCreateOption = errors.New("invalid create option")
)

// Defaults and limits for Create.
const (
	DefaultClusterSize = 64 << 10
	DefaultBlockSize   = 512
	maxBlockSize       = 64 << 10 // larger logical blocks do not exist
	createRefcountBits = 16       // refcount_order 4, qemu's default
	createRefcountOrd  = 4
)

// CreateOptions describe the image Create writes.
type CreateOptions struct {
	// VirtualSize is the disk size the guest sees, in bytes: > 0 and a
	// multiple of 512 (qemu's rule).
	VirtualSize int64
	// ClusterSize is a power of two from 512 B to 2 MiB; 0 means 64 KiB.
	ClusterSize int
	// BackingFile is the name recorded in the image ("" for no backing). It
	// must pass ValidateBackingName.
	BackingFile string
	// BackingFormat is "raw" or "qcow2", required with BackingFile. It is
	// recorded in the backing format extension so no tool ever probes.
	BackingFormat string
	// BlockSize is the target's logical block size: every write's offset and
	// length is a multiple of it (O_DIRECT needs that). 0 means 512.
	BlockSize int
	// TargetZeroed says the target already reads zeros where the metadata
	// goes (a new sparse file, or a device over one): only the blocks of
	// the metadata that hold a non-zero byte are written, the all-zero
	// ones (most of the refcount table and blocks, the L1 table) are
	// skipped. The result reads the same as a full write. Never set it
	// for a target that may hold old data (an LV, a reused device): the
	// skipped blocks would keep it.
	TargetZeroed bool
}

// CreateLayout is where Create puts the metadata. All offsets are in bytes
// from the start of the target, and cluster aligned.
type CreateLayout struct {
	ClusterSize           int64
	VirtualSize           int64
	HeaderLength          int   // the fixed header, 112 bytes as qemu writes it
	FeatureTable          bool  // false when it does not fit in a 512 B header cluster (qemu skips it too)
	RefcountTableOffset   int64 // right after the header cluster
	RefcountTableClusters int64
	RefcountBlockOffset   int64 // the first of RefcountBlocks consecutive blocks
	RefcountBlocks        int64
	L1TableOffset         int64
	L1Entries             int64
	L1Clusters            int64
	MetadataClusters      int64 // header + refcount table + refcount blocks + L1
	// WriteSize is the metadata rounded up to the block size: the one write
	// Create makes starts at 0 and has this length.
	WriteSize int64
	// CoveredSize is how many bytes of the target the refcount table can
	// describe without growing: the target size (for a file, the size it may
	// grow to), capped by qemu's refcount table limit.
	CoveredSize int64
}

// qemu's feature name table, written like qemu 7.2 writes it so that tools
// can name a bit they see set.
var createFeatureNames = []FeatureName{
	{Type: 0, Bit: 0, Name: "dirty bit"},
	{Type: 0, Bit: 1, Name: "corrupt bit"},
	{Type: 0, Bit: 2, Name: "external data file"},
	{Type: 0, Bit: 3, Name: "compression type"},
	{Type: 0, Bit: 4, Name: "extended L2 entries"},
	{Type: 1, Bit: 0, Name: "lazy refcounts"},
	{Type: 2, Bit: 0, Name: "bitmaps"},
	{Type: 2, Bit: 1, Name: "raw external data"},
}

const featureNameEntrySize = 48

// PlanCreate checks opts and computes the layout Create would write onto a
// target of targetSize bytes, without writing anything. For a regular file
// that qemu may grow, pass the size it may grow to (see MaxImageSize).
func PlanCreate(targetSize int64, opts CreateOptions) (*CreateLayout, error) {
	opts, err := checkCreateOptions(opts)
	if err != nil {
		return nil, err
	}
	if targetSize <= 0 {
		return nil, fmt.Errorf("%w: target size = %d: must be > 0", ErrTargetTooSmall, targetSize)
	}
	c := int64(opts.ClusterSize)
	l := &CreateLayout{ClusterSize: c, VirtualSize: opts.VirtualSize, HeaderLength: v3HeaderLengthWithCmp}
	l.FeatureTable = headerClusterBytes(opts, true) <= c
	if headerClusterBytes(opts, l.FeatureTable) > c {
		return nil, fmt.Errorf("%w: cluster size = %d: the header and a backing name of %d bytes need %d bytes",
			ErrCreateOption, c, len(opts.BackingFile), headerClusterBytes(opts, false))
	}

	// L1: one entry per L2 table, each L2 table maps c/8 clusters.
	bytesPerL2 := uint64(c/8) * uint64(c)
	l1Entries := (uint64(opts.VirtualSize) + bytesPerL2 - 1) / bytesPerL2
	if l1Entries > maxL1Bytes/8 {
		return nil, fmt.Errorf("%w: virtual size = %d: needs %d L1 entries, qemu allows %d with %d-byte clusters (at most %d bytes)",
			ErrCreateOption, opts.VirtualSize, l1Entries, maxL1Bytes/8, c, uint64(maxL1Bytes/8)*bytesPerL2)
	}
	l.L1Entries = int64(l1Entries)
	l.L1Clusters = ceilDiv(l.L1Entries*8, c)

	// Refcount table: enough entries for refcount blocks covering the whole
	// target, so qemu allocates refcount blocks into existing entries instead
	// of growing the table on its first writes. qemu caps the table at 8 MiB.
	refsPerBlock := c * 8 / createRefcountBits
	clusterBytesPerBlock := refsPerBlock * c
	coveredBlocks := ceilDiv(ceilDiv(targetSize, c), refsPerBlock)
	l.RefcountTableClusters = min(max(ceilDiv(coveredBlocks*8, c), 1), maxRefcountTableBytes/c)
	l.CoveredSize = satMul(l.RefcountTableClusters*(c/8), clusterBytesPerBlock)

	// Refcount blocks cover the metadata, themselves included: iterate to a
	// fixed point (it moves at most a step or two).
	fixed := 1 + l.RefcountTableClusters + l.L1Clusters
	l.RefcountBlocks = ceilDiv(fixed, refsPerBlock)
	for ceilDiv(fixed+l.RefcountBlocks, refsPerBlock) > l.RefcountBlocks {
		l.RefcountBlocks++
	}
	l.MetadataClusters = fixed + l.RefcountBlocks
	l.RefcountTableOffset = c
	l.RefcountBlockOffset = l.RefcountTableOffset + l.RefcountTableClusters*c
	l.L1TableOffset = l.RefcountBlockOffset + l.RefcountBlocks*c
	l.WriteSize = roundUp(l.MetadataClusters*c, int64(opts.BlockSize))
	if l.WriteSize > targetSize {
		return nil, fmt.Errorf("%w: target size = %d bytes, the metadata needs %d bytes (%d clusters of %d: header, %d refcount table, %d refcount block, %d L1 table for virtual size %d)",
			ErrTargetTooSmall, targetSize, l.WriteSize, l.MetadataClusters, c,
			l.RefcountTableClusters, l.RefcountBlocks, l.L1Clusters, opts.VirtualSize)
	}
	if l.RefcountBlocks > l.RefcountTableClusters*(c/8) {
		// Unreachable while the table covers the target; kept as a guard.
		return nil, fmt.Errorf("%w: target size = %d: the metadata alone needs %d refcount blocks",
			ErrTargetTooSmall, targetSize, l.RefcountBlocks)
	}
	return l, nil
}

// MaxImageSize is an upper bound of the host size the image described by
// opts reaches when every guest cluster is allocated (data, L2 tables,
// refcount blocks, metadata). Pass it as the target size of a regular file
// qemu will grow, so the refcount table covers what the file can become.
func MaxImageSize(opts CreateOptions) (int64, error) {
	opts, err := checkCreateOptions(opts)
	if err != nil {
		return 0, err
	}
	c := int64(opts.ClusterSize)
	data := ceilDiv(opts.VirtualSize, c)
	l2 := ceilDiv(data, c/8)
	l1 := ceilDiv(ceilDiv(data, c/8)*8, c)
	n := 1 + data + l2 + l1
	refsPerBlock := c * 8 / createRefcountBits
	blocks := ceilDiv(n, refsPerBlock) + 1
	table := ceilDiv(blocks*8, c) + 1
	blocks += ceilDiv(table, refsPerBlock)
	return satMul(n+blocks+table, c), nil
}

// Create writes a new qcow2 v3 image onto w, a target of targetSize bytes
// (a block device, or a file; see PlanCreate for files). It writes every
// metadata cluster in full, zeros included, with one WriteAt at offset 0
// whose length is a multiple of opts.BlockSize, then calls Sync once if w
// has it. With opts.TargetZeroed it writes only the blocks that hold
// non-zero bytes (for a new image the header, the start of the refcount
// table and the start of the refcount block), one WriteAt per run of
// them (short gaps of zeros included, see zeroGapWrite), then syncs once. Bytes past the metadata are not touched: qemu only
// reaches them through tables Create leaves empty.
//
// Errors: options out of range wrap ErrCreateOption, ErrBackingFormatMissing
// or ErrBackingFormat; a small target wraps ErrTargetTooSmall; an unsafe
// backing name is a *ValidationError of ErrBackingName violations.
func Create(w io.WriterAt, targetSize int64, opts CreateOptions) (*CreateLayout, error) {
	l, err := PlanCreate(targetSize, opts)
	if err != nil {
		return nil, err
	}
	opts, _ = checkCreateOptions(opts)
	buf := alignedBuffer(int(l.WriteSize), opts.BlockSize)
	l.encode(buf, opts)
	if !opts.TargetZeroed {
		if _, err := w.WriteAt(buf, 0); err != nil {
			return nil, fmt.Errorf("writing %d bytes of qcow2 metadata: %w", len(buf), err)
		}
	} else {
		for _, r := range nonZeroRuns(buf, opts.BlockSize) {
			if _, err := w.WriteAt(buf[r[0]:r[1]], int64(r[0])); err != nil {
				return nil, fmt.Errorf("writing %d bytes of qcow2 metadata at offset %d: %w", r[1]-r[0], r[0], err)
			}
		}
	}
	if s, ok := w.(interface{ Sync() error }); ok {
		if err := s.Sync(); err != nil {
			return nil, fmt.Errorf("flushing qcow2 metadata: %w", err)
		}
	}
	return l, nil
}

// zeroGapWrite is the longest run of zero blocks between non-zero ones
// that TargetZeroed writes anyway rather than splitting the write: one
// more request costs more than writing that many zeros with it (measured
// on a loop device with direct I/O over ext4: a request ~100 us, 128 KiB
// ~90 us). With 64 KiB clusters the header, refcount table and refcount
// block become one 132 KiB write instead of 256 KiB.
const zeroGapWrite = 128 << 10

// nonZeroRuns returns the [start, end) byte ranges of buf to write when
// the target reads zeros: every bs-byte block that holds a non-zero byte,
// joined into runs across gaps of at most zeroGapWrite zero bytes.
// Starts and ends are multiples of bs, and buf's start is aligned, so
// every range is a valid O_DIRECT write.
func nonZeroRuns(buf []byte, bs int) [][2]int {
	var runs [][2]int
	for off := 0; off < len(buf); off += bs {
		if allZero(buf[off : off+bs]) {
			continue
		}
		if n := len(runs); n > 0 && off-runs[n-1][1] <= zeroGapWrite {
			runs[n-1][1] = off + bs
		} else {
			runs = append(runs, [2]int{off, off + bs})
		}
	}
	return runs
}

// zeroBlock is compared against: bytes.Equal is vectorised.
var zeroBlock [maxBlockSize]byte

func allZero(b []byte) bool { return bytes.Equal(b, zeroBlock[:len(b)]) }

// checkCreateOptions validates opts and fills in the defaults.
func checkCreateOptions(opts CreateOptions) (CreateOptions, error) {
	if opts.ClusterSize == 0 {
		opts.ClusterSize = DefaultClusterSize
	}
	if opts.BlockSize == 0 {
		opts.BlockSize = DefaultBlockSize
	}
	cs := opts.ClusterSize
	if cs < 1<<MinClusterBits || cs > 1<<MaxClusterBits || cs&(cs-1) != 0 {
		return opts, fmt.Errorf("%w: cluster size = %d: must be a power of two from %d to %d",
			ErrCreateOption, cs, 1<<MinClusterBits, 1<<MaxClusterBits)
	}
	bs := opts.BlockSize
	if bs < 512 || bs > maxBlockSize || bs&(bs-1) != 0 {
		return opts, fmt.Errorf("%w: block size = %d: must be a power of two from 512 to %d", ErrCreateOption, bs, maxBlockSize)
	}
	if opts.VirtualSize <= 0 || opts.VirtualSize%512 != 0 {
		return opts, fmt.Errorf("%w: virtual size = %d: must be > 0 and a multiple of 512", ErrCreateOption, opts.VirtualSize)
	}
	switch {
	case opts.BackingFile == "" && opts.BackingFormat != "":
		return opts, fmt.Errorf("%w: backing format = %q: given without a backing file", ErrCreateOption, opts.BackingFormat)
	case opts.BackingFile == "":
		return opts, nil
	case opts.BackingFormat == "":
		return opts, fmt.Errorf("%w: backing format = \"\": backing file %q needs an explicit format (raw or qcow2); volagent never guesses one",
			ErrBackingFormatMissing, opts.BackingFile)
	}
	if _, err := ParseFormat(opts.BackingFormat); err != nil {
		return opts, fmt.Errorf("%w: backing format: %w", ErrBackingFormat, err)
	}
	if errs := ValidateBackingName(opts.BackingFile); len(errs) > 0 {
		return opts, &ValidationError{Violations: errs}
	}
	return opts, nil
}

// headerClusterBytes is how much of the first cluster the header, its
// extensions and the backing name take.
func headerClusterBytes(opts CreateOptions, featureTable bool) int64 {
	n := int64(v3HeaderLengthWithCmp)
	if opts.BackingFormat != "" {
		n += 8 + pad8(int64(len(opts.BackingFormat)))
	}
	if featureTable {
		n += 8 + pad8(int64(len(createFeatureNames)*featureNameEntrySize))
	}
	n += 8 // end of extensions
	return n + int64(len(opts.BackingFile))
}

// encode fills buf (zeroed, WriteSize bytes) with the metadata.
func (l *CreateLayout) encode(buf []byte, opts CreateOptions) {
	be := binary.BigEndian
	c := l.ClusterSize

	// Extensions first, so the backing name offset is known.
	off := int64(v3HeaderLengthWithCmp)
	putExt := func(typ uint32, data []byte) {
		be.PutUint32(buf[off:], typ)
		be.PutUint32(buf[off+4:], uint32(len(data)))
		copy(buf[off+8:], data)
		off += 8 + pad8(int64(len(data)))
	}
	if opts.BackingFormat != "" {
		putExt(ExtBackingFormat, []byte(opts.BackingFormat))
	}
	if l.FeatureTable {
		table := make([]byte, len(createFeatureNames)*featureNameEntrySize)
		for i, f := range createFeatureNames {
			e := table[i*featureNameEntrySize:]
			e[0], e[1] = f.Type, f.Bit
			copy(e[2:featureNameEntrySize], f.Name)
		}
		putExt(ExtFeatureTable, table)
	}
	off += 8 // ExtEnd: type 0, length 0, already zero
	var backingOffset int64
	if opts.BackingFile != "" {
		backingOffset = off
		copy(buf[off:], opts.BackingFile)
	}

	be.PutUint32(buf[0:], Magic)
	be.PutUint32(buf[4:], 3)
	be.PutUint64(buf[8:], uint64(backingOffset))
	be.PutUint32(buf[16:], uint32(len(opts.BackingFile)))
	be.PutUint32(buf[20:], uint32(bits.TrailingZeros64(uint64(c))))
	be.PutUint64(buf[24:], uint64(l.VirtualSize))
	// 32 crypt_method: 0.
	be.PutUint32(buf[36:], uint32(l.L1Entries))
	be.PutUint64(buf[40:], uint64(l.L1TableOffset))
	be.PutUint64(buf[48:], uint64(l.RefcountTableOffset))
	be.PutUint32(buf[56:], uint32(l.RefcountTableClusters))
	// 60 nb_snapshots, 64 snapshots_offset, 72..95 feature bits: all 0.
	be.PutUint32(buf[96:], createRefcountOrd)
	be.PutUint32(buf[100:], v3HeaderLengthWithCmp)
	// 104 compression_type: 0 (zlib), then 7 bytes of padding.

	for i := int64(0); i < l.RefcountBlocks; i++ {
		be.PutUint64(buf[l.RefcountTableOffset+i*8:], uint64(l.RefcountBlockOffset+i*c))
	}
	// Refcount 1 for each metadata cluster; the blocks are consecutive, so
	// the entries are too.
	for i := int64(0); i < l.MetadataClusters; i++ {
		be.PutUint16(buf[l.RefcountBlockOffset+i*2:], 1)
	}
	// The L1 table stays zero: nothing is allocated yet.
}

// alignedBuffer returns n zero bytes whose address is a multiple of align,
// as O_DIRECT needs.
func alignedBuffer(n, align int) []byte {
	b := make([]byte, n+align)
	skip := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) % uintptr(align)); r != 0 {
		skip = align - r
	}
	return b[skip : skip+n : skip+n]
}

func ceilDiv(a, b int64) int64 { return (a + b - 1) / b }
func roundUp(a, b int64) int64 { return ceilDiv(a, b) * b }
func pad8(n int64) int64       { return (n + 7) &^ 7 }

// satMul multiplies non-negative a and b, saturating at MaxInt64.
func satMul(a, b int64) int64 {
	hi, lo := bits.Mul64(uint64(a), uint64(b))
	if hi != 0 || lo > 1<<63-1 {
		return 1<<63 - 1
	}
	return int64(lo)
}

// BackingVirtualSize returns the virtual size of a backing file of the given
// format without probing it: for raw, its size rounded up to 512 bytes (as
// qemu rounds it); for qcow2, the size its header records, after ReadHeader
// validated it (its violations come back as ReadHeader's *ValidationError).
// r is the backing file or device and containerSize its size in bytes.
func BackingVirtualSize(r io.ReaderAt, containerSize int64, format string) (int64, error) {
	if format == "" {
		return 0, fmt.Errorf("%w: backing format = \"\": give raw or qcow2; volagent never guesses one", ErrBackingFormatMissing)
	}
	f, err := ParseFormat(format)
	if err != nil {
		return 0, fmt.Errorf("%w: backing format: %w", ErrBackingFormat, err)
	}
	if f == FormatRaw {
		return roundUp(containerSize, 512), nil
	}
	h, err := ReadHeader(r, containerSize)
	if err != nil {
		return 0, err
	}
	return int64(h.Size), nil
}
