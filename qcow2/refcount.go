package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// refcountReservedMask are bits 0-8 of a refcount table entry.
const refcountReservedMask = 0x1ff

// Reserve-ahead: allocations take clusters from a pool whose refcounts are
// already on the device, so a small write costs one data request instead of
// a refcount write and a data write. A crash leaks the unused pool (qemu-img
// check reports leaks, never corruption); Close releases it.
const reserveAheadBytes = 32 << 20

// spaceError is an allocation that does not fit in the container. It is
// found before anything is written, so the Writer stays usable.
type spaceError struct{ msg string }

func (e *spaceError) Error() string        { return ErrNoSpace.Error() + ": " + e.msg }
func (e *spaceError) Is(target error) bool { return target == ErrNoSpace }

// refcountIO is how refcounts reach the device: reads, writes of a byte
// range of an in-memory table (the device block around it keeps its
// current bytes), and barriers.
type refcountIO interface {
	readAt(p []byte, off int64) error
	writeOwned(buf []byte, base, lo, hi int64) error
	barrier() error
}

// refcountOwner is what refcounts need from the image they count: the
// bound for table entries, news of growth, and the header switch to a new
// refcount table.
type refcountOwner interface {
	hostBound() int64
	grew()
	// moveRefcountTable makes the header name the refcount table at off of
	// n clusters, durably, in one atomic write.
	moveRefcountTable(off int64, n uint32) error
}

// refcounts holds the refcount table and recently used refcount blocks
// (write-through: the device always has what the cache has) and allocates
// clusters. Cluster numbers are host offsets >> cluster_bits. Refcounts
// are 1 to 64 bits wide; below 8 bits they are packed from the lowest bit
// of each byte up, as qemu does (get_refcount_ro0..ro2).
type refcounts struct {
	io            refcountIO
	owner         refcountOwner
	bs            int // buffer alignment
	c             int64
	cbits         uint32
	bits          int64 // bits per refcount: 1, 2, 4, 8, 16, 32 or 64
	perBlock      int64 // refcounts per block
	tableOffset   int64
	tableClusters int64
	table         []byte // the whole table, aligned
	blocks        map[int64][]byte
	maxBlocks     int
	hint          int64 // no cluster below hint is free
	end           int64 // one past the highest cluster with a refcount
	limit         int64 // clusters the container can hold
	poolStart     int64 // reserved clusters [poolStart, poolEnd): refcount 1, not referenced
	poolEnd       int64
	chunk         int64
}

// newRefcounts reads the refcount table of h through rio. containerSize 0
// means unbounded.
func newRefcounts(rio refcountIO, owner refcountOwner, h *Header, bs int, containerSize int64) (*refcounts, error) {
	c := h.ClusterSize()
	r := &refcounts{
		io: rio, owner: owner, bs: bs, c: c, cbits: h.ClusterBits,
		bits:          int64(h.RefcountBits()),
		tableOffset:   int64(h.RefcountTableOffset),
		tableClusters: int64(h.RefcountTableClusters),
		blocks:        map[int64][]byte{},
		maxBlocks:     int(max(16, (4<<20)/c)),
	}
	r.perBlock = c * 8 / r.bits
	r.chunk = min(reserveAheadBytes/c, max(r.perBlock/4, 16))
	r.limit = maxHostOffset / c
	if containerSize > 0 {
		r.limit = containerSize / c
	}
	r.table = alignedBuffer(int(r.tableClusters*c), bs)
	if err := rio.readAt(r.table, r.tableOffset); err != nil {
		return nil, fmt.Errorf("reading the refcount table: %w", err)
	}
	return r, r.scan()
}

func (r *refcounts) entries() int64 { return r.tableClusters * r.c / 8 }

func (r *refcounts) get(buf []byte, i int64) uint64 {
	switch r.bits {
	case 1, 2, 4:
		bit := i * r.bits
		return uint64(buf[bit/8]>>(bit%8)) & (1<<r.bits - 1)
	case 8:
		return uint64(buf[i])
	case 16:
		return uint64(binary.BigEndian.Uint16(buf[i*2:]))
	case 32:
		return uint64(binary.BigEndian.Uint32(buf[i*4:]))
	}
	return binary.BigEndian.Uint64(buf[i*8:])
}

func (r *refcounts) put(buf []byte, i int64, v uint64) {
	switch r.bits {
	case 1, 2, 4:
		bit := i * r.bits
		mask := byte(1<<r.bits-1) << (bit % 8)
		buf[bit/8] = buf[bit/8]&^mask | byte(v)<<(bit%8)&mask
	case 8:
		buf[i] = byte(v)
	case 16:
		binary.BigEndian.PutUint16(buf[i*2:], uint16(v))
	case 32:
		binary.BigEndian.PutUint32(buf[i*4:], uint32(v))
	default:
		binary.BigEndian.PutUint64(buf[i*8:], v)
	}
}

// byteRange is the bytes of a block holding refcounts [first, first+n).
func (r *refcounts) byteRange(first, n int64) (lo, hi int64) {
	return first * r.bits / 8, ceilDiv((first+n)*r.bits, 8)
}

func (r *refcounts) maxValue() uint64 {
	if r.bits == 64 {
		return 1<<64 - 1
	}
	return 1<<r.bits - 1
}

// block returns refcount block k (nil when the table has no block for it)
// and its host offset.
func (r *refcounts) block(k int64) ([]byte, int64, error) {
	if k >= r.entries() {
		return nil, 0, nil
	}
	e := binary.BigEndian.Uint64(r.table[k*8:])
	if e == 0 {
		return nil, 0, nil
	}
	off := int64(e &^ refcountReservedMask)
	bad := func(format string, args ...any) error {
		return fieldErr(ErrCorrupt, fmt.Sprintf("refcount table entry %d", k), fmt.Sprintf("%#016x", e), format, args...)
	}
	switch {
	case e&refcountReservedMask != 0:
		return nil, 0, bad("reserved bits %#x are set", e&refcountReservedMask)
	case off%r.c != 0:
		return nil, 0, bad("refcount block offset %d is not aligned to the cluster size %d", off, r.c)
	case off < r.c:
		return nil, 0, bad("refcount block at %d lies in the header cluster", off)
	case off > r.owner.hostBound()-r.c:
		return nil, 0, bad("refcount block at %d ends past the end of the image (%d bytes)", off, r.owner.hostBound())
	}
	if b, ok := r.blocks[off]; ok {
		return b, off, nil
	}
	b := alignedBuffer(int(r.c), r.bs)
	if err := r.io.readAt(b, off); err != nil {
		return nil, 0, fmt.Errorf("reading refcount block %d: %w", k, err)
	}
	r.cache(off, b)
	return b, off, nil
}

// cache keeps a block; the device has the same bytes, so any entry can go.
func (r *refcounts) cache(off int64, b []byte) {
	for k := range r.blocks {
		if len(r.blocks) < r.maxBlocks {
			break
		}
		delete(r.blocks, k)
	}
	r.blocks[off] = b
}

// refcount of cluster x (0 where no block covers it).
func (r *refcounts) refcount(x int64) (uint64, error) {
	b, _, err := r.block(x / r.perBlock)
	if err != nil || b == nil {
		return 0, err
	}
	return r.get(b, x%r.perBlock), nil
}

// scan finds the lowest free cluster and the end of the allocated ones.
func (r *refcounts) scan() error {
	r.hint = -1
	for k := range r.entries() {
		b, _, err := r.block(k)
		if err != nil {
			return err
		}
		if b == nil {
			if r.hint < 0 {
				r.hint = k * r.perBlock
			}
			continue
		}
		for i := range r.perBlock {
			if r.get(b, i) != 0 {
				r.end = k*r.perBlock + i + 1
			} else if r.hint < 0 {
				r.hint = k*r.perBlock + i
			}
		}
	}
	if r.hint < 0 {
		r.hint = r.entries() * r.perBlock
	}
	r.owner.grew()
	return nil
}

// adjust adds delta (+1 or -1) to the refcounts of clusters [s, s+n),
// writing each changed block range once. The blocks must exist.
func (r *refcounts) adjust(s, n int64, delta int) error {
	for n > 0 {
		k := s / r.perBlock
		b, off, err := r.block(k)
		if err != nil {
			return err
		}
		if b == nil {
			return fmt.Errorf("internal error: cluster %d has no refcount block", s)
		}
		first := s % r.perBlock
		cnt := min(n, r.perBlock-first)
		for i := first; i < first+cnt; i++ {
			v := r.get(b, i)
			switch {
			case delta < 0 && v == 0:
				return fieldErr(ErrCorrupt, "refcount", 0, "cluster at host offset %d is freed but its refcount is already 0", (k*r.perBlock+i)<<r.cbits)
			case delta > 0 && v == r.maxValue():
				return fieldErr(ErrUnsupported, "refcount", v, "cluster at host offset %d: refcount would overflow", (k*r.perBlock+i)<<r.cbits)
			}
			v = uint64(int64(v) + int64(delta))
			r.put(b, i, v)
			x := k*r.perBlock + i
			if v == 0 {
				r.hint = min(r.hint, x)
			} else if x >= r.end {
				r.end = x + 1
			}
		}
		lo, hi := r.byteRange(first, cnt)
		if err := r.io.writeOwned(b, off, lo, hi); err != nil {
			return err
		}
		s += cnt
		n -= cnt
	}
	r.owner.grew()
	return nil
}

// allocate returns the host offset of n new contiguous clusters whose
// refcounts are already 1 on the device.
func (r *refcounts) allocate(n int64) (int64, error) {
	if r.poolEnd-r.poolStart < n {
		if err := r.refill(n); err != nil {
			return 0, err
		}
	}
	s := r.poolStart
	r.poolStart += n
	return s << r.cbits, nil
}

func (r *refcounts) refill(n int64) error {
	have := r.poolEnd - r.poolStart
	if r.poolEnd > 0 {
		// Grow the pool in place so consecutive allocations stay contiguous.
		for _, more := range []int64{n - have + r.chunk, n - have} {
			ok, err := r.tryReserveAt(r.poolEnd, more)
			if err != nil {
				return err
			}
			if ok {
				r.poolEnd += more
				return nil
			}
		}
	}
	if err := r.releasePool(); err != nil {
		return err
	}
	for _, want := range []int64{n + r.chunk, n} {
		s, err := r.reserve(want)
		if errors.Is(err, ErrNoSpace) && want != n {
			continue
		}
		if err != nil {
			return err
		}
		r.poolStart, r.poolEnd = s, s+want
		return nil
	}
	return nil
}

// releasePool frees the reserved clusters nobody references.
func (r *refcounts) releasePool() error {
	if n := r.poolEnd - r.poolStart; n > 0 {
		if err := r.adjust(r.poolStart, n, -1); err != nil {
			return err
		}
	}
	r.poolStart, r.poolEnd = 0, 0
	return nil
}

// tryReserveAt reserves [s, s+n) if every cluster there is free and
// already has a refcount block.
func (r *refcounts) tryReserveAt(s, n int64) (bool, error) {
	if s+n > r.limit {
		return false, nil
	}
	var b []byte
	curBlock := int64(-1)
	for x := s; x < s+n; x++ {
		if k := x / r.perBlock; k != curBlock {
			var err error
			if b, _, err = r.block(k); err != nil || b == nil {
				return false, err
			}
			curBlock = k
		}
		if r.get(b, x%r.perBlock) != 0 {
			return false, nil
		}
	}
	return true, r.adjust(s, n, +1)
}

// reserve finds n contiguous free clusters, creating the refcount blocks
// (and growing the table) they need, and sets their refcounts to 1.
func (r *refcounts) reserve(n int64) (int64, error) {
	for {
		s, err := r.findFree(n)
		if err != nil {
			return 0, err
		}
		missing := r.missingBlocks(s, n)
		if len(missing) == 0 {
			return s, r.adjust(s, n, +1)
		}
		k := missing[0]
		if k >= r.entries() {
			if err := r.growTable(k + 1); err != nil {
				return 0, err
			}
			continue
		}
		if err := r.createBlock(k, s); err != nil {
			return 0, err
		}
	}
}

// findFree returns the first cluster of the lowest run of n free clusters.
func (r *refcounts) findFree(n int64) (int64, error) {
	run, start, firstFree := int64(0), int64(0), int64(-1)
	for x := r.hint; x < r.limit; {
		k := x / r.perBlock
		b, _, err := r.block(k)
		if err != nil {
			return 0, err
		}
		if b == nil {
			if run == 0 {
				start = x
			}
			if firstFree < 0 {
				firstFree = x
			}
			next := min((k+1)*r.perBlock, r.limit)
			run += next - x
			x = next
		} else {
			if r.get(b, x%r.perBlock) == 0 {
				if run == 0 {
					start = x
				}
				if firstFree < 0 {
					firstFree = x
				}
				run++
			} else {
				run = 0
			}
			x++
		}
		if run >= n {
			r.hint = firstFree
			return start, nil
		}
	}
	return 0, &spaceError{fmt.Sprintf("no %d free clusters of %d bytes below the end of the container (%d bytes)", n, r.c, r.limit*r.c)}
}

// missingBlocks lists, in order, the refcount blocks [s, s+n) needs and
// the table does not have.
func (r *refcounts) missingBlocks(s, n int64) []int64 {
	var missing []int64
	for k := s / r.perBlock; k <= (s+n-1)/r.perBlock; k++ {
		if k >= r.entries() || binary.BigEndian.Uint64(r.table[k*8:]) == 0 {
			missing = append(missing, k)
		}
	}
	return missing
}

// createBlock puts a new refcount block for clusters of block k at the
// free cluster at, whose own refcount lives either in the new block or in
// an existing one. Order: the refcount of the block, the block, a
// barrier, then the table entry that makes it count.
func (r *refcounts) createBlock(k, at int64) error {
	b := alignedBuffer(int(r.c), r.bs)
	if at/r.perBlock == k {
		r.put(b, at%r.perBlock, 1)
	} else if err := r.adjust(at, 1, +1); err != nil {
		return err
	}
	if err := r.io.writeOwned(b, at<<r.cbits, 0, r.c); err != nil {
		return err
	}
	if err := r.io.barrier(); err != nil {
		return err
	}
	binary.BigEndian.PutUint64(r.table[k*8:], uint64(at<<r.cbits))
	if err := r.io.writeOwned(r.table, r.tableOffset, k*8, k*8+8); err != nil {
		return err
	}
	r.cache(at<<r.cbits, b)
	r.end = max(r.end, at+1)
	r.owner.grew()
	return nil
}

// growTable moves the refcount table to a bigger one holding at least
// need entries. The new table and the refcount blocks its own clusters
// need are written first, then (after a barrier) one header write switches
// to it, then the old table is freed: a crash leaves a leak at worst.
func (r *refcounts) growTable(need int64) error {
	c := r.c
	maxClusters := maxRefcountTableBytes / c
	newEntries := max(need, 2*r.entries())
	var s, nb, tc int64
	var missing []int64
	for {
		tc = min(ceilDiv(newEntries*8, c), maxClusters)
		if tc*c/8 < need {
			return fieldErr(ErrTooLarge, "refcount_table_clusters", tc, "the image needs %d refcount blocks, more than qemu's %d-byte refcount table holds", need, maxRefcountTableBytes)
		}
		var err error
		if s, err = r.findFree(nb + tc); err != nil {
			return err
		}
		missing = r.missingBlocks(s, nb+tc)
		lastRange := (s + nb + tc - 1) / r.perBlock
		if lastRange >= tc*c/8 {
			newEntries = lastRange + 1
			continue
		}
		if int64(len(missing)) <= nb {
			break
		}
		nb = int64(len(missing))
	}

	table := alignedBuffer(int(tc*c), r.bs)
	copy(table, r.table[:r.entries()*8])
	newBlocks := map[int64][]byte{}
	for i, k := range missing {
		newBlocks[k] = alignedBuffer(int(c), r.bs)
		binary.BigEndian.PutUint64(table[k*8:], uint64((s+int64(i))<<r.cbits))
	}
	// The area's clusters in use: the new blocks and the new table.
	used := make([]int64, 0, len(missing)+int(tc))
	for i := range int64(len(missing)) {
		used = append(used, s+i)
	}
	for i := range tc {
		used = append(used, s+nb+i)
	}
	for i := 0; i < len(used); {
		x := used[i]
		if b, ok := newBlocks[x/r.perBlock]; ok {
			r.put(b, x%r.perBlock, 1)
			i++
			continue
		}
		j := i + 1 // a run of consecutive clusters counted in existing blocks
		for j < len(used) && used[j] == used[j-1]+1 && newBlocks[used[j]/r.perBlock] == nil {
			j++
		}
		if err := r.adjust(x, int64(j-i), +1); err != nil {
			return err
		}
		i = j
	}
	for i, k := range missing {
		if err := r.io.writeOwned(newBlocks[k], (s+int64(i))<<r.cbits, 0, c); err != nil {
			return err
		}
	}
	newOffset := (s + nb) << r.cbits
	if err := r.io.writeOwned(table, newOffset, 0, tc*c); err != nil {
		return err
	}
	if err := r.io.barrier(); err != nil {
		return err
	}
	oldOffset, oldClusters := r.tableOffset, r.tableClusters
	if err := r.owner.moveRefcountTable(newOffset, uint32(tc)); err != nil {
		return err
	}
	r.table, r.tableOffset, r.tableClusters = table, newOffset, tc
	for i, k := range missing {
		r.cache((s+int64(i))<<r.cbits, newBlocks[k])
	}
	r.end = max(r.end, s+nb+tc)
	r.owner.grew()
	return r.adjust(oldOffset>>r.cbits, oldClusters, -1)
}

// sortedKeys returns a map's int64 keys in increasing order.
func sortedKeys[V any](m map[int64]V) []int64 {
	keys := make([]int64, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
