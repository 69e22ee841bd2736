package hostblk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"

	"golang.org/x/sys/unix"
)

// sanlock's resource leases, as lvmlockd lays them out in a shared VG's
// lvmlock LV (one per LV, at the offset in its lv_lock_args). Only what
// names the holders is read; the lease is sanlock's and never written here.
//
// A resource lease area is: sector 0 the paxos leader record, sector 1
// the request record, then one "dblock" sector per host (host_id N at
// sector 1+N) whose mode block (at byte 128 of the sector) has the shared
// flag while host N holds the lease shared. An exclusive holder is the
// leader's owner while its timestamp is not 0 (sanlock zeroes the
// timestamp when the owner releases the lease).
const (
	paxosDiskMagic   = 0x06152010
	leaderOwnerID    = 32
	leaderOwnerGen   = 40
	leaderNumHosts   = 16
	leaderSectorSize = 12
	leaderTimestamp  = 152
	mblockOffset     = 128
	mblockShared     = 0x1
	// maxSanlockHosts is sanlock's largest host_id.
	maxSanlockHosts = 2000
)

// LeaseHolders is who holds one LV's lease.
type LeaseHolders struct {
	// Exclusive is the host_id holding the lease exclusively, 0 for none.
	Exclusive int
	// Shared are the host_ids holding it shared, ascending.
	Shared []int
}

// Hosts lists every holder, exclusive first.
func (h LeaseHolders) Hosts() []int {
	var out []int
	if h.Exclusive != 0 {
		out = append(out, h.Exclusive)
	}
	return append(out, h.Shared...)
}

// ReadLeaseHolders reads the lease at offset in the lvmlock device dev and
// returns its holders: the exclusive one, and the shared ones among host
// ids 1 to maxHost (each host id costs a sector to read; 0 means all of
// sanlock's 2000). It reads with O_DIRECT: sanlock writes the leases with
// direct I/O from every host, and a page-cached copy would be stale.
func ReadLeaseHolders(dev string, offset int64, maxHost int) (LeaseHolders, error) {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return LeaseHolders{}, fmt.Errorf("reading sanlock leases: %w", err)
	}
	defer f.Close()
	// Leader and request records, then as many host sectors as the
	// leader says there are hosts; 4096-byte sectors at most.
	head, free, err := directBuffer(8192)
	if err != nil {
		return LeaseHolders{}, err
	}
	defer free()
	if _, err := f.ReadAt(head, offset); err != nil {
		return LeaseHolders{}, fmt.Errorf("reading the sanlock lease at %s:%d: %w", dev, offset, err)
	}
	h, sectorSize, numHosts, err := parseLeader(head)
	if err != nil {
		return LeaseHolders{}, fmt.Errorf("the sanlock lease at %s:%d: %w", dev, offset, err)
	}
	n := min(numHosts, maxSanlockHosts)
	if maxHost > 0 {
		n = min(n, int64(maxHost))
	}
	if n == 0 || h.Exclusive != 0 {
		return h, nil // an exclusive holder excludes shared ones
	}
	blocks, freeBlocks, err := directBuffer(int((2 + n) * sectorSize))
	if err != nil {
		return LeaseHolders{}, err
	}
	defer freeBlocks()
	if _, err := f.ReadAt(blocks, offset); err != nil {
		return LeaseHolders{}, fmt.Errorf("reading the sanlock lease at %s:%d: %w", dev, offset, err)
	}
	h.Shared = parseSharedHolders(blocks, sectorSize, n)
	return h, nil
}

// parseLeader reads the paxos leader record at the start of b.
func parseLeader(b []byte) (h LeaseHolders, sectorSize, numHosts int64, err error) {
	le := binary.LittleEndian
	if len(b) < 512 {
		return h, 0, 0, errors.New("short leader record")
	}
	if m := le.Uint32(b); m != paxosDiskMagic {
		return h, 0, 0, fmt.Errorf("no sanlock leader record (magic %#x, want %#x)", m, paxosDiskMagic)
	}
	sectorSize = int64(le.Uint32(b[leaderSectorSize:]))
	if sectorSize != 512 && sectorSize != 4096 {
		return h, 0, 0, fmt.Errorf("sanlock leader record: sector size %d", sectorSize)
	}
	numHosts = int64(le.Uint64(b[leaderNumHosts:]))
	if le.Uint64(b[leaderTimestamp:]) != 0 {
		h.Exclusive = int(le.Uint64(b[leaderOwnerID:]))
	}
	return h, sectorSize, numHosts, nil
}

// parseSharedHolders reads the mode blocks of hosts 1..n in a lease area
// (leader, request, then one sector per host).
func parseSharedHolders(b []byte, sectorSize, n int64) []int {
	var out []int
	for id := int64(1); id <= n; id++ {
		at := (1+id)*sectorSize + mblockOffset
		if at+4 > int64(len(b)) {
			break
		}
		if binary.LittleEndian.Uint32(b[at:])&mblockShared != 0 {
			out = append(out, int(id))
		}
	}
	sort.Ints(out)
	return out
}

// directBuffer is n bytes of page-aligned memory for O_DIRECT reads.
func directBuffer(n int) ([]byte, func(), error) {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANONYMOUS|unix.MAP_PRIVATE)
	if err != nil {
		return nil, nil, fmt.Errorf("allocating a %d-byte direct I/O buffer: %w", n, err)
	}
	return b, func() { _ = unix.Munmap(b) }, nil
}
