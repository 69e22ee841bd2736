package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"math/bits"
)

// Magic is "QFI\xfb", the first four bytes of every qcow2 image.
const Magic = 0x514649fb

// Limits. Those marked (qemu) are qemu's own; an image that exceeds them is
// one qemu refuses too. The others are volagent's stricter rules.
const (
	MinClusterBits = 9  // 512 B (qemu)
	MaxClusterBits = 21 // 2 MiB (qemu)

	v2HeaderLength        = 72
	v3MinHeaderLength     = 104
	v3HeaderLengthWithCmp = 112 // with the compression type byte and padding

	maxL1Bytes             = 32 << 20 // QCOW_MAX_L1_SIZE (qemu)
	maxRefcountTableBytes  = 8 << 20  // QCOW_MAX_REFTABLE_SIZE (qemu)
	maxSnapshots           = 65536    // QCOW_MAX_SNAPSHOTS (qemu)
	maxSnapshotTableBytes  = 1024 * maxSnapshots
	maxSnapshotExtraData   = 1024 // QCOW_MAX_SNAPSHOT_EXTRA_DATA (qemu)
	maxBackingNameLength   = 1023 // qemu
	maxBackingFormatLength = 15   // qemu's backing_format buffer is 16 with NUL
	maxBitmaps             = 65535
	maxBitmapDirectorySize = 1024 * maxBitmaps
	maxRefcountOrder       = 6 // 64-bit refcounts (qemu)
	minExtendedL2Bits      = 14

	// Bounds on what one header makes volagent keep, whatever it holds:
	// a 2 MiB header cluster can carry 262144 empty extensions, and the
	// daemon inspects images for unprivileged callers.
	MaxListedExtensions = 64  // Header.Extensions keeps the first ones; ExtensionCount counts all
	MaxViolations       = 64  // a ValidationError lists these and then says how many more
	maxFeatureNames     = 192 // 64 bits of each of the 3 feature kinds
	snapshotReadChunk   = 64 << 10
)

// Offsets of the header fields (qcow2.txt, "Header"), named as in
// cloud-hypervisor's qcow module.
const (
	offMagic                 = 0
	offVersion               = 4
	offBackingFileOffset     = 8
	offBackingFileSize       = 16
	offClusterBits           = 20
	offSize                  = 24
	offCryptMethod           = 32
	offL1Size                = 36
	offL1TableOffset         = 40
	offRefcountTableOffset   = 48
	offRefcountTableClusters = 56
	offNbSnapshots           = 60
	offSnapshotsOffset       = 64
	offIncompatibleFeatures  = 72
	offCompatibleFeatures    = 80
	offAutoclearFeatures     = 88
	offRefcountOrder         = 96
	offHeaderLength          = 100
)

// Incompatible feature bits.
const (
	IncompatDirty       = 1 << 0
	IncompatCorrupt     = 1 << 1
	IncompatDataFile    = 1 << 2
	IncompatCompression = 1 << 3
	IncompatExtendedL2  = 1 << 4
	knownIncompat       = IncompatDirty | IncompatCorrupt | IncompatDataFile | IncompatCompression | IncompatExtendedL2
)

// Compatible and autoclear feature bits.
const (
	CompatLazyRefcounts  = 1 << 0
	AutoclearBitmaps     = 1 << 0
	AutoclearDataFileRaw = 1 << 1
)

// Compression types (header byte 104).
const (
	CompressionZlib = 0
	CompressionZstd = 1
)

// Header extension types.
const (
	ExtEnd           = 0x00000000
	ExtBackingFormat = 0xe2792aca
	ExtFeatureTable  = 0x6803f857
	ExtBitmaps       = 0x23852875
	ExtCrypto        = 0x0537be77
	ExtDataFile      = 0x44415441
)

// Header is a parsed and validated qcow2 header with its extensions.
// Field names follow docs/interop/qcow2.txt.
type Header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64 // virtual size in bytes
	CryptMethod           uint32
	L1Size                uint32
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64
	IncompatibleFeatures  uint64
	CompatibleFeatures    uint64
	AutoclearFeatures     uint64
	RefcountOrder         uint32
	HeaderLength          uint32
	CompressionType       uint8

	// From the backing file name area and the extensions.
	BackingFile   string // "" when the image has no backing file
	BackingFormat string // from the backing format extension; "" when absent
	DataFile      string // from the external data file extension (always refused)
	FeatureNames  []FeatureName
	Bitmaps       *BitmapsExtension
	// Extensions are the first MaxListedExtensions extensions in file
	// order, unknown ones too; ExtensionCount counts every one.
	Extensions     []ExtensionInfo
	ExtensionCount int

	// ImageSize is the size of the container (file or device) the header was
	// read from; every table was checked to lie below it.
	ImageSize int64
}

// FeatureName is one entry of the feature name table extension.
type FeatureName struct {
	Type uint8 // 0 incompatible, 1 compatible, 2 autoclear
	Bit  uint8
	Name string
}

// BitmapsExtension is the content of the bitmaps extension.
type BitmapsExtension struct {
	NbBitmaps               uint32
	BitmapDirectorySize     uint64
	BitmapDirectoryOffset   uint64
	ConsistentWithAutoclear bool // the autoclear bitmaps bit is set
}

// ExtensionInfo describes one header extension as found in the file.
type ExtensionInfo struct {
	Type   uint32
	Offset uint64 // of its data
	Length uint32
}

// ClusterSize is the cluster size in bytes.
func (h *Header) ClusterSize() int64 { return 1 << h.ClusterBits }

// ExtendedL2 reports whether L2 entries carry subcluster bitmaps.
func (h *Header) ExtendedL2() bool { return h.IncompatibleFeatures&IncompatExtendedL2 != 0 }

// L2EntrySize is 8, or 16 with extended L2 entries.
func (h *Header) L2EntrySize() int64 {
	if h.ExtendedL2() {
		return 16
	}
	return 8
}

// L2Entries is the number of entries in one L2 table.
func (h *Header) L2Entries() int64 { return h.ClusterSize() / h.L2EntrySize() }

// RefcountBits is the width of one refcount entry.
func (h *Header) RefcountBits() int { return 1 << h.RefcountOrder }

// HasBacking reports whether the image names a backing file.
func (h *Header) HasBacking() bool { return h.BackingFile != "" }

// Dirty reports the dirty bit (refcounts may be stale; the tables are good).
func (h *Header) Dirty() bool { return h.IncompatibleFeatures&IncompatDirty != 0 }

// LazyRefcounts reports the lazy refcounts compatible bit.
func (h *Header) LazyRefcounts() bool { return h.CompatibleFeatures&CompatLazyRefcounts != 0 }

// CompressionName is "zlib" or "zstd".
func (h *Header) CompressionName() string {
	switch h.CompressionType {
	case CompressionZlib:
		return "zlib"
	case CompressionZstd:
		return "zstd"
	}
	return fmt.Sprintf("unknown(%d)", h.CompressionType)
}

// requiredL1Entries is how many L1 entries a virtual size needs.
func (h *Header) requiredL1Entries() uint64 {
	perL1 := uint64(h.L2Entries()) << h.ClusterBits // bytes one L2 table maps
	return h.Size/perL1 + boolToUint64(h.Size%perL1 != 0)
}

func boolToUint64(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// ReadHeader reads and validates the qcow2 header of an image of imageSize
// bytes. It reads only the first cluster (at most 2 MiB) and, when the image
// has snapshots, walks the snapshot table with a bounded buffer; nothing a
// header says makes it allocate more.
//
// Results, case by case:
//   - a valid image the policy accepts: the header, nil;
//   - violations: the header as far as it could be read (nil when not even
//     the magic and version could be) and a *ValidationError listing every
//     violation found, each wrapping one sentinel (ErrNotQcow2, ErrDataFile, ...);
//   - an I/O error from r: nil and that error (not a verdict on the image).
func ReadHeader(r io.ReaderAt, imageSize int64) (*Header, error) {
	v := &validator{}
	h, err := v.read(r, imageSize)
	if err != nil {
		return nil, err
	}
	if len(v.violations) > 0 {
		return h, &ValidationError{Violations: v.result()}
	}
	return h, nil
}

type validator struct {
	violations []*FieldError
	unlisted   int // violations past MaxViolations, counted only
}

// listing reports whether a violation found now would be listed; past
// MaxViolations it only counts it, so the caller need not even build it
// (a header with a million faults then costs what one with 64 does).
func (v *validator) listing() bool {
	if len(v.violations) < MaxViolations {
		return true
	}
	v.unlisted++
	return false
}

func (v *validator) add(e *FieldError) {
	if len(v.violations) >= MaxViolations {
		v.unlisted++
		return
	}
	v.violations = append(v.violations, e)
}

// result is the violations found, the last one saying how many more
// there were past MaxViolations.
func (v *validator) result() []*FieldError {
	if v.unlisted == 0 {
		return v.violations
	}
	return append(v.violations, fieldErr(ErrTooLarge, "violations", v.unlisted,
		"and %d more violations not listed (at most %d are)", v.unlisted, MaxViolations))
}

// readFull reads len(p) bytes at off, turning a short read into io.ErrUnexpectedEOF.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

func (v *validator) read(r io.ReaderAt, imageSize int64) (*Header, error) {
	if imageSize < 8 {
		v.add(fieldErr(ErrNotQcow2, "image size", imageSize, "too small to hold a qcow2 header"))
		return nil, nil
	}
	// One read of headerPrefix bytes holds the fixed header and, as qemu
	// writes images, the extensions and the backing name too.
	prefix := make([]byte, min(imageSize, headerPrefix))
	if err := readFull(r, prefix, 0); err != nil {
		return nil, fmt.Errorf("reading qcow2 header: %w", err)
	}
	fixed := prefix[:min(len(prefix), v3HeaderLengthWithCmp)]
	be := binary.BigEndian
	if m := be.Uint32(fixed[offMagic:]); m != Magic {
		v.add(fieldErr(ErrNotQcow2, "magic", hex(m), "want %#08x (QFI\\xfb)", Magic))
		return nil, nil
	}
	h := &Header{Version: be.Uint32(fixed[offVersion:]), ImageSize: imageSize}
	if h.Version != 2 && h.Version != 3 {
		v.add(fieldErr(ErrUnsupported, "version", h.Version, "only versions 2 and 3 exist"))
		return h, nil
	}
	minLen := int64(v2HeaderLength)
	if h.Version == 3 {
		minLen = v3MinHeaderLength
	}
	if imageSize < minLen {
		v.add(fieldErr(ErrTruncated, "image size", imageSize, "a version %d header needs %d bytes", h.Version, minLen))
		return h, nil
	}
	h.BackingFileOffset = be.Uint64(fixed[offBackingFileOffset:])
	h.BackingFileSize = be.Uint32(fixed[offBackingFileSize:])
	h.ClusterBits = be.Uint32(fixed[offClusterBits:])
	h.Size = be.Uint64(fixed[offSize:])
	h.CryptMethod = be.Uint32(fixed[offCryptMethod:])
	h.L1Size = be.Uint32(fixed[offL1Size:])
	h.L1TableOffset = be.Uint64(fixed[offL1TableOffset:])
	h.RefcountTableOffset = be.Uint64(fixed[offRefcountTableOffset:])
	h.RefcountTableClusters = be.Uint32(fixed[offRefcountTableClusters:])
	h.NbSnapshots = be.Uint32(fixed[offNbSnapshots:])
	h.SnapshotsOffset = be.Uint64(fixed[offSnapshotsOffset:])
	if h.Version == 2 {
		h.RefcountOrder = 4
		h.HeaderLength = v2HeaderLength
	} else {
		h.IncompatibleFeatures = be.Uint64(fixed[offIncompatibleFeatures:])
		h.CompatibleFeatures = be.Uint64(fixed[offCompatibleFeatures:])
		h.AutoclearFeatures = be.Uint64(fixed[offAutoclearFeatures:])
		h.RefcountOrder = be.Uint32(fixed[offRefcountOrder:])
		h.HeaderLength = be.Uint32(fixed[offHeaderLength:])
	}

	if h.ClusterBits < MinClusterBits || h.ClusterBits > MaxClusterBits {
		v.add(fieldErr(ErrInvalidHeader, "cluster_bits", h.ClusterBits, "must be %d to %d (512 B to 2 MiB)", MinClusterBits, MaxClusterBits))
		return h, nil // every other bound depends on the cluster size
	}
	clusterSize := uint64(h.ClusterSize())

	switch {
	case h.Version == 3 && h.HeaderLength < v3MinHeaderLength:
		v.add(fieldErr(ErrInvalidHeader, "header_length", h.HeaderLength, "a version 3 header is at least %d bytes", v3MinHeaderLength))
		return h, nil
	case uint64(h.HeaderLength) > clusterSize:
		v.add(fieldErr(ErrInvalidHeader, "header_length", h.HeaderLength, "exceeds the cluster size %d", clusterSize))
		return h, nil
	case int64(h.HeaderLength) > imageSize:
		v.add(fieldErr(ErrTruncated, "header_length", h.HeaderLength, "image is only %d bytes", imageSize))
		return h, nil
	case h.HeaderLength%8 != 0:
		v.add(fieldErr(ErrInvalidHeader, "header_length", h.HeaderLength, "must be a multiple of 8"))
	}
	if h.Version == 3 && h.HeaderLength > v3MinHeaderLength && len(fixed) > v3MinHeaderLength {
		h.CompressionType = fixed[104]
	}

	// The first cluster holds the header, its extensions and the backing
	// name; it is at most 2 MiB, so reading it whole is bounded. It is
	// read whole only when they reach past the prefix.
	first := prefix[:min(uint64(len(prefix)), clusterSize)]
	if whole := min(int64(clusterSize), imageSize); int64(len(first)) < whole && !headerAreaIn(h, first, clusterSize) {
		first = make([]byte, whole)
		if err := readFull(r, first, 0); err != nil {
			return nil, fmt.Errorf("reading qcow2 header cluster: %w", err)
		}
	}

	v.checkFeatures(h)
	v.checkTables(h, imageSize)
	v.parseExtensions(h, first, clusterSize)
	v.checkFeatureDependencies(h)
	v.readBackingName(h, first, clusterSize)
	v.checkBacking(h)
	if err := v.walkSnapshots(r, h, imageSize); err != nil {
		return nil, err
	}
	return h, nil
}

func (v *validator) checkFeatures(h *Header) {
	if h.CryptMethod != 0 {
		v.add(fieldErr(ErrEncrypted, "crypt_method", h.CryptMethod, "volagent does not handle encrypted images"))
	}
	if h.IncompatibleFeatures&IncompatCorrupt != 0 {
		v.add(fieldErr(ErrCorrupt, "incompatible_features", hex(h.IncompatibleFeatures), "the corrupt bit is set; repair the image with qemu-img check -r all first"))
	}
	if h.IncompatibleFeatures&IncompatDataFile != 0 {
		v.add(fieldErr(ErrDataFile, "incompatible_features", hex(h.IncompatibleFeatures), "the external data file bit is set"))
	}
	if unknown := h.IncompatibleFeatures &^ knownIncompat; unknown != 0 {
		v.add(fieldErr(ErrIncompatibleFeature, "incompatible_features", hex(h.IncompatibleFeatures), "unknown bits %#x", unknown))
	}
	if h.RefcountOrder > maxRefcountOrder {
		v.add(fieldErr(ErrInvalidHeader, "refcount_order", h.RefcountOrder, "refcounts are at most 64 bits wide (order %d)", maxRefcountOrder))
	}
	if h.Version == 2 && h.CompressionType != CompressionZlib {
		v.add(fieldErr(ErrInvalidHeader, "compression_type", h.CompressionType, "version 2 images only have zlib"))
	}
	switch h.CompressionType {
	case CompressionZlib:
		if h.IncompatibleFeatures&IncompatCompression != 0 {
			v.add(fieldErr(ErrInvalidHeader, "incompatible_features", hex(h.IncompatibleFeatures), "the compression type bit must not be set for zlib"))
		}
	case CompressionZstd:
		if h.IncompatibleFeatures&IncompatCompression == 0 {
			v.add(fieldErr(ErrInvalidHeader, "incompatible_features", hex(h.IncompatibleFeatures), "the compression type bit must be set for zstd"))
		}
	default:
		v.add(fieldErr(ErrInvalidHeader, "compression_type", h.CompressionType, "known types are 0 (zlib) and 1 (zstd)"))
	}
	if h.ExtendedL2() && h.ClusterBits < minExtendedL2Bits {
		v.add(fieldErr(ErrUnsupported, "cluster_bits", h.ClusterBits, "extended L2 entries need clusters of at least %d bytes", 1<<minExtendedL2Bits))
	}
	if h.AutoclearFeatures&AutoclearDataFileRaw != 0 {
		v.add(fieldErr(ErrDataFile, "autoclear_features", hex(h.AutoclearFeatures), "the raw external data bit is set"))
	}
}

// checkTable validates a table of entries*entryLen bytes at offset: within
// qemu's limit, cluster aligned, not in the header cluster, inside the image.
func (v *validator) checkTable(h *Header, name string, offset, entries, entryLen, maxBytes uint64, imageSize int64) {
	v.checkTableNamed(h, func() string { return name }, offset, entries, entryLen, maxBytes, imageSize)
}

// checkTableNamed is checkTable with the name built only for a violation
// that is listed.
func (v *validator) checkTableNamed(h *Header, name func() string, offset, entries, entryLen, maxBytes uint64, imageSize int64) {
	if entries == 0 {
		return
	}
	if entries > maxBytes/entryLen {
		if v.listing() {
			v.add(fieldErr(ErrTooLarge, name()+" size", entries, "more than %d bytes", maxBytes))
		}
		return
	}
	size := entries * entryLen
	end, carry := bits.Add64(offset, size, 0)
	bad := offset%uint64(h.ClusterSize()) != 0 || offset == 0 || carry != 0 || end > math.MaxInt64 || end > uint64(imageSize)
	if !bad || !v.listing() {
		return
	}
	switch {
	case offset%uint64(h.ClusterSize()) != 0:
		v.add(fieldErr(ErrInvalidHeader, name()+" offset", offset, "not aligned to the cluster size %d", h.ClusterSize()))
	case offset == 0:
		v.add(fieldErr(ErrInvalidHeader, name()+" offset", offset, "overlaps the header"))
	case carry != 0 || end > math.MaxInt64:
		v.add(fieldErr(ErrTooLarge, name()+" offset", offset, "offset plus size %d overflows", size))
	case end > uint64(imageSize):
		v.add(fieldErr(ErrOutOfBounds, name()+" offset", offset, "table of %d bytes ends at %d, past the end of the image (%d bytes)", size, end, imageSize))
	}
}

func (v *validator) checkTables(h *Header, imageSize int64) {
	if h.Size > math.MaxInt64 {
		v.add(fieldErr(ErrTooLarge, "size", h.Size, "virtual size exceeds 2^63-1"))
	} else if need := h.requiredL1Entries(); uint64(h.L1Size) < need {
		v.add(fieldErr(ErrInvalidHeader, "l1_size", h.L1Size, "the virtual size %d needs %d L1 entries", h.Size, need))
	}
	v.checkTable(h, "l1_table", h.L1TableOffset, uint64(h.L1Size), 8, maxL1Bytes, imageSize)
	if h.RefcountTableClusters == 0 {
		v.add(fieldErr(ErrInvalidHeader, "refcount_table_clusters", 0, "the image has no refcount table"))
	}
	v.checkTable(h, "refcount_table", h.RefcountTableOffset, uint64(h.RefcountTableClusters), uint64(h.ClusterSize()), maxRefcountTableBytes, imageSize)
	if h.NbSnapshots > maxSnapshots {
		v.add(fieldErr(ErrTooLarge, "nb_snapshots", h.NbSnapshots, "at most %d snapshots", maxSnapshots))
	} else if h.NbSnapshots > 0 {
		// Each entry is at least 40 bytes; the walk checks the real extent.
		v.checkTable(h, "snapshot_table", h.SnapshotsOffset, uint64(h.NbSnapshots), 40, maxSnapshotTableBytes, imageSize)
	}
}

// headerPrefix is how much of an image ReadHeader reads first: a block
// device's page, more than qemu's header, extensions and backing name
// take.
const headerPrefix = 4096

// headerAreaIn reports whether parsing the extensions and the backing
// name from buf, a prefix of the first cluster, reads exactly what
// parsing them from the whole cluster would: every byte parseExtensions
// and readBackingName would look at lies in buf. It walks the extensions
// as parseExtensions does, and stops where that would stop.
func headerAreaIn(h *Header, buf []byte, clusterSize uint64) bool {
	n := uint64(len(buf))
	if off, size := h.BackingFileOffset, uint64(h.BackingFileSize); off != 0 && (off > n || size > n-off) {
		return false
	}
	end := clusterSize
	if h.BackingFileOffset != 0 && h.BackingFileOffset < end {
		end = h.BackingFileOffset
	}
	be := binary.BigEndian
	for off := uint64(h.HeaderLength); off < end; {
		if off+8 > end {
			return true // refused without reading
		}
		if off+8 > n {
			return false
		}
		typ, length := be.Uint32(buf[off:]), be.Uint32(buf[off+4:])
		dataOff := off + 8
		if typ == ExtEnd || uint64(length) > end-dataOff {
			return true // the end, or refused without reading
		}
		if dataOff+uint64(length) > n {
			return false
		}
		off = dataOff + (uint64(length)+7)&^7
	}
	return true
}

// parseExtensions walks the extensions from header_length up to the backing
// file name (or the end of the first cluster).
func (v *validator) parseExtensions(h *Header, first []byte, clusterSize uint64) {
	be := binary.BigEndian
	end := clusterSize
	if h.BackingFileOffset != 0 && h.BackingFileOffset < end {
		end = h.BackingFileOffset
	}
	var seen [len(knownExtensions)]bool // unknown types may repeat; only known ones are tracked
	off := uint64(h.HeaderLength)
	for off < end {
		if off+8 > end {
			v.add(fieldErr(ErrInvalidExtension, "extension header", off, "extension at offset %d runs into the backing file name or past the first cluster", off))
			return
		}
		if off+8 > uint64(len(first)) {
			v.add(fieldErr(ErrTruncated, "extension header", off, "image ends inside the header extensions"))
			return
		}
		typ, length := be.Uint32(first[off:]), be.Uint32(first[off+4:])
		dataOff := off + 8
		if typ == ExtEnd {
			return
		}
		padded := (uint64(length) + 7) &^ 7
		if uint64(length) > end-dataOff {
			v.add(fieldErr(ErrInvalidExtension, fmt.Sprintf("extension %#08x length", typ), length, "runs past the extension area ending at %d", end))
			return
		}
		if dataOff+uint64(length) > uint64(len(first)) {
			v.add(fieldErr(ErrTruncated, fmt.Sprintf("extension %#08x length", typ), length, "image ends inside the extension"))
			return
		}
		data := first[dataOff : dataOff+uint64(length)]
		h.ExtensionCount++
		if len(h.Extensions) < MaxListedExtensions {
			h.Extensions = append(h.Extensions, ExtensionInfo{Type: typ, Offset: dataOff, Length: length})
		}
		if k := knownExtensionIndex(typ); k >= 0 {
			if seen[k] {
				if v.listing() {
					v.add(fieldErr(ErrInvalidExtension, "extension type", hex(typ), "appears more than once; tools would disagree on which counts"))
				}
				// Refused already; parsing each copy again would let one
				// header make thousands of violations.
				off = dataOff + padded
				continue
			}
			seen[k] = true
		}
		v.parseExtension(h, typ, data)
		off = dataOff + padded
	}
}

var knownExtensions = [...]uint32{ExtBackingFormat, ExtFeatureTable, ExtBitmaps, ExtCrypto, ExtDataFile}

// knownExtensionIndex is typ's index in knownExtensions, or -1.
func knownExtensionIndex(typ uint32) int {
	for i, k := range knownExtensions {
		if k == typ {
			return i
		}
	}
	return -1
}

func (v *validator) parseExtension(h *Header, typ uint32, data []byte) {
	be := binary.BigEndian
	switch typ {
	case ExtBackingFormat:
		if len(data) > maxBackingFormatLength {
			if v.listing() {
				v.add(fieldErr(ErrInvalidExtension, "backing_format length", len(data), "at most %d bytes", maxBackingFormatLength))
			}
			return
		}
		if !isPrintableName(data) {
			if !v.listing() {
				return
			}
			v.add(fieldErr(ErrInvalidExtension, "backing_format", string(data), "contains bytes other than printable ASCII"))
			return
		}
		h.BackingFormat = string(data)
	case ExtFeatureTable:
		for i := 0; i+48 <= len(data) && len(h.FeatureNames) < maxFeatureNames; i += 48 {
			name := data[i+2 : i+48]
			if n := bytes.IndexByte(name, 0); n >= 0 {
				name = name[:n]
			}
			h.FeatureNames = append(h.FeatureNames, FeatureName{Type: data[i], Bit: data[i+1], Name: string(name)})
		}
	case ExtBitmaps:
		if len(data) != 24 {
			v.add(fieldErr(ErrInvalidExtension, "bitmaps extension length", len(data), "must be 24"))
			return
		}
		b := &BitmapsExtension{
			NbBitmaps:               be.Uint32(data[0:]),
			BitmapDirectorySize:     be.Uint64(data[8:]),
			BitmapDirectoryOffset:   be.Uint64(data[16:]),
			ConsistentWithAutoclear: h.AutoclearFeatures&AutoclearBitmaps != 0,
		}
		h.Bitmaps = b
		if reserved := be.Uint32(data[4:]); reserved != 0 {
			v.add(fieldErr(ErrInvalidExtension, "bitmaps reserved32", reserved, "must be zero"))
		}
		if b.NbBitmaps == 0 || b.NbBitmaps > maxBitmaps {
			v.add(fieldErr(ErrInvalidExtension, "nb_bitmaps", b.NbBitmaps, "must be 1 to %d", maxBitmaps))
		}
		v.checkTable(h, "bitmap_directory", b.BitmapDirectoryOffset, b.BitmapDirectorySize, 1, maxBitmapDirectorySize, h.ImageSize)
	case ExtCrypto:
		v.add(fieldErr(ErrEncrypted, "full disk encryption extension", len(data), "volagent does not handle encrypted images"))
	case ExtDataFile:
		h.DataFile = string(data)
		v.add(fieldErr(ErrDataFile, "data_file", string(data), "images naming an external data file are refused"))
	}
}

func (v *validator) checkFeatureDependencies(h *Header) {
	if h.IncompatibleFeatures&IncompatDataFile != 0 && h.DataFile == "" {
		v.add(fieldErr(ErrInvalidHeader, "data_file", "", "the external data file bit is set but no data file extension exists"))
	}
	if unknown := h.IncompatibleFeatures &^ knownIncompat; unknown != 0 {
		for _, f := range h.FeatureNames {
			if f.Type == 0 && f.Bit < 64 && unknown&(1<<f.Bit) != 0 {
				v.add(fieldErr(ErrIncompatibleFeature, "incompatible feature name", f.Name, "bit %d", f.Bit))
			}
		}
	}
}

func (v *validator) readBackingName(h *Header, first []byte, clusterSize uint64) {
	off, size := h.BackingFileOffset, uint64(h.BackingFileSize)
	switch {
	case off == 0 && size == 0:
		return
	case off == 0:
		v.add(fieldErr(ErrInvalidHeader, "backing_file_size", size, "set while backing_file_offset is 0"))
		return
	case size == 0:
		v.add(fieldErr(ErrInvalidHeader, "backing_file_offset", off, "set while backing_file_size is 0"))
		return
	case size > maxBackingNameLength:
		v.add(fieldErr(ErrTooLarge, "backing_file_size", size, "backing file names are at most %d bytes", maxBackingNameLength))
		return
	case off < uint64(h.HeaderLength):
		v.add(fieldErr(ErrInvalidHeader, "backing_file_offset", off, "inside the header (header_length %d)", h.HeaderLength))
		return
	case off > clusterSize || size > clusterSize-off:
		v.add(fieldErr(ErrInvalidHeader, "backing_file_offset", off, "name of %d bytes does not fit in the first cluster", size))
		return
	case off+size > uint64(len(first)):
		v.add(fieldErr(ErrTruncated, "backing_file_offset", off, "image ends inside the backing file name"))
		return
	}
	name := string(first[off : off+size])
	h.BackingFile = name
	for _, e := range ValidateBackingName(name) {
		v.add(e)
	}
}

func (v *validator) checkBacking(h *Header) {
	if !h.HasBacking() {
		return
	}
	if h.BackingFormat == "" {
		v.add(fieldErr(ErrBackingFormatMissing, "backing_format", "", "the image names backing file %q without recording its format; recreate it with qemu-img create -F raw|qcow2 or rebase with qemu-img rebase -u -F", h.BackingFile))
	} else if _, err := ParseFormat(h.BackingFormat); err != nil {
		v.add(fieldErr(ErrBackingFormat, "backing_format", h.BackingFormat, "only raw and qcow2 backing files are accepted"))
	}
}

// walkSnapshots checks every snapshot table entry: its extent stays inside
// the table limit and the image, and its L1 table is valid. It stops at the
// first bad entry; the rest of the table cannot be located after it.
func (v *validator) walkSnapshots(r io.ReaderAt, h *Header, imageSize int64) error {
	if h.NbSnapshots == 0 || h.NbSnapshots > maxSnapshots || h.SnapshotsOffset == 0 ||
		h.SnapshotsOffset%uint64(h.ClusterSize()) != 0 || h.SnapshotsOffset >= uint64(imageSize) {
		return nil
	}
	be := binary.BigEndian
	off := h.SnapshotsOffset
	limit := min(uint64(imageSize), h.SnapshotsOffset+maxSnapshotTableBytes)
	var fixed [40]byte
	var end uint64
	table := chunkReader{r: r, limit: int64(limit), buf: make([]byte, min(snapshotReadChunk, limit-off))}
	for i := uint32(0); i < h.NbSnapshots; i++ {
		if off+40 > limit {
			v.add(fieldErr(ErrOutOfBounds, "snapshot_table", i, "snapshot entry %d at %d runs past the image or the %d-byte table limit", i, off, maxSnapshotTableBytes))
			return nil
		}
		if err := table.readAt(fixed[:], int64(off)); err != nil {
			return fmt.Errorf("reading snapshot entry %d at %d: %w", i, off, err)
		}
		l1Offset := be.Uint64(fixed[0:])
		l1Size := be.Uint32(fixed[8:])
		idSize := be.Uint16(fixed[12:])
		nameSize := be.Uint16(fixed[14:])
		extraSize := be.Uint32(fixed[36:])
		if extraSize > maxSnapshotExtraData {
			v.add(fieldErr(ErrTooLarge, fmt.Sprintf("snapshot %d extra_data_size", i), extraSize, "at most %d", maxSnapshotExtraData))
			return nil
		}
		v.checkTableNamed(h, func() string { return fmt.Sprintf("snapshot %d l1_table", i) }, l1Offset, uint64(l1Size), 8, maxL1Bytes, imageSize)
		entry := 40 + uint64(extraSize) + uint64(idSize) + uint64(nameSize)
		end = off + entry
		off += (entry + 7) &^ 7 // entries are 8-byte aligned; the last one is not padded
	}
	if end > limit {
		v.add(fieldErr(ErrOutOfBounds, "snapshot_table", h.NbSnapshots, "the table ends at %d, past the image or the table limit", end))
	}
	return nil
}

// chunkReader reads small records from a region ending at limit through
// one bounded buffer, so a table of 65536 entries costs a few reads, not
// one system call each.
type chunkReader struct {
	r     io.ReaderAt
	limit int64
	buf   []byte
	start int64 // file offset of buf[0]
	n     int   // valid bytes in buf
}

func (c *chunkReader) readAt(p []byte, off int64) error {
	if off < c.start || off+int64(len(p)) > c.start+int64(c.n) {
		want := c.buf[:min(int64(len(c.buf)), c.limit-off)]
		if len(want) < len(p) {
			return io.ErrUnexpectedEOF
		}
		n, err := c.r.ReadAt(want, off)
		c.start, c.n = off, n
		if n < len(p) {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	copy(p, c.buf[off-c.start:])
	return nil
}

func isPrintableName(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		if c < 0x21 || c > 0x7e {
			return false
		}
	}
	return true
}
