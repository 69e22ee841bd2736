package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// maxWriteBatch bounds one allocating data request (and its bounce buffer).
const maxWriteBatch = 16 << 20

// metadataFlushBytes is how much newly allocated data a Writer lets
// accumulate before it writes the held table updates on its own, so a
// crash in a long stream of writes leaks at most about this much.
const metadataFlushBytes = 256 << 20

// maxL2CacheBytesWriter bounds the writer's L2 tables in memory; dirty
// ones are written (after a barrier) when the cache is full.
const maxL2CacheBytesWriter = 32 << 20

// Extended L2 bitmaps: all 32 subclusters allocated, or all zero.
const (
	allSubclustersAllocated = 0x0000_0000_ffff_ffff
	allSubclustersZero      = 0xffff_ffff_0000_0000
)

// WriterOptions describe the container a Writer writes into.
type WriterOptions struct {
	// BlockSize is the logical block size of the device (BLKSSZGET) or the
	// file's direct I/O alignment: a power of two from 512 to 64 KiB.
	// Required; Target.BlockSize has it.
	BlockSize int
	// Backing is the guest view of the backing file the image names (nil
	// when it names none). The Writer owns it after a successful open.
	Backing Disk
	// ContainerSize bounds the image: the size of the block device. 0 means
	// unbounded (a regular file that grows).
	ContainerSize int64
}

// Writer writes guest data into a qcow2 image with O_DIRECT-friendly
// requests, keeping the image consistent on the device at every instant:
// refcounts reach the device before any table entry that references them,
// a new L2 table before the L1 entry pointing at it, data before the L2
// entry mapping it, each dependency separated by a device flush. L2 and L1
// updates are held in memory and written by Flush (or when the cache is
// full), so a stream of writes costs data requests only.
//
// A Writer is not safe for concurrent use. After an I/O error it refuses
// further writes (ErrWriterFailed); the device then holds a consistent
// image with leaked clusters at worst.
type Writer struct {
	io    *blockIO
	img   *Image // header, entry validation, backing and compressed reads
	h     *Header
	c     int64
	cbits uint32
	ext   bool
	esize int64 // L2 entry size
	size  int64

	prepared  bool
	imageSize int64 // size of the container when opened

	l1       []byte // the whole L1 table, aligned
	l1Offset int64
	l1Dirty  map[int64]bool // dirty logical blocks of l1
	l2       map[int64]*l2Table
	l2Max    int
	dirtyL2  int

	refs        *refcounts
	pendingFree [][2]int64 // cluster runs {start, n} to free once no table references them
	unmapped    int64      // bytes allocated since the last metadata flush
	scratch     []byte     // reused bounce buffer of allocating writes

	err    error
	closed bool
}

type l2Table struct {
	buf   []byte
	dirty bool
}

// OpenWriter opens the qcow2 image on dev (whose current size is
// imageSize) for writing.
//
// Results, case by case:
//   - a header that breaks a rule: ReadHeader's *ValidationError;
//   - features the writer does not handle, as a *FieldError wrapping
//     ErrUnsupported: the dirty bit (lazy refcounts left stale: run
//     qemu-img check -r all first), internal snapshots (shared clusters);
//   - a backing mismatch: as OpenImage;
//   - an I/O error: that error.
//
// Lazy refcounts (a compatible bit) need no action: the writer keeps
// refcounts exact and never sets the dirty bit. Autoclear bits are
// cleared with one header write before the first change (volagent does
// not update bitmaps, so they must not be trusted afterwards).
func OpenWriter(dev Device, imageSize int64, opts WriterOptions) (*Writer, error) {
	return openWriter(dev, imageSize, opts)
}

// openWriter is OpenWriter with options for the image underneath (Resize
// opens it WithoutBacking: it reads no guest data).
func openWriter(dev Device, imageSize int64, opts WriterOptions, imgOpts ...ImageOption) (*Writer, error) {
	bs := int64(opts.BlockSize)
	if bs < 512 || bs > maxBlockSize || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("qcow2: block size %d: must be a power of two from 512 to %d", bs, maxBlockSize)
	}
	if opts.ContainerSize < 0 || opts.ContainerSize%bs != 0 && opts.ContainerSize > 0 {
		return nil, fmt.Errorf("qcow2: container size %d: must be a multiple of the block size %d", opts.ContainerSize, bs)
	}
	if opts.ContainerSize > 0 && imageSize > opts.ContainerSize {
		return nil, fmt.Errorf("qcow2: image size %d exceeds the container size %d", imageSize, opts.ContainerSize)
	}
	bio := &blockIO{dev: dev, bs: bs, limit: opts.ContainerSize}
	h, err := ReadHeader(alignedReader{bio}, imageSize)
	if err != nil {
		return nil, err
	}
	switch {
	case h.Dirty():
		return nil, fieldErr(ErrUnsupported, "incompatible_features", hex(h.IncompatibleFeatures), "the dirty bit is set, so the refcounts may be stale; run qemu-img check -r all on the image first")
	case h.NbSnapshots > 0:
		return nil, fieldErr(ErrUnsupported, "nb_snapshots", h.NbSnapshots, "images with internal snapshots share clusters; volagent does not write them")
	}
	img, err := newImage(alignedReader{bio}, h, opts.Backing, imgOpts...)
	if err != nil {
		return nil, err
	}
	w := &Writer{
		io: bio, img: img, h: h,
		c: h.ClusterSize(), cbits: h.ClusterBits, ext: h.ExtendedL2(), esize: h.L2EntrySize(),
		size: int64(h.Size), imageSize: imageSize,
		l1Offset: int64(h.L1TableOffset),
		l1Dirty:  map[int64]bool{},
		l2:       map[int64]*l2Table{},
	}
	w.l2Max = int(max(4, maxL2CacheBytesWriter/w.c))
	w.l1 = alignedBuffer(int(ceilDiv(int64(h.L1Size)*8, w.c)*w.c), int(bs))
	if err := bio.readAt(w.l1, w.l1Offset); err != nil {
		return nil, fmt.Errorf("reading the L1 table at %d: %w", w.l1Offset, err)
	}
	if w.refs, err = newRefcounts(bio, w, h, int(bs), opts.ContainerSize); err != nil {
		return nil, err
	}
	w.grew() // the scan ran before w.refs was set
	return w, nil
}

// Header returns the image header (refcount table fields follow growth).
func (w *Writer) Header() *Header { return w.h }

// Size is the virtual size in bytes.
func (w *Writer) Size() int64 { return w.size }

// HighestAllocated is the end of the highest host cluster the image uses
// (or has reserved): the container must be at least this big. It never
// decreases while the Writer is open.
func (w *Writer) HighestAllocated() int64 { return w.refs.end << w.cbits }

// hostBound is the host offset below which table entries must lie.
func (w *Writer) hostBound() int64 {
	if w.io.limit > 0 {
		return w.io.limit
	}
	end := int64(0)
	if w.refs != nil {
		end = w.refs.end << w.cbits
	}
	return max(w.imageSize, end)
}

// grew lets the reader's entry checks accept clusters the file grew by.
func (w *Writer) grew() { w.img.imageSize = w.hostBound() }

// writeHeader writes p over the header bytes at off. Only those bytes are
// written (the device block around them keeps its current bytes: with
// clusters smaller than the block, it holds other structures too).
func (w *Writer) writeHeader(p []byte, off int64) error {
	if err := w.io.writeAt(p, off); err != nil {
		return fmt.Errorf("updating the header: %w", err)
	}
	return w.io.sync()
}

// moveRefcountTable switches the header to a new refcount table: offset
// and cluster count are adjacent, so one write inside one sector makes
// the switch atomic.
func (w *Writer) moveRefcountTable(off int64, n uint32) error {
	var p [offNbSnapshots - offRefcountTableOffset]byte
	binary.BigEndian.PutUint64(p[:], uint64(off))
	binary.BigEndian.PutUint32(p[offRefcountTableClusters-offRefcountTableOffset:], n)
	if err := w.writeHeader(p[:], offRefcountTableOffset); err != nil {
		return err
	}
	w.h.RefcountTableOffset, w.h.RefcountTableClusters = uint64(off), n
	return nil
}

// fail records an I/O failure; allocation failures that wrote nothing
// (no space) leave the Writer usable.
func (w *Writer) fail(err error) error {
	var se *spaceError
	if err != nil && !errors.As(err, &se) && !IsRefusal(err) {
		w.err = err
	}
	return err
}

func (w *Writer) usable() error {
	switch {
	case w.closed:
		return errors.New("qcow2: writer is closed")
	case w.err != nil:
		return fmt.Errorf("%w: %w", ErrWriterFailed, w.err)
	}
	return nil
}

// prepare clears the autoclear bits before the first change.
func (w *Writer) prepare() error {
	if w.prepared {
		return nil
	}
	if w.h.Version >= 3 && w.h.AutoclearFeatures != 0 {
		if err := w.writeHeader(make([]byte, 8), offAutoclearFeatures); err != nil {
			return err
		}
		w.h.AutoclearFeatures = 0
	}
	w.prepared = true
	return nil
}

func (w *Writer) checkRange(op string, off, n int64) error {
	if off < 0 || n < 0 || off > w.size || n > w.size-off {
		return fmt.Errorf("qcow2: %s of %d bytes at guest offset %d: outside the virtual disk of %d bytes", op, n, off, w.size)
	}
	return nil
}

// --- L1 and L2 tables ---

func (w *Writer) l2Coords(ci int64) (l1i, l2i int64) {
	perL2 := w.c / w.esize
	return ci / perL2, ci % perL2
}

// l2ForRead returns the L2 table of L1 entry l1i, nil when there is none.
// The slice is valid until the next table is loaded.
func (w *Writer) l2ForRead(l1i int64) (*l2Table, error) {
	l1e := binary.BigEndian.Uint64(w.l1[l1i*8:])
	guest := l1i * (w.c / w.esize) << w.cbits
	if l1e&l1ReservedMask != 0 {
		return nil, corruptEntry("L1 entry", guest, l1e, "reserved bits %#x are set", l1e&l1ReservedMask)
	}
	off := int64(l1e & tableOffsetMask)
	if off == 0 {
		if l1e != 0 {
			return nil, corruptEntry("L1 entry", guest, l1e, "flags set on an entry without an L2 table")
		}
		return nil, nil
	}
	switch {
	case off%w.c != 0:
		return nil, corruptEntry("L1 entry", guest, l1e, "L2 table offset %d is not aligned to the cluster size %d", off, w.c)
	case off < w.c:
		return nil, corruptEntry("L1 entry", guest, l1e, "L2 table at %d lies in the header cluster", off)
	case off > w.hostBound()-w.c:
		return nil, corruptEntry("L1 entry", guest, l1e, "L2 table at %d ends past the end of the image (%d bytes)", off, w.hostBound())
	}
	if t, ok := w.l2[off]; ok {
		return t, nil
	}
	rc, err := w.refs.refcount(off >> w.cbits)
	if err != nil {
		return nil, err
	}
	switch {
	case rc == 0:
		return nil, corruptEntry("L1 entry", guest, l1e, "the L2 table at %d has refcount 0", off)
	case rc > 1:
		return nil, fieldErr(ErrUnsupported, fmt.Sprintf("L1 entry for guest offset %d", guest), fmt.Sprintf("%#016x", l1e), "the L2 table at %d is shared (refcount %d); volagent does not write images with shared tables", off, rc)
	}
	if err := w.makeRoomForL2(); err != nil {
		return nil, err
	}
	t := &l2Table{buf: alignedBuffer(int(w.c), int(w.io.bs))}
	if err := w.io.readAt(t.buf, off); err != nil {
		return nil, fmt.Errorf("reading the L2 table at %d: %w", off, err)
	}
	w.l2[off] = t
	if l1e&l2Copied == 0 { // refcount 1 means COPIED; repair the flag
		w.setL1(l1i, l1e|l2Copied)
	}
	return t, nil
}

// l2ForWrite returns the L2 table of L1 entry l1i, allocating an empty one
// if there is none. A new table is written whole by the next metadata
// flush, before the L1 entry that points at it.
func (w *Writer) l2ForWrite(l1i int64) (*l2Table, error) {
	t, err := w.l2ForRead(l1i)
	if t != nil || err != nil {
		return t, err
	}
	if err := w.makeRoomForL2(); err != nil {
		return nil, err
	}
	off, err := w.refs.allocate(1)
	if err != nil {
		return nil, err
	}
	t = &l2Table{buf: alignedBuffer(int(w.c), int(w.io.bs)), dirty: true}
	w.l2[off] = t
	w.dirtyL2++
	w.setL1(l1i, uint64(off)|l2Copied)
	return t, nil
}

func (w *Writer) setL1(l1i int64, e uint64) {
	binary.BigEndian.PutUint64(w.l1[l1i*8:], e)
	w.l1Dirty[l1i*8/w.io.bs] = true
}

// makeRoomForL2 evicts a clean table, writing the dirty ones first when
// none is clean.
func (w *Writer) makeRoomForL2() error {
	if len(w.l2) < w.l2Max {
		return nil
	}
	if w.dirtyL2 == len(w.l2) {
		if err := w.flushMetadata(); err != nil {
			return err
		}
	}
	for off, t := range w.l2 {
		if !t.dirty {
			delete(w.l2, off)
			return nil
		}
	}
	return nil
}

func (w *Writer) getEntry(t *l2Table, l2i int64) (entry, bitmap uint64) {
	p := t.buf[l2i*w.esize:]
	entry = binary.BigEndian.Uint64(p)
	if w.ext {
		bitmap = binary.BigEndian.Uint64(p[8:])
	}
	return entry, bitmap
}

func (w *Writer) setEntry(t *l2Table, l2i int64, entry, bitmap uint64) {
	p := t.buf[l2i*w.esize:]
	binary.BigEndian.PutUint64(p, entry)
	if w.ext {
		binary.BigEndian.PutUint64(p[8:], bitmap)
	}
	if !t.dirty {
		t.dirty = true
		w.dirtyL2++
	}
}

// lookup returns the L2 entry of guest cluster ci (zero when unmapped).
func (w *Writer) lookup(ci int64) (entry, bitmap uint64, err error) {
	l1i, l2i := w.l2Coords(ci)
	t, err := w.l2ForRead(l1i)
	if t == nil || err != nil {
		return 0, 0, err
	}
	entry, bitmap = w.getEntry(t, l2i)
	return entry, bitmap, nil
}

// mapAt is Image.Map over the writer's own (possibly newer) tables, with
// the reader's validation of every entry.
func (w *Writer) mapAt(guestOff int64) (Mapping, error) {
	ci := guestOff >> w.cbits
	inCluster := guestOff & (w.c - 1)
	clusterEnd := min(guestOff-inCluster+w.c, w.size)
	entry, bitmap, err := w.lookup(ci)
	if err != nil {
		return Mapping{}, err
	}
	if w.ext {
		return w.img.mapExtended(guestOff, inCluster, clusterEnd, entry, bitmap)
	}
	return w.img.mapStandard(guestOff, inCluster, clusterEnd, entry)
}

// Map reports how the guest byte at guestOff is stored now, as Image.Map.
func (w *Writer) Map(guestOff int64) (Mapping, error) {
	if err := w.checkRange("map", guestOff, 1); err != nil {
		return Mapping{}, err
	}
	return w.mapAt(guestOff)
}

// clusterState says how a write can treat a guest cluster.
type clusterState struct {
	entry, bitmap uint64
	host          int64 // the host cluster of a data cluster written in place
	// inPlace: the host cluster has refcount 1 and is written in place.
	// Without extended L2 that means a whole data cluster; with them, any
	// uncompressed cluster with a host cluster (its subclusters may be
	// unallocated or zero).
	inPlace bool
	full    bool // inPlace, and the whole cluster reads its host data
}

// fresh: the cluster has no host cluster (unallocated or zero), so with
// extended L2 a write allocates one and marks only the subclusters it
// touches.
func (st clusterState) fresh() bool {
	return st.entry&l2Compressed == 0 && st.entry&tableOffsetMask == 0
}

func (w *Writer) state(ci int64) (clusterState, error) {
	entry, bitmap, err := w.lookup(ci)
	if err != nil {
		return clusterState{}, err
	}
	st := clusterState{entry: entry, bitmap: bitmap}
	guest := ci << w.cbits
	end := min(guest+w.c, w.size)
	var m Mapping
	if w.ext {
		m, err = w.img.mapExtended(guest, 0, end, entry, bitmap)
	} else {
		m, err = w.img.mapStandard(guest, 0, end, entry)
	}
	if err != nil {
		return clusterState{}, err
	}
	full := m.Kind == MapData && m.Length == end-guest
	switch {
	case w.ext && (entry&l2Compressed != 0 || entry&tableOffsetMask == 0):
		return st, nil // compressed, or no host cluster
	case !w.ext && !full:
		return st, nil // zero, unallocated or compressed
	}
	host := int64(entry & tableOffsetMask)
	rc, err := w.refs.refcount(host >> w.cbits)
	if err != nil {
		return clusterState{}, err
	}
	if rc == 0 {
		return clusterState{}, corruptEntry("L2 entry", guest, entry, "data cluster at host offset %d has refcount 0", host)
	}
	if rc == 1 {
		st.host, st.inPlace, st.full = host, true, full
	}
	return st, nil
}

// touchedSubclusters is the mask of the subclusters of the cluster at cs
// that guest bytes [from, to) touch.
func (w *Writer) touchedSubclusters(cs, from, to int64) uint64 {
	sub := w.c / subclusters
	a, b := (from-cs)/sub, (to-1-cs)/sub
	return (uint64(1)<<(b+1) - 1) &^ (uint64(1)<<a - 1)
}

// readGuest fills dst with the current guest view at off; bytes past the
// end of the disk read as zeros.
func (w *Writer) readGuest(dst []byte, off int64) error {
	end := off + int64(len(dst))
	for pos := off; pos < min(end, w.size); {
		m, err := w.mapAt(pos)
		if err != nil {
			return err
		}
		d := dst[pos-off : min(pos+m.Length, end)-off]
		switch m.Kind {
		case MapData:
			err = w.io.readAt(d, m.HostOffset)
		case MapZero:
			clear(d)
		case MapUnallocated:
			err = w.img.readBacking(d, pos)
		case MapCompressed:
			err = w.img.readCompressed(d, m)
		}
		if err != nil {
			return err
		}
		pos += int64(len(d))
	}
	if end > w.size {
		clear(dst[max(0, w.size-off):])
	}
	return nil
}

// writeSubclusters writes into cluster ci (extended L2, a host cluster
// with refcount 1) in place: the subclusters p touches become allocated;
// a partial edge subcluster that was not allocated is completed from the
// current guest view (backing or zeros) first.
func (w *Writer) writeSubclusters(p []byte, off int64, ci int64, st clusterState) (int, error) {
	cs := ci << w.cbits
	n := min(int64(len(p)), cs+w.c-off)
	sub := w.c / subclusters
	touched := w.touchedSubclusters(cs, off, off+n)
	allocated := st.bitmap & allSubclustersAllocated
	lo, hi := off, off+n
	if (off-cs)%sub != 0 && allocated&(1<<((off-cs)/sub)) == 0 {
		lo = alignDown(off, sub)
	}
	if (off+n-cs)%sub != 0 && allocated&(1<<((off+n-1-cs)/sub)) == 0 {
		hi = alignUp(off+n, sub)
	}
	buf := p[:n]
	if lo != off || hi != off+n {
		buf = w.scratchBuffer(hi - lo)
		if err := w.readGuest(buf[:off-lo], lo); err != nil {
			return 0, err
		}
		if err := w.readGuest(buf[off+n-lo:], off+n); err != nil {
			return 0, err
		}
		copy(buf[off-lo:], p[:n])
	}
	if err := w.io.writeAt(buf, st.host+lo-cs); err != nil {
		return 0, err
	}
	bitmap := st.bitmap&^(touched<<32) | touched
	if bitmap != st.bitmap || st.entry&l2Copied == 0 {
		if err := w.setMapping(ci, st.entry|l2Copied, bitmap); err != nil {
			return int(n), err
		}
	}
	return int(n), nil
}

// oldClusters are the host clusters an entry holds, to free once the entry
// no longer references them.
func (w *Writer) oldClusters(entry uint64) (start, n int64) {
	if entry&l2Compressed != 0 {
		host, area := compressedDescriptor(entry, w.cbits)
		first := int64(host&^(compressedSectorSize-1)) >> w.cbits
		last := int64(host+area-1) >> w.cbits
		return first, last - first + 1
	}
	if host := int64(entry & tableOffsetMask); host != 0 {
		return host >> w.cbits, 1
	}
	return 0, 0
}

func (w *Writer) freeLater(entry uint64) {
	if s, n := w.oldClusters(entry); n > 0 {
		w.pendingFree = append(w.pendingFree, [2]int64{s, n})
	}
}

// --- writes ---

// WriteAt writes p at guest offset off. Clusters this image owns alone are
// overwritten in place; others (unallocated, zero, compressed, shared) get
// new clusters, written whole in one request per run, with the bytes p
// does not cover copied from the current guest view (the backing chain,
// compressed clusters included). It returns len(p) and nil, or how many
// bytes were written before an error. Errors: a range outside the disk;
// ErrNoSpace when the container is full (the Writer stays usable); an I/O
// error (the Writer stops).
func (w *Writer) WriteAt(p []byte, off int64) (int, error) {
	if err := w.usable(); err != nil {
		return 0, err
	}
	if err := w.checkRange("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := w.prepare(); err != nil {
		return 0, w.fail(err)
	}
	done := 0
	for done < len(p) {
		n, err := w.writeRun(p[done:], off+int64(done))
		done += n
		if err != nil {
			return done, w.fail(err)
		}
	}
	return done, nil
}

func (w *Writer) writeRun(p []byte, off int64) (int, error) {
	ci := off >> w.cbits
	st, err := w.state(ci)
	if err != nil {
		return 0, err
	}
	if !st.inPlace {
		return w.writeAllocating(p, off, st)
	}
	if w.ext {
		cs := ci << w.cbits
		touched := w.touchedSubclusters(cs, off, min(off+int64(len(p)), cs+w.c))
		if st.bitmap&touched != touched || st.bitmap&(touched<<32) != 0 {
			return w.writeSubclusters(p, off, ci, st)
		}
	}
	// Overwrite in place, extending over host-contiguous clusters.
	host := st.host + off&(w.c-1)
	run := []clusterState{st}
	n := min(int64(len(p)), (ci+1)<<w.cbits-off)
	for n < int64(len(p)) && n < maxWriteBatch {
		next, err := w.state(ci + 1)
		if err != nil || !next.full || next.host != st.host+w.c {
			break
		}
		ci, st = ci+1, next
		run = append(run, st)
		n = min(int64(len(p)), (ci+1)<<w.cbits-off)
	}
	if err := w.io.writeAt(p[:n], host); err != nil {
		return 0, err
	}
	// Refcount 1 means COPIED; repair a flag another tool left clear.
	first := off >> w.cbits
	for i, st := range run {
		if st.entry&l2Copied == 0 {
			if err := w.setMapping(first+int64(i), st.entry|l2Copied, st.bitmap); err != nil {
				return int(n), err
			}
		}
	}
	return int(n), nil
}

// writeAllocating writes a run of clusters that need new host clusters,
// starting with the cluster of off (whose state is first).
func (w *Writer) writeAllocating(p []byte, off int64, first clusterState) (int, error) {
	ci0 := off >> w.cbits
	lastCluster := (off + int64(len(p)) - 1) >> w.cbits
	states := []clusterState{first}
	for ci := ci0 + 1; ci <= lastCluster && int64(len(states)) < max(1, int64(maxWriteBatch)>>w.cbits); ci++ {
		st, err := w.state(ci)
		if err != nil {
			return 0, err
		}
		if st.inPlace {
			break
		}
		states = append(states, st)
	}
	n := int64(len(states))
	// L2 tables first, so the data clusters that follow are contiguous.
	for l1i := range w.l1Span(ci0, n) {
		if _, err := w.l2ForWrite(l1i); err != nil {
			return 0, err
		}
	}
	host, err := w.refs.allocate(n)
	if err != nil {
		return 0, err
	}
	base := ci0 << w.cbits
	runEnd := (ci0 + n) << w.cbits
	covered := min(off+int64(len(p)), runEnd) - off
	// With extended L2, a cluster without a host cluster gets only the
	// subclusters the write touches; others are copied whole.
	lo, hi := base, runEnd
	sub := w.c / subclusters
	if w.ext && states[0].fresh() {
		lo = alignDown(off, sub)
	}
	if w.ext && states[n-1].fresh() {
		hi = alignUp(off+covered, sub)
	}
	var buf []byte
	if lo == off && hi == off+covered && isAligned(p[:covered], 0, w.io.bs) {
		buf = p[:covered] // whole clusters from an aligned buffer: no copy
	} else {
		buf = w.scratchBuffer(hi - lo)
		err := w.readGuest(buf[:off-lo], lo)
		if err == nil {
			err = w.readGuest(buf[off+covered-lo:], off+covered)
		}
		if err != nil {
			w.pendingFree = append(w.pendingFree, [2]int64{host >> w.cbits, n})
			return 0, err
		}
		copy(buf[off-lo:], p[:covered])
	}
	if err := w.io.writeAt(buf, host+lo-base); err != nil {
		return 0, err
	}
	for i, st := range states {
		var bitmap uint64
		if w.ext {
			cs := base + int64(i)*w.c
			bitmap = allSubclustersAllocated
			if st.fresh() {
				touched := w.touchedSubclusters(cs, max(lo, cs), min(hi, cs+w.c))
				bitmap = st.bitmap&^(touched<<32) | touched
			}
		}
		if err := w.setMapping(ci0+int64(i), uint64(host+int64(i)*w.c)|l2Copied, bitmap); err != nil {
			return 0, err
		}
		w.freeLater(st.entry)
	}
	if w.unmapped += n * w.c; w.unmapped >= metadataFlushBytes {
		if err := w.flushMetadata(); err != nil {
			return int(covered), err
		}
	}
	return int(covered), nil
}

// scratchBuffer returns an aligned buffer of n bytes, reused between
// writes so that small copy-on-write requests do not churn the heap.
func (w *Writer) scratchBuffer(n int64) []byte {
	if int64(len(w.scratch)) < n {
		w.scratch = alignedBuffer(int(n), int(max(w.io.bs, 4096)))
	}
	return w.scratch[:n]
}

// l1Span yields the L1 indices of clusters [ci, ci+n).
func (w *Writer) l1Span(ci, n int64) func(func(int64) bool) {
	return func(yield func(int64) bool) {
		first, _ := w.l2Coords(ci)
		last, _ := w.l2Coords(ci + n - 1)
		for l1i := first; l1i <= last; l1i++ {
			if !yield(l1i) {
				return
			}
		}
	}
}

func (w *Writer) setMapping(ci int64, entry, bitmap uint64) error {
	l1i, l2i := w.l2Coords(ci)
	t, err := w.l2ForWrite(l1i)
	if err != nil {
		return err
	}
	w.setEntry(t, l2i, entry, bitmap)
	return nil
}

// readsZeros reports whether guest bytes [from, to) of one cluster read as
// zeros by their mapping (zero clusters, or unallocated with nothing
// below), without reading data.
func (w *Writer) readsZeros(from, to int64) (bool, error) {
	for pos := from; pos < to; {
		m, err := w.mapAt(pos)
		if err != nil {
			return false, err
		}
		switch m.Kind {
		case MapZero:
		case MapUnallocated:
			if b := w.img.backing; b != nil && pos < b.Size() {
				return false, nil
			}
		default:
			return false, nil
		}
		pos += m.Length
	}
	return true, nil
}

// zeroEntry is the L2 entry that makes a whole cluster read zeros without
// data, and false when the image cannot express it (version 2 with a
// backing file).
func (w *Writer) zeroEntry(ci int64) (entry, bitmap uint64, ok bool) {
	switch b := w.img.backing; {
	case b == nil || ci<<w.cbits >= b.Size():
		return 0, 0, true
	case w.ext:
		return 0, allSubclustersZero, true
	case w.h.Version >= 3:
		return l2ZeroFlag, 0, true
	}
	return 0, 0, false
}

// WriteZeroes makes guest bytes [off, off+n) read as zeros. Whole clusters
// become zero clusters (the zero flag, all subcluster zero bits with
// extended L2, or unallocated when nothing lies below) and free their host
// clusters; no data is written. Ranges that already read as zeros are left
// alone. Partial clusters, and whole ones in a version 2 image with a
// backing file, are written with zero data.
func (w *Writer) WriteZeroes(off, n int64) error {
	if err := w.usable(); err != nil {
		return err
	}
	if err := w.checkRange("write-zeroes", off, n); err != nil {
		return err
	}
	if err := w.prepare(); err != nil {
		return w.fail(err)
	}
	for pos, end := off, off+n; pos < end; {
		ci := pos >> w.cbits
		cs := ci << w.cbits
		segEnd := min(end, cs+w.c, w.size)
		already, err := w.readsZeros(pos, segEnd)
		if err != nil {
			return w.fail(err)
		}
		entry, bitmap, canZero := w.zeroEntry(ci)
		switch {
		case already:
		case pos == cs && segEnd == min(cs+w.c, w.size) && canZero:
			old, _, err := w.lookup(ci)
			if err != nil {
				return w.fail(err)
			}
			if err := w.setMapping(ci, entry, bitmap); err != nil {
				return w.fail(err)
			}
			w.freeLater(old)
		default:
			done, err := w.zeroSubclusters(ci, pos, segEnd)
			if err != nil {
				return err
			}
			if !done {
				if err := w.writeZeroData(pos, segEnd); err != nil {
					return err
				}
			}
		}
		pos = segEnd
	}
	return nil
}

// writeZeroData writes zeros over [from, to) of one cluster unless the
// range reads zeros already.
func (w *Writer) writeZeroData(from, to int64) error {
	if from >= to {
		return nil
	}
	if already, err := w.readsZeros(from, to); err != nil || already {
		return w.fail(err)
	}
	zeros := make([]byte, to-from)
	_, err := w.WriteAt(zeros, from)
	return err
}

// zeroSubclusters handles a partial-cluster zero write with extended L2
// entries: the whole subclusters inside [from, to) get their zero bits
// (and lose their allocation bits; the host cluster stays), the bytes at
// the edges are written as zeros. It returns false when that does not
// apply (standard entries, compressed clusters, no whole subcluster).
func (w *Writer) zeroSubclusters(ci, from, to int64) (bool, error) {
	if !w.ext {
		return false, nil
	}
	a, b := w.wholeSubclusters(from, to)
	if a >= b {
		return false, nil
	}
	if entry, _, err := w.lookup(ci); err != nil || entry&l2Compressed != 0 {
		return false, w.fail(err)
	}
	if err := w.writeZeroData(from, a); err != nil {
		return false, err
	}
	if err := w.writeZeroData(min(b, to), to); err != nil {
		return false, err
	}
	if err := w.markSubclusters(ci, a, b, true); err != nil {
		return false, w.fail(err)
	}
	return true, nil
}

// wholeSubclusters is the range of whole subclusters of cluster ci in
// guest bytes [from, to) (the last one may extend past the disk).
func (w *Writer) wholeSubclusters(from, to int64) (a, b int64) {
	sub := w.c / subclusters
	a, b = alignUp(from, sub), alignDown(to, sub)
	if to == w.size {
		b = alignUp(to, sub)
	}
	return a, b
}

// markSubclusters makes the subclusters of cluster ci in guest bytes
// [a, b) (subcluster aligned) read zeros: with their zero bits (zero) or
// unallocated, as qemu's zero_l2_subclusters and discard_l2_subclusters
// do. A host cluster left with no allocated subcluster is freed.
func (w *Writer) markSubclusters(ci, a, b int64, zero bool) error {
	entry, bitmap, err := w.lookup(ci)
	if err != nil || entry&l2Compressed != 0 {
		return err
	}
	cs := ci << w.cbits
	mask := w.touchedSubclusters(cs, a, b)
	nb := bitmap &^ mask &^ (mask << 32)
	if zero {
		nb |= mask << 32
	}
	ne := entry
	if nb&allSubclustersAllocated == 0 && entry&tableOffsetMask != 0 {
		ne = 0
	}
	if ne == entry && nb == bitmap {
		return nil
	}
	if err := w.setMapping(ci, ne, nb); err != nil {
		return err
	}
	if ne != entry {
		w.freeLater(entry)
	}
	return nil
}

// Discard deallocates the whole clusters in [off, off+n) and frees their
// host clusters. Afterwards they read as zeros (version 3, or no backing
// file) or from the backing file (version 2). With extended L2 entries the
// whole subclusters of partly covered clusters read zeros too (zero bits
// over a backing file, unallocated otherwise), and a host cluster left
// without allocated subclusters is freed. Other partial clusters and
// subclusters at the edges are left untouched: discard is advisory.
func (w *Writer) Discard(off, n int64) error {
	if err := w.usable(); err != nil {
		return err
	}
	if err := w.checkRange("discard", off, n); err != nil {
		return err
	}
	if err := w.prepare(); err != nil {
		return w.fail(err)
	}
	first := ceilDiv(off, w.c)
	end := (off + n) >> w.cbits
	if off+n == w.size {
		end = ceilDiv(w.size, w.c)
	}
	if w.ext {
		for _, ci := range []int64{off >> w.cbits, (off + n - 1) >> w.cbits} {
			if n == 0 || ci >= first && ci < end {
				continue
			}
			cs := ci << w.cbits
			a, b := w.wholeSubclusters(max(off, cs), min(off+n, cs+w.c, w.size))
			if a >= b {
				continue
			}
			under := w.img.backing != nil && cs < w.img.backing.Size()
			if err := w.markSubclusters(ci, a, b, under); err != nil {
				return w.fail(err)
			}
			if off>>w.cbits == (off+n-1)>>w.cbits {
				break
			}
		}
	}
	for ci := first; ci < end; ci++ {
		old, bitmap, err := w.lookup(ci)
		if err != nil {
			return w.fail(err)
		}
		entry, newBitmap, ok := w.zeroEntry(ci)
		if !ok {
			entry, newBitmap = 0, 0
		}
		if old == entry && bitmap == newBitmap {
			continue
		}
		if err := w.setMapping(ci, entry, newBitmap); err != nil {
			return w.fail(err)
		}
		w.freeLater(old)
	}
	return nil
}

// flushMetadata writes the held L2 and L1 updates and the deferred frees,
// each group after a barrier: data and refcounts before the L2 tables that
// reference them, L2 tables before the L1 entries, and the tables before
// the frees of clusters they no longer reference.
func (w *Writer) flushMetadata() error {
	if w.dirtyL2 == 0 && len(w.l1Dirty) == 0 && len(w.pendingFree) == 0 {
		return nil
	}
	w.unmapped = 0
	if err := w.io.barrier(); err != nil {
		return err
	}
	for _, off := range sortedKeys(w.l2) {
		if t := w.l2[off]; t.dirty {
			if err := w.io.writeOwned(t.buf, off, 0, w.c); err != nil {
				return err
			}
			t.dirty = false
		}
	}
	w.dirtyL2 = 0
	if len(w.l1Dirty) > 0 {
		if err := w.io.barrier(); err != nil {
			return err
		}
		l1Bytes := int64(w.h.L1Size) * 8
		for _, b := range sortedKeys(w.l1Dirty) {
			lo := b * w.io.bs
			if err := w.io.writeOwned(w.l1, w.l1Offset, lo, min(lo+w.io.bs, l1Bytes)); err != nil {
				return err
			}
		}
		clear(w.l1Dirty)
	}
	if len(w.pendingFree) > 0 {
		if err := w.io.barrier(); err != nil {
			return err
		}
		for len(w.pendingFree) > 0 {
			r := w.pendingFree[0]
			if err := w.refs.adjust(r[0], r[1], -1); err != nil {
				return err
			}
			w.pendingFree = w.pendingFree[1:]
		}
	}
	return nil
}

// Flush writes every held table update and makes everything written so
// far durable (a device flush).
func (w *Writer) Flush() error {
	if err := w.usable(); err != nil {
		return err
	}
	if err := w.flushMetadata(); err != nil {
		return w.fail(err)
	}
	return w.fail(w.io.barrier())
}

// Close releases the reserved clusters, flushes, and closes the backing
// disk. It does not close the device. After a failure it only closes.
func (w *Writer) Close() error {
	if w.closed {
		return nil
	}
	var err error
	if w.err == nil {
		if err = w.refs.releasePool(); err == nil {
			err = w.Flush()
		}
	} else {
		err = fmt.Errorf("%w: %w", ErrWriterFailed, w.err)
	}
	w.closed = true
	return errors.Join(err, w.img.Close())
}

// AlignedBuffer returns n zero bytes whose address is a multiple of align
// (a power of two), for O_DIRECT writes that WriteAt passes through
// without copying.
func AlignedBuffer(n, align int) []byte { return alignedBuffer(n, align) }

var _ io.WriterAt = (*Writer)(nil)
