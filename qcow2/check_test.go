package qcow2_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/volagent/volagent/internal/hostile"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

const (
	checkKiB = 1 << 10
	checkMiB = 1 << 20
)

// checkQemuVerdict is what `qemu-img check --output=json` reports. qemu
// omits fields that are zero, which decode as zero here.
type checkQemuVerdict struct {
	Corruptions       int   `json:"corruptions"`
	Leaks             int   `json:"leaks"`
	CheckErrors       int   `json:"check-errors"`
	ImageEndOffset    int64 `json:"image-end-offset"`
	AllocatedClusters int64 `json:"allocated-clusters"`
	TotalClusters     int64 `json:"total-clusters"`
}

// qemuCheck runs qemu-img check read-only (no -r). It exits 2 for
// corruptions and 3 for leaks, still printing its JSON report.
func qemuCheck(t *testing.T, path string) checkQemuVerdict {
	t.Helper()
	testutil.RequireTool(t, "qemu-img")
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("qemu-img", "check", "--output=json", "-f", "qcow2", path)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var v checkQemuVerdict
	if jerr := json.Unmarshal(stdout.Bytes(), &v); jerr != nil {
		t.Fatalf("qemu-img check %s: %v (%v)\nstdout: %s\nstderr: %s", path, err, jerr, stdout.String(), stderr.String())
	}
	return v
}

func checkFile(t *testing.T, path string) *qcow2.CheckResult {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	res, err := qcow2.Check(f, st.Size())
	if err != nil {
		t.Fatalf("Check(%s): %v", path, err)
	}
	if len(res.Problems) > qcow2.MaxCheckProblems {
		t.Errorf("%d problems listed, more than the bound %d", len(res.Problems), qcow2.MaxCheckProblems)
	}
	return res
}

func describeProblems(res *qcow2.CheckResult) string {
	var b bytes.Buffer
	for _, p := range res.Problems {
		fmt.Fprintf(&b, "\n  %s at %d: %s", p.Kind, p.HostOffset, p.Message)
	}
	return b.String()
}

// requireCheckMatchesQemu compares Check's counts with qemu-img check's.
// For a clean image the image end and allocated cluster counts must match too.
func requireCheckMatchesQemu(t *testing.T, path string) *qcow2.CheckResult {
	t.Helper()
	want := qemuCheck(t, path)
	got := checkFile(t, path)
	if got.Corruptions != want.Corruptions || got.Leaks != want.Leaks || got.CheckErrors != want.CheckErrors {
		t.Fatalf("corruptions/leaks/check errors = %d/%d/%d, qemu-img check says %d/%d/%d%s",
			got.Corruptions, got.Leaks, got.CheckErrors, want.Corruptions, want.Leaks, want.CheckErrors, describeProblems(got))
	}
	if got.Clean() {
		if got.ImageEndOffset != want.ImageEndOffset || got.AllocatedClusters != want.AllocatedClusters || got.TotalClusters != want.TotalClusters {
			t.Fatalf("image end %d, allocated %d of %d clusters; qemu-img check says %d, %d of %d",
				got.ImageEndOffset, got.AllocatedClusters, got.TotalClusters, want.ImageEndOffset, want.AllocatedClusters, want.TotalClusters)
		}
		if len(got.Problems) != 0 {
			t.Fatalf("clean result lists problems:%s", describeProblems(got))
		}
	}
	return got
}

// checkWorkload writes, zeroes and discards at many offsets of a disk of
// size bytes with clusters of cs bytes.
func checkWorkload(cs, size int64) []string {
	u := min(cs, size/64)
	cmds := []string{
		fmt.Sprintf("write -P 0x11 0 %d", 3*u),
		fmt.Sprintf("write -P 0x22 %d %d", 5*u+123, u+999),
		fmt.Sprintf("write -z %d %d", u, u),
		fmt.Sprintf("write -P 0x44 %d %d", 10*u, 4*u),
		fmt.Sprintf("discard %d %d", 11*u, 2*u),
		fmt.Sprintf("write -z %d %d", 20*u, 2*u),
		fmt.Sprintf("write -P 0x55 %d %d", size-u-17, u+17),
	}
	for i := int64(1); i <= 20; i++ {
		off := (i * 7919 * u) % (size - 2*u)
		cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", 0x60+i, off, u/2+i))
	}
	return cmds
}

// checkImage builds one image of the matrix in dir and returns its path.
type checkImage struct {
	name  string
	build func(t *testing.T, dir string) string
}

func checkPlain(name, options string, cs, size int64, extra ...string) checkImage {
	return checkImage{name, func(t *testing.T, dir string) string {
		p := filepath.Join(dir, "img.qcow2")
		testutil.MakeQcow2(t, p, options, fmt.Sprint(size), "", "")
		testutil.QemuIO(t, "qcow2", p, append(checkWorkload(cs, size), extra...)...)
		return p
	}}
}

// checkRawSource writes a raw file of alternating random (stored
// uncompressed by convert -c), zero and compressible 64 KiB blocks.
func checkRawSource(t *testing.T, path string, size int64) {
	t.Helper()
	b := make([]byte, size)
	x := uint64(0x9e3779b97f4a7c15)
	for off := int64(0); off < size; off += 64 * checkKiB {
		block := b[off:min(off+64*checkKiB, size)]
		switch (off / (64 * checkKiB)) % 3 {
		case 0:
			for i := range block {
				x ^= x << 13
				x ^= x >> 7
				x ^= x << 17
				block[i] = byte(x)
			}
		case 2:
			for i := range block {
				block[i] = "volagent checks refcounts "[i%26]
			}
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func checkConverted(name, options string, size int64) checkImage {
	return checkImage{name, func(t *testing.T, dir string) string {
		src, p := filepath.Join(dir, "src.raw"), filepath.Join(dir, "img.qcow2")
		checkRawSource(t, src, size)
		args := []string{"convert", "-c", "-f", "raw", "-O", "qcow2"}
		if options != "" {
			args = append(args, "-o", options)
		}
		testutil.QemuImg(t, append(args, src, p)...)
		return p
	}}
}

func checkMatrix() []checkImage {
	var m []checkImage
	for _, cs := range []int64{512, 4 * checkKiB, 64 * checkKiB, 2 * checkMiB} {
		size := int64(8 * checkMiB)
		if cs == 2*checkMiB {
			size = 64 * checkMiB
		}
		for _, compat := range []string{"0.10", "1.1"} {
			m = append(m, checkPlain(fmt.Sprintf("cluster%d-compat%s", cs, compat),
				fmt.Sprintf("cluster_size=%d,compat=%s", cs, compat), cs, size))
		}
	}
	for _, bits := range []int{1, 2, 4, 8, 16, 32, 64} {
		m = append(m, checkPlain(fmt.Sprintf("refcount%d", bits),
			fmt.Sprintf("refcount_bits=%d,cluster_size=4k", bits), 4*checkKiB, 4*checkMiB))
	}
	m = append(m,
		checkPlain("lazy-refcounts", "lazy_refcounts=on", 64*checkKiB, 8*checkMiB),
		checkPlain("extl2-64k", "extended_l2=on", 64*checkKiB, 8*checkMiB),
		checkPlain("extl2-16k-512b-writes", "extended_l2=on,cluster_size=16k", 16*checkKiB, 2*checkMiB,
			"write -P 0x77 512 512", "write -z 16384 512", "discard 1024 512"),
		// write -z over preallocated clusters leaves "zero, allocated" entries.
		checkPlain("prealloc-metadata-zero-alloc", "preallocation=metadata,cluster_size=4k", 4*checkKiB, 4*checkMiB,
			"write -z 1m 64k"),
		checkPlain("prealloc-full-zero-alloc", "preallocation=full", 64*checkKiB, 4*checkMiB, "write -z 1m 256k"),
		checkPlain("prealloc-metadata-extl2", "preallocation=metadata,extended_l2=on", 64*checkKiB, 4*checkMiB),
		checkConverted("convert-c-zlib-512", "cluster_size=512", 2*checkMiB),
		checkConverted("convert-c-zstd-4k", "compression_type=zstd,cluster_size=4k", 2*checkMiB),
		checkConverted("convert-c-zlib-64k", "", 4*checkMiB),
		checkConverted("convert-c-zstd-2m", "compression_type=zstd,cluster_size=2M", 8*checkMiB),
		checkConverted("convert-c-zlib-compat0.10", "compat=0.10", 2*checkMiB),
		checkConverted("convert-c-zstd-extl2", "compression_type=zstd,extended_l2=on", 2*checkMiB),
		checkConverted("convert-c-zlib-refcount1", "refcount_bits=1,cluster_size=4k", 2*checkMiB),
		checkConverted("convert-c-zlib-refcount64", "refcount_bits=64,cluster_size=512", 2*checkMiB),
	)
	for _, ct := range []string{"zlib", "zstd"} {
		for _, extl2 := range []string{"off", "on"} {
			opts := fmt.Sprintf("compression_type=%s,extended_l2=%s", ct, extl2)
			m = append(m, checkImage{fmt.Sprintf("qemu-io-write-c-%s-extl2-%s", ct, extl2), func(t *testing.T, dir string) string {
				p := filepath.Join(dir, "img.qcow2")
				testutil.MakeQcow2(t, p, opts, "4M", "", "")
				testutil.QemuIO(t, "qcow2", p,
					"write -c -P 0x71 0 256k",
					"write -c -P 0x72 512k 64k",
					"write -P 0x73 65536 4096", // rewrites part of a compressed cluster
					"write -z 128k 64k",
					"discard 192k 64k",
					"write -c -P 0x74 4032k 64k")
				return p
			}})
		}
	}
	m = append(m,
		checkImage{"internal-snapshots", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "img.qcow2")
			testutil.MakeQcow2(t, p, "cluster_size=4k", "4M", "", "")
			testutil.QemuIO(t, "qcow2", p, checkWorkload(4*checkKiB, 4*checkMiB)...)
			checkSnapshot(t, p, "s1")
			testutil.QemuIO(t, "qcow2", p, "write -P 0xa1 0 64k", "discard 1m 64k", "write -c -P 0xa2 2m 8k")
			checkSnapshot(t, p, "s2")
			testutil.QemuIO(t, "qcow2", p, "write -P 0xa3 4k 4k", "write -z 8k 4k")
			return p
		}},
		checkImage{"snapshot-compressed-refcount8", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "img.qcow2")
			checkRawSource(t, filepath.Join(dir, "src.raw"), 2*checkMiB)
			testutil.QemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "refcount_bits=8,cluster_size=4k", filepath.Join(dir, "src.raw"), p)
			checkSnapshot(t, p, "s1")
			checkSnapshot(t, p, "s2")
			testutil.QemuIO(t, "qcow2", p, "write -P 0xb1 0 16k")
			return p
		}},
		checkImage{"dirty-bitmap", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "img.qcow2")
			testutil.MakeQcow2(t, p, "cluster_size=4k", "16M", "", "")
			testutil.QemuImg(t, "bitmap", "--add", "-g", "4096", "-f", "qcow2", p, "bm0")
			testutil.QemuImg(t, "bitmap", "--add", "-f", "qcow2", p, "bm1")
			// qemu-io loads the enabled bitmaps, marks the writes and stores
			// them with their data clusters on close.
			testutil.QemuIO(t, "qcow2", p, checkWorkload(4*checkKiB, 16*checkMiB)...)
			return p
		}},
		checkImage{"overlay-with-backing", func(t *testing.T, dir string) string {
			base, p := filepath.Join(dir, "base.raw"), filepath.Join(dir, "top.qcow2")
			checkRawSource(t, base, 4*checkMiB)
			testutil.MakeQcow2(t, p, "", "", "base.raw", "raw")
			testutil.QemuIO(t, "qcow2", p, checkWorkload(64*checkKiB, 4*checkMiB)...)
			return p
		}},
	)
	return m
}

// checkSnapshot takes an internal snapshot; qemu-img snapshot has no -f,
// so --image-opts names the driver instead of letting qemu probe.
func checkSnapshot(t *testing.T, path, name string) {
	t.Helper()
	testutil.QemuImg(t, "snapshot", "-c", name, "--image-opts", "driver=qcow2,file.filename="+path)
}

// TestCheckCleanImagesMatchQemu: every qemu-made image checks clean, with
// the same image end and allocated clusters as qemu-img check reports.
func TestCheckCleanImagesMatchQemu(t *testing.T) {
	for _, img := range checkMatrix() {
		t.Run(img.name, func(t *testing.T) {
			t.Parallel()
			p := img.build(t, t.TempDir())
			res := requireCheckMatchesQemu(t, p)
			if !res.Clean() {
				t.Fatalf("qemu-made image not clean:%s", describeProblems(res))
			}
			requireAllocationEnd(t, p, res.ImageEndOffset)
		})
	}
}

// requireAllocationEnd fails unless AllocationEnd, from the refcounts
// alone, finds the end Check found from every table.
func requireAllocationEnd(t *testing.T, path string, want int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	_, end, err := qcow2.AllocationEnd(f, fi.Size())
	if err != nil {
		t.Fatalf("AllocationEnd: %v", err)
	}
	if end != want {
		t.Fatalf("AllocationEnd = %d, Check's ImageEndOffset = %d", end, want)
	}
}

// checkLayout locates the structures of an image for fault injection.
type checkLayout struct {
	h   *qcow2.Header
	img []byte
}

func readCheckLayout(t *testing.T, path string) *checkLayout {
	t.Helper()
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := qcow2.ReadHeader(bytes.NewReader(img), int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	return &checkLayout{h: h, img: img}
}

func (l *checkLayout) u64(off int64) uint64 { return binary.BigEndian.Uint64(l.img[off:]) }

func (l *checkLayout) put64(off int64, v uint64) { binary.BigEndian.PutUint64(l.img[off:], v) }

func (l *checkLayout) l1EntryOffset(guest int64) int64 {
	return int64(l.h.L1TableOffset) + guest/(l.h.L2Entries()*l.h.ClusterSize())*8
}

// l2EntryOffset is where the L2 entry mapping guest lies.
func (l *checkLayout) l2EntryOffset(t *testing.T, guest int64) int64 {
	t.Helper()
	l2 := int64(l.u64(l.l1EntryOffset(guest)) & 0x00ff_ffff_ffff_fe00)
	if l2 == 0 {
		t.Fatalf("guest offset %d has no L2 table", guest)
	}
	return l2 + guest/l.h.ClusterSize()%l.h.L2Entries()*l.h.L2EntrySize()
}

func (l *checkLayout) hostCluster(t *testing.T, guest int64) int64 {
	t.Helper()
	host := int64(l.u64(l.l2EntryOffset(t, guest)) & 0x00ff_ffff_ffff_fe00)
	if host == 0 {
		t.Fatalf("guest offset %d has no host cluster", guest)
	}
	return host / l.h.ClusterSize()
}

// refcountOffset is where the (16-bit) refcount of host cluster k lies.
func (l *checkLayout) refcountOffset(t *testing.T, k int64) int64 {
	t.Helper()
	if l.h.RefcountBits() != 16 {
		t.Fatalf("refcountOffset needs 16-bit refcounts")
	}
	perBlock := l.h.ClusterSize() / 2
	block := int64(l.u64(int64(l.h.RefcountTableOffset) + k/perBlock*8))
	return block + k%perBlock*2
}

func (l *checkLayout) refcount(t *testing.T, k int64) uint16 {
	return binary.BigEndian.Uint16(l.img[l.refcountOffset(t, k):])
}

func (l *checkLayout) setRefcount(t *testing.T, k int64, v uint16) {
	binary.BigEndian.PutUint16(l.img[l.refcountOffset(t, k):], v)
}

// checkFaultBase: 64 KiB clusters, data in guest clusters 0-7 and 16, a
// zeroed (zero, allocated) cluster 5, compressed data at 2 MiB, and a
// discarded cluster 3 whose host cluster is now free inside the image.
func checkFaultBase(t *testing.T, dir, options string) string {
	t.Helper()
	p := filepath.Join(dir, "img.qcow2")
	testutil.MakeQcow2(t, p, options, "4M", "", "")
	testutil.QemuIO(t, "qcow2", p, "write -P 1 0 512k", "write -P 2 1m 64k", "write -z 320k 64k",
		"write -c -P 3 2m 64k", "write -c -P 4 2112k 64k", "discard 192k 64k")
	return p
}

// TestCheckFaultsMatchQemu patches tables and refcounts of good images and
// requires the same corruption, leak and check error counts as qemu.
func TestCheckFaultsMatchQemu(t *testing.T) {
	const cs = 64 * checkKiB
	faults := []struct {
		name    string
		options string
		prepare func(t *testing.T, path string) // after the base workload
		patch   func(t *testing.T, l *checkLayout)
	}{
		{"refcount-raised", "", nil, func(t *testing.T, l *checkLayout) {
			k := l.hostCluster(t, 0)
			l.setRefcount(t, k, 2) // a leak, and COPIED is now wrong
		}},
		{"refcount-raised-free-cluster", "", nil, func(t *testing.T, l *checkLayout) {
			for k := int64(1); k < int64(len(l.img))/cs; k++ {
				if l.refcount(t, k) == 0 {
					l.setRefcount(t, k, 1)
					return
				}
			}
			t.Fatal("no free cluster inside the image")
		}},
		{"refcount-lowered-to-zero", "", nil, func(t *testing.T, l *checkLayout) {
			l.setRefcount(t, l.hostCluster(t, 64*checkKiB), 0)
		}},
		{"refcount-of-l2-table-zero", "", nil, func(t *testing.T, l *checkLayout) {
			l2 := int64(l.u64(l.l1EntryOffset(0)) & 0x00ff_ffff_ffff_fe00)
			l.setRefcount(t, l2/cs, 0)
		}},
		{"refcount-of-refcount-block-raised", "", nil, func(t *testing.T, l *checkLayout) {
			block := int64(l.u64(int64(l.h.RefcountTableOffset)))
			l.setRefcount(t, block/cs, 3)
		}},
		{"two-l2-entries-share-a-cluster", "", nil, func(t *testing.T, l *checkLayout) {
			l.put64(l.l2EntryOffset(t, 128*checkKiB), l.u64(l.l2EntryOffset(t, 0)))
		}},
		{"l2-entry-past-eof", "", nil, func(t *testing.T, l *checkLayout) {
			past := (int64(len(l.img))/cs + 16) * cs
			l.put64(l.l2EntryOffset(t, 0), 1<<63|uint64(past))
		}},
		{"l2-entry-in-last-partial-cluster", "", nil, func(t *testing.T, l *checkLayout) {
			l.put64(l.l2EntryOffset(t, 0), 1<<63|uint64(int64(len(l.img))/cs*cs))
		}},
		{"l2-entry-reserved-bits", "", nil, func(t *testing.T, l *checkLayout) {
			off := l.l2EntryOffset(t, 64*checkKiB)
			l.put64(off, l.u64(off)|1<<1|1<<56)
		}},
		{"l2-entry-unaligned", "", nil, func(t *testing.T, l *checkLayout) {
			off := l.l2EntryOffset(t, 64*checkKiB)
			l.put64(off, l.u64(off)+512)
		}},
		{"l2-copied-cleared", "", nil, func(t *testing.T, l *checkLayout) {
			off := l.l2EntryOffset(t, 128*checkKiB)
			l.put64(off, l.u64(off)&^(1<<63))
		}},
		{"l2-compressed-with-copied", "", nil, func(t *testing.T, l *checkLayout) {
			off := l.l2EntryOffset(t, 2*checkMiB)
			l.put64(off, l.u64(off)|1<<63)
		}},
		{"l1-copied-cleared", "", nil, func(t *testing.T, l *checkLayout) {
			off := l.l1EntryOffset(0)
			l.put64(off, l.u64(off)&^(1<<63))
		}},
		{"l1-reserved-bits", "", nil, func(t *testing.T, l *checkLayout) {
			off := l.l1EntryOffset(0)
			l.put64(off, l.u64(off)|1<<57|1<<3)
		}},
		{"l1-entry-past-eof", "", nil, func(t *testing.T, l *checkLayout) {
			l.put64(l.l1EntryOffset(0), 1<<63|uint64((int64(len(l.img))/cs+4)*cs))
		}},
		{"reftable-entry-reserved-bits", "", nil, func(t *testing.T, l *checkLayout) {
			off := int64(l.h.RefcountTableOffset) + 8
			l.put64(off, l.u64(off)|1)
		}},
		{"reftable-entry-unaligned", "", nil, func(t *testing.T, l *checkLayout) {
			off := int64(l.h.RefcountTableOffset)
			l.put64(off, l.u64(off)+4096) // qemu: a check error per cluster it covers
		}},
		{"reftable-entry-past-eof", "", nil, func(t *testing.T, l *checkLayout) {
			l.put64(int64(l.h.RefcountTableOffset)+8, uint64((int64(len(l.img))/cs+8)*cs))
		}},
		{"zero-alloc-refcount-lowered", "", nil, func(t *testing.T, l *checkLayout) {
			l.setRefcount(t, l.hostCluster(t, 320*checkKiB), 0)
		}},
		{"snapshot-shared-refcount-lowered", "", checkFaultSnapshot, func(t *testing.T, l *checkLayout) {
			l.setRefcount(t, l.hostCluster(t, 64*checkKiB), 1)
		}},
		{"snapshot-shared-refcount-raised", "", checkFaultSnapshot, func(t *testing.T, l *checkLayout) {
			l.setRefcount(t, l.hostCluster(t, 64*checkKiB), 5)
		}},
		{"extl2-allocated-and-zero", "extended_l2=on", nil, func(t *testing.T, l *checkLayout) {
			off := l.l2EntryOffset(t, 64*checkKiB)
			l.put64(off+8, l.u64(off+8)|1<<32)
		}},
		{"extl2-unallocated-with-bitmap", "extended_l2=on", nil, func(t *testing.T, l *checkLayout) {
			l.put64(l.l2EntryOffset(t, 1536*checkKiB)+8, 1)
		}},
	}
	faults = append(faults, []struct {
		name    string
		options string
		prepare func(t *testing.T, path string)
		patch   func(t *testing.T, l *checkLayout)
	}{
		{"refcount1-shared-cluster-overflows", "refcount_bits=1", nil, func(t *testing.T, l *checkLayout) {
			l.put64(l.l2EntryOffset(t, 128*checkKiB), l.u64(l.l2EntryOffset(t, 0)))
		}},
		{"refcount64-shared-cluster", "refcount_bits=64", nil, func(t *testing.T, l *checkLayout) {
			l.put64(l.l2EntryOffset(t, 128*checkKiB), l.u64(l.l2EntryOffset(t, 0)))
		}},
		// Memoized L2 walks must count exactly what qemu's repeated walks count.
		{"l1-entries-all-share-one-l2", "cluster_size=512", nil, func(t *testing.T, l *checkLayout) {
			first := l.u64(int64(l.h.L1TableOffset))
			for i := int64(0); i < int64(l.h.L1Size); i++ {
				l.put64(int64(l.h.L1TableOffset)+8*i, first)
			}
		}},
		{"bitmaps-without-autoclear-bit-leak", "", checkFaultBitmap, func(t *testing.T, l *checkLayout) {
			l.put64(88, l.u64(88)&^qcow2.AutoclearBitmaps) // qemu then ignores the bitmaps
		}},
		{"bitmap-data-refcount-raised", "", checkFaultBitmap, func(t *testing.T, l *checkLayout) {
			l.setRefcount(t, int64(l.h.Bitmaps.BitmapDirectoryOffset)/cs, 2)
		}},
	}...)
	for _, f := range faults {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			p := checkFaultBase(t, dir, f.options)
			if f.prepare != nil {
				f.prepare(t, p)
			}
			l := readCheckLayout(t, p)
			f.patch(t, l)
			if err := os.WriteFile(p, l.img, 0o644); err != nil {
				t.Fatal(err)
			}
			res := requireCheckMatchesQemu(t, p)
			if res.Clean() {
				t.Fatalf("fault not found")
			}
			if len(res.Problems) == 0 {
				t.Fatalf("counts without problems listed")
			}
		})
	}
}

func checkFaultSnapshot(t *testing.T, path string) {
	checkSnapshot(t, path, "s1")
	// Grow the image past the snapshot table: ReadHeader refuses a table
	// whose last entry ends the file unpadded (see the report).
	testutil.QemuIO(t, "qcow2", path, "write -P 5 3m 64k")
}

func checkFaultBitmap(t *testing.T, path string) {
	testutil.QemuImg(t, "bitmap", "--add", "-f", "qcow2", path, "bm0")
	testutil.QemuIO(t, "qcow2", path, "write -P 6 3m 64k")
}

// TestCheckBoundsProblems: a refcount table claiming every cluster is used
// yields one leak per cluster but a bounded problem list.
func TestCheckBoundsProblems(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img.qcow2")
	testutil.MakeQcow2(t, p, "cluster_size=512", "1M", "", "")
	testutil.QemuIO(t, "qcow2", p, "write 0 128k", "discard 0 128k")
	l := readCheckLayout(t, p)
	leaked := 0
	for k := int64(0); k < int64(len(l.img))/512; k++ {
		if l.refcount(t, k) == 0 {
			l.setRefcount(t, k, 1)
			leaked++
		}
	}
	if err := os.WriteFile(p, l.img, 0o644); err != nil {
		t.Fatal(err)
	}
	res := requireCheckMatchesQemu(t, p)
	if res.Leaks != leaked || leaked <= qcow2.MaxCheckProblems {
		t.Fatalf("leaks %d, patched %d (want more than %d)", res.Leaks, leaked, qcow2.MaxCheckProblems)
	}
	if len(res.Problems) != qcow2.MaxCheckProblems || res.ProblemsOmitted != leaked-qcow2.MaxCheckProblems {
		t.Fatalf("%d problems listed, %d omitted; want %d and %d", len(res.Problems), res.ProblemsOmitted, qcow2.MaxCheckProblems, leaked-qcow2.MaxCheckProblems)
	}
}

// TestCheckRefusesHostileImages: every hostile header is refused with
// ReadHeader's verdict, never a panic or a result.
func TestCheckRefusesHostileImages(t *testing.T) {
	bases := hostile.MakeBases(t, t.TempDir())
	for _, c := range hostile.Write(t, bases) {
		t.Run(c.Name, func(t *testing.T) {
			img, err := os.ReadFile(c.Path)
			if err != nil {
				t.Fatal(err)
			}
			res, err := qcow2.Check(bytes.NewReader(img), int64(len(img)))
			if err == nil || res != nil {
				t.Fatalf("Check = %+v, %v; want a refusal wrapping %v", res, err, c.Want)
			}
			var ve *qcow2.ValidationError
			if !errors.As(err, &ve) || !errors.Is(err, c.Want) {
				t.Fatalf("error %v; want a *ValidationError wrapping %v", err, c.Want)
			}
		})
	}
}

// TestCheckIOError: a failing reader is an error, not a verdict.
func TestCheckIOError(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img.qcow2")
	testutil.MakeQcow2(t, p, "", "1M", "", "")
	img, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	r := &checkFailingReader{img: img, failFrom: 64 * checkKiB}
	res, err := qcow2.Check(r, int64(len(img)))
	if err == nil || qcow2.IsRefusal(err) || !errors.Is(err, errCheckInjected) {
		t.Fatalf("Check = %+v, %v; want the injected I/O error", res, err)
	}
}

var errCheckInjected = errors.New("injected I/O error")

type checkFailingReader struct {
	img      []byte
	failFrom int64
}

func (r *checkFailingReader) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > r.failFrom {
		return 0, errCheckInjected
	}
	return bytes.NewReader(r.img).ReadAt(p, off)
}

// FuzzCheck checks arbitrary bytes as an image: no panic, a refusal or a
// result, and a bounded problem list. Allocation is bounded by the input
// size (the fuzzer's memory limit catches the rest).
func FuzzCheck(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		res, err := qcow2.Check(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			if !qcow2.IsRefusal(err) {
				t.Fatalf("non-refusal error on an in-memory image: %v", err)
			}
			return
		}
		if len(res.Problems) > qcow2.MaxCheckProblems {
			t.Fatalf("%d problems listed", len(res.Problems))
		}
		if n := res.Corruptions + res.Leaks + res.CheckErrors; n < len(res.Problems) {
			t.Fatalf("counts %d below the %d problems listed", n, len(res.Problems))
		}
	})
}
