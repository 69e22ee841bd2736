package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
)

// ProblemKind classifies a CheckProblem the way qemu-img check counts it.
type ProblemKind string

const (
	// ProblemCorruption: data may be lost or a write may destroy data
	// (qemu-img check's "errors").
	ProblemCorruption ProblemKind = "corruption"
	// ProblemLeak: a cluster is marked used but nothing references it.
	ProblemLeak ProblemKind = "leak"
	// ProblemCheckError: the check could not look at something.
	ProblemCheckError ProblemKind = "check-error"
)

// Check limits.
const (
	// MaxCheckProblems is how many problems CheckResult.Problems keeps;
	// the counts cover all of them.
	MaxCheckProblems = 100
	// MaxCheckClusters bounds the image size Check accepts, in clusters:
	// one refcount counter per host cluster is kept in memory.
	MaxCheckClusters = 1 << 28
)

// CheckProblem is one finding: where it is and what is wrong.
type CheckProblem struct {
	Kind ProblemKind
	// HostOffset is the byte offset in the image the problem is about, or
	// -1 when it is not about one place.
	HostOffset int64
	// Cluster is HostOffset's host cluster index, or -1 with HostOffset.
	Cluster int64
	Message string
}

// CheckResult is what Check found, counted as qemu-img check counts.
type CheckResult struct {
	Corruptions int // references that disagree with the refcounts in a harmful way
	Leaks       int // clusters whose refcount exceeds their references
	CheckErrors int // places the check could not examine
	// ImageEndOffset is the end of the last cluster that is referenced or
	// has a non-zero refcount.
	ImageEndOffset int64
	// AllocatedClusters counts the guest clusters the active L2 tables
	// map to host clusters (data, preallocated zero, compressed).
	AllocatedClusters int64
	// TotalClusters is the number of guest clusters of the virtual disk.
	TotalClusters int64
	// Problems lists the first MaxCheckProblems findings in check order.
	Problems []CheckProblem
	// ProblemsOmitted is how many findings did not fit in Problems.
	ProblemsOmitted int
}

// Clean reports whether the check found nothing wrong.
func (r *CheckResult) Clean() bool {
	return r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0
}

// Check rebuilds the refcounts of the qcow2 image r of imageSize bytes from
// its tables and compares them with the stored refcounts, as qemu's
// qcow2_check_refcounts does (qemu-img check without -r), counting in the
// same categories: corruptions, leaks and check errors.
//
// References counted: the header cluster, the active L1 table, every L2
// table and the host clusters its entries use (data, preallocated zero,
// every host cluster a compressed stream touches), the snapshot table and
// each snapshot's L1 and L2 tables and data, the refcount table and
// blocks, and the bitmap directory with each bitmap's table and data.
// COPIED flags of the active tables are checked against the stored
// refcounts.
//
// The error is nil unless reading r fails, or ReadHeader refuses the header
// (then it is ReadHeader's *ValidationError). Everything wrong inside the
// tables is counted in the result. Memory is one small counter per host
// cluster (images of more than MaxCheckClusters clusters are not walked:
// a check error) plus tables of at most a few MiB each; the bytes of tables
// read are bounded by a small multiple of the image size.
func Check(r io.ReaderAt, imageSize int64) (*CheckResult, error) {
	h, err := ReadHeader(r, imageSize)
	if err != nil {
		return nil, err
	}
	c := &checker{
		r:         r,
		h:         h,
		imageSize: imageSize,
		cs:        h.ClusterSize(),
		cb:        h.ClusterBits,
		res:       &CheckResult{},
		refMax:    math.MaxUint64 >> (64 - h.RefcountBits()),
		l2Uses:    map[l2Use]uint64{},
		budget:    checkReadBudget(imageSize),
	}
	if err := c.run(); err != nil {
		if errors.Is(err, errBudget) {
			c.checkError(-1, "the tables reference more than %d bytes of metadata in an image of %d bytes; the image is too inconsistent to check further", checkReadBudget(imageSize), imageSize)
			return c.res, nil
		}
		return nil, err
	}
	return c.res, nil
}

// checkReadBudget bounds the bytes of tables Check reads. Every table of a
// sound image lies in the image once; the active and snapshot walks and
// the COPIED pass read an L2 table at most three times. Reading more means
// a hostile web of references.
func checkReadBudget(imageSize int64) int64 {
	return 4*min(imageSize, math.MaxInt64/8) + 16<<20
}

// Masks qemu applies that reader.go does not need.
const (
	reftOffsetMask   = 0xffff_ffff_ffff_fe00
	reftReservedMask = 0x1ff
	l2BitmapAllAlloc = 0xffff_ffff // the allocation half of a subcluster bitmap
	// Bitmap directory and table limits (qemu's block/qcow2-bitmap.c).
	bitmapDirEntrySize       = 24
	bitmapMaxTableSize       = 0x8000000
	bitmapMaxPhysSize        = 0x20000000
	bitmapMinGranularityBits = 9
	bitmapMaxGranularityBits = 31
	bitmapMaxNameSize        = 1023
	bitmapReservedFlags      = 0xffff_fffc
	bitmapTypeDirtyTracking  = 1
	bitmapEntryReservedMask  = 0xff00_0000_0000_01fe
	bitmapEntryAllOnes       = 1
)

// errBudget stops a check whose tables make it read far more than the image.
var errBudget = errors.New("table read budget exhausted")

// l2Use keys the L2 tables to walk: each distinct table is walked once and
// its references counted as many times as L1 entries point at it, so a
// hostile image cannot make the walk quadratic.
type l2Use struct {
	offset uint64
	active bool // referenced from the active L1 table: counts allocated clusters
}

type checker struct {
	r         io.ReaderAt
	h         *Header
	imageSize int64
	cs        int64
	cb        uint32
	res       *CheckResult
	refMax    uint64 // largest refcount the image's width can hold

	nbClusters int64 // host clusters compared; grows by one for a last partial reference
	computed   *refcountArray
	stored     *storedRefcounts
	activeL1   []uint64
	l2Uses     map[l2Use]uint64
	budget     int64 // bytes of tables that may still be read
}

// problem records a finding n times in the counts and once in the list.
func (c *checker) problem(kind ProblemKind, n uint64, hostOffset int64, format string, args ...any) {
	if n == 0 {
		return
	}
	add := int(min(n, math.MaxInt32))
	switch kind {
	case ProblemCorruption:
		c.res.Corruptions += add
	case ProblemLeak:
		c.res.Leaks += add
	default:
		c.res.CheckErrors += add
	}
	if len(c.res.Problems) >= MaxCheckProblems {
		c.res.ProblemsOmitted++
		return
	}
	msg := fmt.Sprintf(format, args...)
	if n > 1 {
		msg += fmt.Sprintf(" (counted %d times: that many entries reference it)", n)
	}
	cluster := int64(-1)
	if hostOffset >= 0 {
		cluster = hostOffset >> c.cb
	} else {
		hostOffset = -1
	}
	c.res.Problems = append(c.res.Problems, CheckProblem{Kind: kind, HostOffset: hostOffset, Cluster: cluster, Message: msg})
}

func (c *checker) corruption(n uint64, hostOffset int64, format string, args ...any) {
	c.problem(ProblemCorruption, n, hostOffset, format, args...)
}

func (c *checker) checkError(hostOffset int64, format string, args ...any) {
	c.problem(ProblemCheckError, 1, hostOffset, format, args...)
}

func (c *checker) run() error {
	c.res.TotalClusters = int64((c.h.Size + uint64(c.cs) - 1) >> c.cb)
	nb := (c.imageSize + c.cs - 1) >> c.cb
	if nb > MaxCheckClusters {
		c.checkError(-1, "the image has %d clusters of %d bytes; volagent checks at most %d", nb, c.cs, MaxCheckClusters)
		return nil
	}
	c.nbClusters = nb
	c.computed = newRefcountArray(nb + 1) // a reference may reach one cluster past the end
	stored, err := c.loadStoredRefcounts()
	if err != nil {
		return err
	}
	c.stored = stored

	c.inc(0, c.cs, 1, "header cluster")
	if err := c.countActiveL1(); err != nil {
		return err
	}
	snapshotsSize, err := c.countSnapshots()
	if err != nil {
		return err
	}
	if err := c.countL2Tables(); err != nil {
		return err
	}
	c.inc(int64(c.h.SnapshotsOffset), snapshotsSize, 1, "snapshot table")
	c.inc(int64(c.h.RefcountTableOffset), int64(c.h.RefcountTableClusters)<<c.cb, 1, "refcount table")
	if err := c.countBitmaps(); err != nil {
		return err
	}
	c.countRefcountBlocks()
	if err := c.compareRefcounts(); err != nil {
		return err
	}
	return c.checkCopiedFlags()
}

// read reads len(p) bytes at off; bytes past the end of the image read as
// zeros, as qemu's block layer returns them. It returns how many bytes came
// from the image, charged to the budget.
func (c *checker) read(p []byte, off int64) (int, error) {
	clear(p)
	if off < 0 || off >= c.imageSize {
		return 0, nil
	}
	n := int(min(int64(len(p)), c.imageSize-off))
	if c.budget -= int64(n); c.budget < 0 {
		return 0, errBudget
	}
	if err := readFull(c.r, p[:n], off); err != nil {
		return 0, fmt.Errorf("reading %d bytes at %d: %w", n, off, err)
	}
	return n, nil
}

// readEntries reads a table of n big-endian uint64 entries at off. Entries
// past the end of the image read as zero, which references nothing, so
// only the entries inside the image are returned: a table a hostile header
// places past the end costs no memory.
func (c *checker) readEntries(off int64, n int64) ([]uint64, error) {
	if off < 0 || off >= c.imageSize {
		return nil, nil
	}
	n = min(n, (c.imageSize-off+7)/8)
	raw := make([]byte, n*8)
	if _, err := c.read(raw, off); err != nil {
		return nil, err
	}
	entries := make([]uint64, n)
	for i := range entries {
		entries[i] = binary.BigEndian.Uint64(raw[i*8:])
	}
	return entries, nil
}

// inc counts m references to every host cluster of [offset, offset+size),
// as qcow2_inc_refcounts_imrt: a region reaching a cluster or more past the
// end of the image is one corruption and counts nothing (the last cluster
// of an image may be partly written), and references beyond what the
// refcount width can hold are corruptions.
func (c *checker) inc(offset, size int64, m uint64, what string) {
	if size <= 0 || m == 0 {
		return
	}
	// Offsets come masked from tables (below 2^62) or from 64-bit header
	// fields (bitmaps), so guard the arithmetic before qemu's test.
	if offset < 0 || offset > math.MaxInt64-size || offset+size-c.imageSize >= c.cs {
		c.corruption(m, offset, "%s at %#x (%d bytes) reaches a cluster or more past the end of the image (%d bytes)", what, offset, size, c.imageSize)
		return
	}
	for k := offset >> c.cb; k <= (offset+size-1)>>c.cb; k++ {
		if k >= c.nbClusters {
			c.nbClusters = k + 1
		}
		if over := c.computed.add(k, m, c.refMax); over > 0 {
			c.corruption(over, k<<c.cb, "cluster %d (%s) has more references than a %d-bit refcount can hold", k, what, c.h.RefcountBits())
		}
	}
}

func (c *checker) countActiveL1() error {
	l1, err := c.readEntries(int64(c.h.L1TableOffset), int64(c.h.L1Size))
	if err != nil {
		return err
	}
	c.activeL1 = l1
	c.countL1(int64(c.h.L1TableOffset), l1, true, 1, "active L1 table")
	return nil
}

// countL1 counts an L1 table referenced m times, and queues its L2 tables.
func (c *checker) countL1(offset int64, l1 []uint64, active bool, m uint64, what string) {
	if len(l1) == 0 {
		return
	}
	c.inc(offset, int64(len(l1))*8, m, what)
	for i, e := range l1 {
		if e == 0 {
			continue
		}
		if e&l1ReservedMask != 0 {
			c.corruption(m, offset+int64(i)*8, "%s entry %d = %#016x has reserved bits %#x set", what, i, e, e&l1ReservedMask)
		}
		l2 := e & tableOffsetMask
		c.inc(int64(l2), c.cs, m, fmt.Sprintf("L2 table of %s entry %d", what, i))
		if int64(l2)%c.cs != 0 {
			c.corruption(m, int64(l2), "%s entry %d points at L2 table offset %#x, not aligned to the cluster size %d", what, i, l2, c.cs)
		}
		c.l2Uses[l2Use{l2, active}] += m
	}
}

// countSnapshots walks the snapshot table (ReadHeader validated its extent)
// and counts each distinct snapshot L1 table once per snapshot using it.
// It returns the size of the table as qemu computes it.
func (c *checker) countSnapshots() (int64, error) {
	type l1Ref struct {
		offset uint64
		size   uint32
	}
	uses := map[l1Ref]uint64{}
	var order []l1Ref
	start := int64(c.h.SnapshotsOffset)
	off := start
	var fixed [40]byte
	for i := uint32(0); i < c.h.NbSnapshots; i++ {
		off = (off + 7) &^ 7
		entryAt := off
		if _, err := c.read(fixed[:], off); err != nil {
			return 0, err
		}
		ref := l1Ref{binary.BigEndian.Uint64(fixed[0:]), binary.BigEndian.Uint32(fixed[8:])}
		idSize, nameSize := binary.BigEndian.Uint16(fixed[12:]), binary.BigEndian.Uint16(fixed[14:])
		extra := binary.BigEndian.Uint32(fixed[36:])
		off += 40 + int64(extra) + int64(idSize) + int64(nameSize)
		switch {
		case int64(ref.offset)%c.cs != 0 || ref.offset > math.MaxInt64:
			c.corruption(1, entryAt, "snapshot %d: L1 table offset %#x is not cluster aligned; snapshot table entry corrupted", i, ref.offset)
			continue
		case uint64(ref.size) > maxL1Bytes/8:
			c.corruption(1, entryAt, "snapshot %d: L1 table of %d entries is too large; snapshot table entry corrupted", i, ref.size)
			continue
		}
		if uses[ref] == 0 {
			order = append(order, ref)
		}
		uses[ref]++
	}
	for _, ref := range order {
		l1, err := c.readEntries(int64(ref.offset), int64(ref.size))
		if err != nil {
			return 0, err
		}
		c.countL1(int64(ref.offset), l1, false, uses[ref], fmt.Sprintf("snapshot L1 table at %#x", ref.offset))
	}
	return off - start, nil
}

// clusterType mirrors qcow2_get_cluster_type for an image without an
// external data file.
type clusterType uint8

const (
	clusterUnallocated clusterType = iota
	clusterZeroPlain
	clusterZeroAlloc
	clusterNormal
	clusterCompressed
)

func (c *checker) clusterType(e uint64) clusterType {
	switch {
	case e&l2Compressed != 0:
		return clusterCompressed
	case e&l2ZeroFlag != 0 && !c.h.ExtendedL2():
		if e&tableOffsetMask != 0 {
			return clusterZeroAlloc
		}
		return clusterZeroPlain
	case e&tableOffsetMask == 0:
		return clusterUnallocated
	}
	return clusterNormal
}

// readL2 reads the L2 table at offset; it returns only the entries that
// come from the image (the rest read as zeros, which reference nothing).
func (c *checker) readL2(offset uint64) ([]byte, error) {
	if offset >= uint64(c.imageSize) {
		return nil, nil
	}
	es := c.h.L2EntrySize()
	t := make([]byte, min(c.cs, (c.imageSize-int64(offset)+es-1)/es*es))
	if _, err := c.read(t, int64(offset)); err != nil {
		return nil, err
	}
	return t, nil
}

func (c *checker) l2Entry(t []byte, i int) (entry, bitmap uint64) {
	if c.h.ExtendedL2() {
		return binary.BigEndian.Uint64(t[i*16:]), binary.BigEndian.Uint64(t[i*16+8:])
	}
	return binary.BigEndian.Uint64(t[i*8:]), 0
}

func (c *checker) countL2Tables() error {
	keys := make([]l2Use, 0, len(c.l2Uses))
	for k := range c.l2Uses {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b l2Use) int {
		if a.offset != b.offset {
			return compareUint64(a.offset, b.offset)
		}
		if a.active == b.active {
			return 0
		}
		if a.active {
			return -1
		}
		return 1
	})
	for _, k := range keys {
		if err := c.countL2(k.offset, k.active, c.l2Uses[k]); err != nil {
			return err
		}
	}
	return nil
}

func compareUint64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// countL2 counts the references of the L2 table at offset, which m L1
// entries point at, as check_refcounts_l2 does.
func (c *checker) countL2(offset uint64, active bool, m uint64) error {
	t, err := c.readL2(offset)
	if err != nil {
		return err
	}
	es := int(c.h.L2EntrySize())
	for i := 0; i < len(t)/es; i++ {
		e, bitmap := c.l2Entry(t, i)
		if e == 0 && bitmap == 0 {
			continue
		}
		at := int64(offset) + int64(i*es) // where the entry lies
		typ := c.clusterType(e)
		if typ != clusterCompressed && e&l2ReservedMask != 0 {
			c.corruption(m, at, "L2 entry %d of the table at %#x = %#016x has reserved bits %#x set", i, offset, e, e&l2ReservedMask)
		}
		switch typ {
		case clusterCompressed:
			if e&l2Copied != 0 {
				c.corruption(m, at, "L2 entry %d of the table at %#x = %#016x: a compressed cluster has the COPIED flag set", i, offset, e)
				e &^= l2Copied
			}
			if bitmap != 0 {
				c.corruption(m, at, "L2 entry %d of the table at %#x: compressed cluster with a non-zero subcluster bitmap %#016x", i, offset, bitmap)
				continue
			}
			host, length := compressedDescriptor(e, c.cb)
			c.inc(int64(host), int64(length), m, fmt.Sprintf("compressed data of L2 entry %d of the table at %#x", i, offset))
			if active {
				c.res.AllocatedClusters += int64(m)
			}
		case clusterNormal, clusterZeroAlloc:
			host := int64(e & tableOffsetMask)
			if both := uint32(bitmap>>32) & uint32(bitmap); both != 0 {
				c.corruption(m, at, "L2 entry %d of the table at %#x: subclusters %#08x are marked both allocated and zero", i, offset, both)
			}
			if host%c.cs != 0 {
				c.corruption(m, at, "L2 entry %d of the table at %#x = %#016x: host offset %#x is not aligned to the cluster size %d", i, offset, e, host, c.cs)
			}
			if active {
				c.res.AllocatedClusters += int64(m)
			}
			c.inc(host, c.cs, m, fmt.Sprintf("data cluster of L2 entry %d of the table at %#x", i, offset))
		case clusterUnallocated:
			if bitmap&l2BitmapAllAlloc != 0 {
				c.corruption(m, at, "L2 entry %d of the table at %#x: unallocated cluster with subclusters %#08x marked allocated", i, offset, uint32(bitmap))
			}
		}
	}
	return nil
}

// countBitmaps counts the bitmap directory, each bitmap's table and its
// data clusters. Like qemu, bitmaps count only when the autoclear bit says
// the extension is consistent; otherwise their clusters are leaks.
func (c *checker) countBitmaps() error {
	b := c.h.Bitmaps
	if b == nil || !b.ConsistentWithAutoclear || b.NbBitmaps == 0 {
		return nil
	}
	dirOff := int64(b.BitmapDirectoryOffset)
	c.inc(dirOff, int64(b.BitmapDirectorySize), 1, "bitmap directory")
	// ReadHeader bounded the directory to qemu's 64 MiB and the image.
	dir := make([]byte, b.BitmapDirectorySize)
	if _, err := c.read(dir, dirOff); err != nil {
		return err
	}
	type table struct {
		offset uint64
		size   uint32
		name   string
	}
	var tables []table
	be := binary.BigEndian
	pos := 0
	for pos < len(dir) {
		if len(tables) >= int(b.NbBitmaps) {
			c.corruption(1, dirOff+int64(pos), "the bitmap directory holds more than the %d bitmaps the header extension names", b.NbBitmaps)
			return nil
		}
		if len(dir)-pos < bitmapDirEntrySize {
			c.corruption(1, dirOff+int64(pos), "bitmap directory entry %d runs past the directory", len(tables))
			return nil
		}
		e := dir[pos:]
		t := table{offset: be.Uint64(e[0:]), size: be.Uint32(e[8:])}
		flags, typ, granularity := be.Uint32(e[12:]), e[16], e[17]
		nameSize, extra := int(be.Uint16(e[18:])), int(be.Uint32(e[20:]))
		entryLen := (bitmapDirEntrySize + nameSize + extra + 7) &^ 7
		if extra > len(dir) || entryLen > len(dir)-pos {
			c.corruption(1, dirOff+int64(pos), "bitmap directory entry %d runs past the directory", len(tables))
			return nil
		}
		t.name = string(e[bitmapDirEntrySize+extra : bitmapDirEntrySize+extra+nameSize])
		bad := ""
		switch {
		case extra != 0:
			bad = "has extra data"
		case t.size == 0 || t.offset == 0 || t.offset%uint64(c.cs) != 0 || t.offset > math.MaxInt64:
			bad = fmt.Sprintf("has an invalid table (offset %#x, %d entries)", t.offset, t.size)
		case t.size > bitmapMaxTableSize || uint64(t.size)*uint64(c.cs) > bitmapMaxPhysSize:
			bad = fmt.Sprintf("has a table of %d entries, more than qemu allows", t.size)
		case granularity < bitmapMinGranularityBits || granularity > bitmapMaxGranularityBits:
			bad = fmt.Sprintf("has granularity bits %d", granularity)
		case flags&bitmapReservedFlags != 0:
			bad = fmt.Sprintf("has reserved flags %#x", flags&bitmapReservedFlags)
		case nameSize > bitmapMaxNameSize:
			bad = fmt.Sprintf("has a name of %d bytes", nameSize)
		case typ != bitmapTypeDirtyTracking:
			bad = fmt.Sprintf("has type %d", typ)
		}
		if bad != "" {
			c.corruption(1, dirOff+int64(pos), "bitmap %q %s; bitmaps not counted", t.name, bad)
			return nil
		}
		tables = append(tables, t)
		pos += entryLen
	}
	if len(tables) != int(b.NbBitmaps) {
		c.corruption(1, dirOff, "the bitmap directory holds %d bitmaps, the header extension names %d", len(tables), b.NbBitmaps)
		return nil
	}
	for _, t := range tables {
		c.inc(int64(t.offset), int64(t.size)*8, 1, fmt.Sprintf("table of bitmap %q", t.name))
		entries, err := c.readEntries(int64(t.offset), int64(t.size))
		if err != nil {
			return err
		}
		for i, e := range entries {
			off := e & tableOffsetMask
			if e&bitmapEntryReservedMask != 0 || (off != 0 && (e&bitmapEntryAllOnes != 0 || int64(off)%c.cs != 0)) {
				// qemu refuses to load the table and stops counting bitmaps.
				c.corruption(1, int64(t.offset)+int64(i)*8, "bitmap %q table entry %d = %#016x is invalid; remaining bitmaps not counted", t.name, i, e)
				return nil
			}
		}
		for i, e := range entries {
			if off := e & tableOffsetMask; off != 0 {
				c.inc(int64(off), c.cs, 1, fmt.Sprintf("data of bitmap %q entry %d", t.name, i))
			}
		}
	}
	return nil
}

// countRefcountBlocks counts the refcount blocks and checks the refcount
// table entries, as check_refblocks.
func (c *checker) countRefcountBlocks() {
	rtOff := int64(c.h.RefcountTableOffset)
	for i, e := range c.stored.table {
		at := rtOff + int64(i)*8
		off := e & reftOffsetMask
		switch {
		case e&reftReservedMask != 0:
			c.corruption(1, at, "refcount table entry %d = %#016x has reserved bits %#x set", i, e, e&reftReservedMask)
			continue
		case off%uint64(c.cs) != 0:
			c.corruption(1, at, "refcount table entry %d: refcount block offset %#x is not aligned to the cluster size %d", i, off, c.cs)
			continue
		case off>>c.cb >= uint64(c.nbClusters):
			c.corruption(1, at, "refcount table entry %d: refcount block at %#x is outside the image (%d bytes)", i, off, c.imageSize)
			continue
		case off == 0:
			continue
		}
		c.inc(int64(off), c.cs, 1, fmt.Sprintf("refcount block %d", i))
		if n := c.computed.get(int64(off >> c.cb)); n != 1 {
			c.corruption(1, int64(off), "refcount block %d at %#x has %d references; a refcount block must have exactly one", i, off, n)
		}
	}
}

// compareRefcounts compares the stored refcount of every host cluster with
// the references counted, and finds the image end.
func (c *checker) compareRefcounts() error {
	highest := int64(0)
	for k := int64(0); k < c.nbClusters; k++ {
		stored, ok, err := c.stored.get(k)
		if err != nil {
			return err
		}
		if !ok {
			c.checkError(k<<c.cb, "cannot read the refcount of cluster %d: its refcount block offset %#x is not aligned", k, c.stored.blockOffset(k))
			continue
		}
		computed := c.computed.get(k)
		if stored > 0 || computed > 0 {
			highest = k
		}
		switch {
		case stored < computed:
			c.corruption(1, k<<c.cb, "cluster %d (host offset %#x) has refcount %d but %d references", k, k<<c.cb, stored, computed)
		case stored > computed:
			c.problem(ProblemLeak, 1, k<<c.cb, "leaked cluster %d (host offset %#x): refcount %d but %d references", k, k<<c.cb, stored, computed)
		}
	}
	c.res.ImageEndOffset = (highest + 1) << c.cb
	return nil
}

// checkCopiedFlags checks that the active L1 and L2 entries carry COPIED
// exactly when the stored refcount of their cluster is 1, as qemu's
// check_oflag_copied. Each distinct L2 table is read once.
func (c *checker) checkCopiedFlags() error {
	perTable := map[uint64]uint64{} // L2 offset -> wrong data COPIED flags in it
	for i, e := range c.activeL1 {
		l2 := e & tableOffsetMask
		if l2 == 0 {
			continue
		}
		rc, ok, err := c.stored.get(int64(l2 >> c.cb))
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		if (rc == 1) != (e&l2Copied != 0) {
			c.corruption(1, int64(c.h.L1TableOffset)+int64(i)*8, "COPIED flag of active L1 entry %d = %#016x wrong for an L2 table with refcount %d", i, e, rc)
		}
		if n, seen := perTable[l2]; seen {
			if n > 0 {
				c.corruption(n, int64(l2), "the L2 table at %#x, referenced again by active L1 entry %d, has %d wrong COPIED flags", l2, i, n)
			}
			continue
		}
		n, err := c.checkCopiedL2(l2)
		if err != nil {
			return err
		}
		perTable[l2] = n
	}
	return nil
}

func (c *checker) checkCopiedL2(offset uint64) (uint64, error) {
	t, err := c.readL2(offset)
	if err != nil {
		return 0, err
	}
	var wrong uint64
	es := int(c.h.L2EntrySize())
	for i := 0; i < len(t)/es; i++ {
		e, _ := c.l2Entry(t, i)
		if typ := c.clusterType(e); typ != clusterNormal && typ != clusterZeroAlloc {
			continue
		}
		host := e & tableOffsetMask
		rc, ok, err := c.stored.get(int64(host >> c.cb))
		if err != nil {
			return 0, err
		}
		if !ok {
			continue
		}
		if (rc == 1) != (e&l2Copied != 0) {
			wrong++
			c.corruption(1, int64(offset)+int64(i*es), "COPIED flag of L2 entry %d of the table at %#x = %#016x wrong for a data cluster with refcount %d", i, offset, e, rc)
		}
	}
	return wrong, nil
}

// refcountArray holds one counter per host cluster in pages allocated on
// first use, so sparse images cost little. Counters are uint16; a counter
// of 0xffff means the count lives in large.
type refcountArray struct {
	pages [][]uint16
	large map[int64]uint64
}

const (
	refcountPageBits = 12 // 8 KiB pages: small images stay small
	refcountSpilled  = math.MaxUint16
)

func newRefcountArray(clusters int64) *refcountArray {
	return &refcountArray{pages: make([][]uint16, clusters>>refcountPageBits+1), large: map[int64]uint64{}}
}

func (a *refcountArray) get(k int64) uint64 {
	p := a.pages[k>>refcountPageBits]
	if p == nil {
		return 0
	}
	if v := p[k&(1<<refcountPageBits-1)]; v != refcountSpilled {
		return uint64(v)
	}
	return a.large[k]
}

// add adds m to counter k, saturating at limit; it returns how many of the
// m references did not fit.
func (a *refcountArray) add(k int64, m, limit uint64) (overflow uint64) {
	cur := a.get(k)
	if room := limit - cur; m > room {
		overflow, m = m-room, room
	}
	v := cur + m
	p := a.pages[k>>refcountPageBits]
	if p == nil {
		p = make([]uint16, 1<<refcountPageBits)
		a.pages[k>>refcountPageBits] = p
	}
	if v >= refcountSpilled {
		p[k&(1<<refcountPageBits-1)] = refcountSpilled
		a.large[k] = v
	} else {
		p[k&(1<<refcountPageBits-1)] = uint16(v)
	}
	return overflow
}

// storedRefcounts reads the refcounts the image stores, as
// qcow2_get_refcount: clusters past the refcount table or under a zero
// entry have refcount 0, and a refcount block past the end of the image
// reads as zeros.
type storedRefcounts struct {
	c          *checker
	table      []uint64
	order      uint32 // refcount_order
	blockBits  uint32 // log2 of the refcounts per block
	cache      map[uint64][]byte
	cacheBytes int64
	lastOffset uint64
	lastBlock  []byte
	zeroBlock  []byte
}

const maxRefblockCacheBytes = 16 << 20

func (c *checker) loadStoredRefcounts() (*storedRefcounts, error) {
	// ReadHeader bounded the table to qemu's 8 MiB and the image.
	n := int64(c.h.RefcountTableClusters) << c.cb / 8
	table, err := c.readEntries(int64(c.h.RefcountTableOffset), n)
	if err != nil {
		return nil, err
	}
	return &storedRefcounts{
		c:         c,
		table:     table,
		order:     c.h.RefcountOrder,
		blockBits: c.cb + 3 - c.h.RefcountOrder,
		cache:     map[uint64][]byte{},
	}, nil
}

func (s *storedRefcounts) blockOffset(k int64) uint64 {
	i := uint64(k) >> s.blockBits
	if i >= uint64(len(s.table)) {
		return 0
	}
	return s.table[i] & reftOffsetMask
}

// get returns the stored refcount of cluster k; ok is false when it cannot
// be read because the block offset is not cluster aligned (qemu: -EIO).
func (s *storedRefcounts) get(k int64) (refcount uint64, ok bool, err error) {
	off := s.blockOffset(k)
	if off == 0 {
		return 0, true, nil
	}
	if off%uint64(s.c.cs) != 0 || off > math.MaxInt64-uint64(s.c.cs) {
		return 0, false, nil
	}
	block, err := s.block(off)
	if err != nil {
		return 0, false, err
	}
	return refcountAt(block, uint64(k)&(1<<s.blockBits-1), s.order), true, nil
}

func (s *storedRefcounts) block(off uint64) ([]byte, error) {
	if off == s.lastOffset && s.lastBlock != nil {
		return s.lastBlock, nil
	}
	if off >= uint64(s.c.imageSize) {
		// Past the end: zeros, shared rather than allocated per block.
		if s.zeroBlock == nil {
			s.zeroBlock = make([]byte, s.c.cs)
		}
		return s.zeroBlock, nil
	}
	b, ok := s.cache[off]
	if !ok {
		b = make([]byte, s.c.cs)
		if _, err := s.c.read(b, int64(off)); err != nil {
			return nil, err
		}
		if s.cacheBytes+s.c.cs > maxRefblockCacheBytes {
			clear(s.cache) // simple and bounded; refcount blocks are read mostly in order
			s.cacheBytes = 0
		}
		s.cache[off] = b
		s.cacheBytes += s.c.cs
	}
	s.lastOffset, s.lastBlock = off, b
	return b, nil
}

// refcountAt extracts entry i of a refcount block with 2^order-bit entries.
// Sub-byte entries are packed from the least significant bit, as qemu does.
func refcountAt(block []byte, i uint64, order uint32) uint64 {
	switch order {
	case 0:
		return uint64(block[i/8]>>(i%8)) & 1
	case 1:
		return uint64(block[i/4]>>(2*(i%4))) & 3
	case 2:
		return uint64(block[i/2]>>(4*(i%2))) & 15
	case 3:
		return uint64(block[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(block[2*i:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(block[4*i:]))
	}
	return binary.BigEndian.Uint64(block[8*i:])
}
