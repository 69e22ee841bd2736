package hostile

import (
	"encoding/binary"

	"github.com/volagent/volagent/qcow2"
)

// CostlyExtensions is how many header extensions Costly packs into its
// 2 MiB header cluster.
const CostlyExtensions = (2<<20 - 104) / 8 // for Costly's 2 MiB clusters

// CostlySnapshots is how many snapshot entries Costly's table holds.
const CostlySnapshots = 65536

// Costly returns an image (9 MiB) made to cost an inspector as much as a
// header can: a 2 MiB header cluster packed with 262131 empty header
// extensions, every other one a repeated, empty backing format extension
// (one violation each), and a table of 65536 snapshots, each with a
// misaligned L1 table (one violation each). A parser that keeps what it
// finds allocates hundreds of MiB for it.
func Costly() []byte { return CostlyImage(21, CostlySnapshots) }

// CostlyImage is Costly with clusters of 1<<clusterBits bytes and the
// given number of snapshots (a small one is a fuzz seed).
func CostlyImage(clusterBits uint32, snapshots int) []byte {
	cluster := 1 << clusterBits
	img := make([]byte, 3*cluster+(snapshots*40+cluster-1)/cluster*cluster)
	be := binary.BigEndian
	be.PutUint32(img[0:], qcow2.Magic)
	be.PutUint32(img[offVersion:], 3)
	be.PutUint32(img[offClusterBits:], clusterBits)
	be.PutUint64(img[offSize:], 1<<30)
	be.PutUint32(img[offL1Size:], 1)
	be.PutUint64(img[offL1Offset:], uint64(cluster))
	be.PutUint64(img[offRefcountOffset:], uint64(2*cluster))
	be.PutUint32(img[offRefcountCluster:], 1)
	be.PutUint32(img[offNbSnapshots:], uint32(snapshots))
	be.PutUint64(img[offSnapshotsOffset:], uint64(3*cluster))
	be.PutUint32(img[96:], 4)    // refcount_order
	be.PutUint32(img[100:], 104) // header_length
	for i, off := 0, 104; off < cluster; i, off = i+1, off+8 {
		typ := uint32(0x1000 + i) // unknown, and never 0 (the end marker)
		if i%2 == 0 {
			typ = qcow2.ExtBackingFormat
		}
		be.PutUint32(img[off:], typ) // length 0
	}
	for i, off := 0, 3*cluster; i < snapshots; i, off = i+1, off+40 {
		be.PutUint64(img[off:], 1) // l1_table_offset: misaligned
		be.PutUint32(img[off+8:], 1)
	}
	return img
}
