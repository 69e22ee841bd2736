package testutil

import (
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"
)

// DiffSeed returns the seed of a differential random test:
// VOLAGENT_DIFF_SEED when set, else the clock. It logs it so a failure
// can be reproduced.
func DiffSeed(t testing.TB) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("VOLAGENT_DIFF_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("VOLAGENT_DIFF_SEED=%q: %v", s, err)
		}
	}
	t.Logf("seed %d (VOLAGENT_DIFF_SEED=%d reproduces this run)", seed, seed)
	return seed
}

// RandomWrite picks a data write into a disk of size bytes with clusters
// of c bytes: unaligned, sub-cluster, cluster-sized and cross-cluster
// lengths, at random, cluster-aligned or end-of-disk offsets. Its bytes
// are all fill, so qemu-io can repeat it (write -P fill off n).
func RandomWrite(r *rand.Rand, size, c int64) (off, n int64, fill byte) {
	sizes := []int64{1, 100, 512, 4096, 5000, c / 32, c / 2, c, c + 512, 3 * c, 1 << 20}
	n = max(1, min(sizes[r.IntN(len(sizes))], size))
	switch r.IntN(3) {
	case 0:
		off = r.Int64N(size - n + 1)
	case 1:
		off = r.Int64N(size/c) * c
	default:
		off = size - n
	}
	return off, min(n, size-off), byte(1 + r.IntN(255))
}

// WriteSparseSource writes a raw file of size bytes (a multiple of 512)
// made of random runs, in 512-byte units, of random data, explicit zeros and
// holes (never written), for imports to copy.
func WriteSparseSource(t testing.TB, path string, size int64, r *rand.Rand) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < size; {
		n := min(size-off, 512*(1+r.Int64N(2400)))
		switch r.IntN(3) {
		case 0: // data
			b := make([]byte, n)
			for i := range b {
				b[i] = byte(r.Uint32())
			}
			_, err = f.WriteAt(b, off)
		case 1: // explicit zeros
			_, err = f.WriteAt(make([]byte, n), off)
		} // else a hole
		if err != nil {
			t.Fatal(err)
		}
		off += n
	}
}
