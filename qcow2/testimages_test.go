package qcow2

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/volagent/volagent/internal/testutil"
)

// testImage is one entry of the image matrix: build makes the image (and
// its backing files) in dir with qemu tools and returns the top image's path
// and format. qemu-img convert -O raw of that image is the expected content.
type testImage struct {
	name  string
	build func(t *testing.T, dir string) (path, format string)
}

const (
	kib = 1 << 10
	mib = 1 << 20
)

// workload is a mix of qemu-io commands for an image of size bytes with
// clusters of cs bytes: aligned and unaligned pattern writes crossing
// cluster boundaries, a 3-byte write at an odd offset, zero writes over
// data and over unallocated space, a discard of data, and a write at the
// very end of the disk.
func workload(cs, size int64) []string {
	u := min(cs, size/32) // keeps every offset inside small disks with big clusters
	return []string{
		fmt.Sprintf("write -P 0x11 0 %d", 3*u),
		fmt.Sprintf("write -P 0x22 %d %d", 5*u+123, u+999),
		fmt.Sprintf("write -P 0x33 %d 3", 7*u+1),
		fmt.Sprintf("write -z %d %d", u, u),
		fmt.Sprintf("write -P 0x44 %d %d", 10*u, 4*u),
		fmt.Sprintf("discard %d %d", 11*u, 2*u),
		fmt.Sprintf("write -z %d %d", 20*u, 2*u),
		fmt.Sprintf("write -P 0x55 %d %d", size-u-17, u+17),
	}
}

// overlayWorkload writes over part of what a backing disk holds and zeroes
// and discards other parts, so reads mix both layers.
func overlayWorkload(cs, size int64) []string {
	u := min(cs, size/32)
	return []string{
		fmt.Sprintf("write -P 0xa1 %d %d", u+7, 2*u),
		fmt.Sprintf("write -z %d %d", 4*u, u),
		fmt.Sprintf("discard %d %d", 6*u, u),
		fmt.Sprintf("write -P 0xa2 %d 1", 9*u+511),
		fmt.Sprintf("write -P 0xa3 %d %d", size/2-3, 2*u),
	}
}

// subclusterWorkload exercises extended L2 entries: whole-subcluster and
// partial-subcluster writes, zero writes of single subclusters, a discard of
// subclusters, all inside the first clusters.
func subclusterWorkload(cs int64) []string {
	sc := cs / 32
	return []string{
		fmt.Sprintf("write -P 0x61 %d %d", sc, sc),
		fmt.Sprintf("write -P 0x62 %d %d", 3*sc+100, 2*sc),
		fmt.Sprintf("write -z %d %d", 8*sc, sc),
		fmt.Sprintf("write -P 0x63 %d %d", 10*sc, 6*sc),
		fmt.Sprintf("write -z %d %d", 12*sc, 2*sc),
		fmt.Sprintf("discard %d %d", 14*sc, sc),
		fmt.Sprintf("write -P 0x64 %d %d", cs+31*sc, 2*sc),
		fmt.Sprintf("write -z %d %d", 3*cs+5*sc, sc),
	}
}

// writeRawSource writes a raw file whose 64 KiB blocks are, in turn,
// random (incompressible, stored uncompressed by convert -c), zero, text
// (compressible) and a byte pattern.
func writeRawSource(t *testing.T, path string, size int64, seed uint64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, size)
	const block = 64 * kib
	for off := int64(0); off < size; off += block {
		chunk := b[off:min(off+block, size)]
		switch rng.IntN(4) {
		case 0:
			for i := range chunk {
				chunk[i] = byte(rng.Uint32())
			}
		case 1: // zeros
		case 2:
			line := fmt.Appendf(nil, "block %d of a compressible text, seed %d\n", off/block, seed)
			for i := range chunk {
				chunk[i] = line[i%len(line)]
			}
		case 3:
			for i := range chunk {
				chunk[i] = byte(i*7 + int(off/block))
			}
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func sizeArg(n int64) string { return fmt.Sprint(n) }

// plainImage is a qcow2 image made with the given -o options and run
// through workload.
func plainImage(name, options string, cs, size int64) testImage {
	return testImage{name, func(t *testing.T, dir string) (string, string) {
		p := filepath.Join(dir, "img.qcow2")
		testutil.MakeQcow2(t, p, options, sizeArg(size), "", "")
		testutil.QemuIO(t, "qcow2", p, workload(cs, size)...)
		return p, "qcow2"
	}}
}

// compressedImage converts a mixed raw source with qemu-img convert -c.
func compressedImage(name, options string, size int64) testImage {
	return testImage{name, func(t *testing.T, dir string) (string, string) {
		src, p := filepath.Join(dir, "src.raw"), filepath.Join(dir, "img.qcow2")
		writeRawSource(t, src, size, uint64(len(name)))
		testutil.QemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, src, p)
		return p, "qcow2"
	}}
}

func imageMatrix() []testImage {
	var m []testImage
	for _, cs := range []int64{512, 4 * kib, 64 * kib, 2 * mib} {
		size := int64(8 * mib)
		if cs == 2*mib {
			size = 64 * mib
		}
		for _, compat := range []string{"0.10", "1.1"} {
			m = append(m, plainImage(fmt.Sprintf("cluster%d-compat%s", cs, compat),
				fmt.Sprintf("cluster_size=%d,compat=%s", cs, compat), cs, size))
		}
	}
	for _, bits := range []int{1, 2, 4, 8, 16, 32, 64} {
		m = append(m, plainImage(fmt.Sprintf("refcount%d", bits),
			fmt.Sprintf("refcount_bits=%d,cluster_size=4k", bits), 4*kib, 4*mib))
	}
	m = append(m,
		plainImage("lazy-refcounts", "lazy_refcounts=on", 64*kib, 8*mib),
		plainImage("prealloc-metadata", "preallocation=metadata,cluster_size=4k", 4*kib, 4*mib),
		plainImage("prealloc-full", "preallocation=full", 64*kib, 4*mib),
		plainImage("prealloc-metadata-extl2", "preallocation=metadata,extended_l2=on", 64*kib, 4*mib),
		plainImage("odd-virtual-size", "cluster_size=64k", 64*kib, 8*mib+1536),
	)
	for _, cs := range []int64{16 * kib, 64 * kib, 2 * mib} {
		opts := fmt.Sprintf("extended_l2=on,cluster_size=%d", cs)
		m = append(m, testImage{fmt.Sprintf("extl2-cluster%d", cs), func(t *testing.T, dir string) (string, string) {
			p := filepath.Join(dir, "img.qcow2")
			testutil.MakeQcow2(t, p, opts, sizeArg(8*cs), "", "")
			testutil.QemuIO(t, "qcow2", p, subclusterWorkload(cs)...)
			return p, "qcow2"
		}})
		m = append(m, testImage{fmt.Sprintf("extl2-cluster%d-over-backing", cs), func(t *testing.T, dir string) (string, string) {
			base, p := filepath.Join(dir, "base.raw"), filepath.Join(dir, "top.qcow2")
			writeRawSource(t, base, 8*cs, 7)
			testutil.MakeQcow2(t, p, opts, "", "base.raw", "raw")
			testutil.QemuIO(t, "qcow2", p, subclusterWorkload(cs)...)
			return p, "qcow2"
		}})
	}
	for _, cs := range []int64{512, 4 * kib, 64 * kib, 2 * mib} {
		size := int64(4 * mib)
		if cs == 2*mib {
			size = 16 * mib
		}
		for _, ct := range []string{"zlib", "zstd"} {
			m = append(m, compressedImage(fmt.Sprintf("convert-c-%s-cluster%d", ct, cs),
				fmt.Sprintf("compression_type=%s,cluster_size=%d", ct, cs), size))
		}
	}
	m = append(m,
		compressedImage("convert-c-zlib-compat0.10", "compat=0.10", 4*mib),
		compressedImage("convert-c-zstd-extl2", "compression_type=zstd,extended_l2=on", 4*mib),
		compressedImage("convert-c-zlib-refcount1", "refcount_bits=1,cluster_size=4k", 2*mib),
	)
	for _, ct := range []string{"zlib", "zstd"} {
		for _, extl2 := range []string{"off", "on"} {
			opts := fmt.Sprintf("compression_type=%s,extended_l2=%s", ct, extl2)
			m = append(m, testImage{fmt.Sprintf("qemu-io-write-c-%s-extl2-%s", ct, extl2), func(t *testing.T, dir string) (string, string) {
				const cs = 64 * kib
				p := filepath.Join(dir, "img.qcow2")
				testutil.MakeQcow2(t, p, opts, sizeArg(4*mib), "", "")
				testutil.QemuIO(t, "qcow2", p,
					fmt.Sprintf("write -c -P 0x71 0 %d", 4*cs),
					fmt.Sprintf("write -c -P 0x72 %d %d", 8*cs, cs),
					fmt.Sprintf("write -P 0x73 %d 4096", cs+1000), // partial overwrite of a compressed cluster
					fmt.Sprintf("write -z %d %d", 2*cs, cs),
					fmt.Sprintf("discard %d %d", 3*cs, cs),
					fmt.Sprintf("write -c -P 0x74 %d %d", 4*mib-cs, cs),
				)
				return p, "qcow2"
			}})
		}
	}
	m = append(m, chainImages()...)
	m = append(m, testImage{"internal-snapshot", func(t *testing.T, dir string) (string, string) {
		p := filepath.Join(dir, "img.qcow2")
		testutil.MakeQcow2(t, p, "cluster_size=4k", sizeArg(4*mib), "", "")
		testutil.QemuIO(t, "qcow2", p, workload(4*kib, 4*mib)...)
		// qemu-img snapshot has no -f; --image-opts names the driver instead.
		testutil.QemuImg(t, "snapshot", "-c", "snap1", "--image-opts", "driver=qcow2,file.filename="+p)
		testutil.QemuIO(t, "qcow2", p, overlayWorkload(4*kib, 4*mib)...)
		return p, "qcow2"
	}})
	return m
}

// chainImages are chains of up to three images, qcow2 over qcow2 or raw,
// with explicit backing formats everywhere.
func chainImages() []testImage {
	return []testImage{
		{"chain3-raw-qcow2-qcow2", func(t *testing.T, dir string) (string, string) {
			writeRawSource(t, filepath.Join(dir, "base.raw"), 8*mib, 1)
			mid, top := filepath.Join(dir, "mid.qcow2"), filepath.Join(dir, "top.qcow2")
			testutil.MakeQcow2(t, mid, "cluster_size=4k", "", "base.raw", "raw")
			testutil.QemuIO(t, "qcow2", mid, workload(4*kib, 8*mib)...)
			testutil.MakeQcow2(t, top, "", "", "mid.qcow2", "qcow2")
			testutil.QemuIO(t, "qcow2", top, overlayWorkload(64*kib, 8*mib)...)
			return top, "qcow2"
		}},
		{"chain3-v2-compressed-extl2", func(t *testing.T, dir string) (string, string) {
			src, base := filepath.Join(dir, "src.raw"), filepath.Join(dir, "base.qcow2")
			writeRawSource(t, src, 8*mib, 2)
			testutil.QemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10", src, base)
			mid, top := filepath.Join(dir, "mid.qcow2"), filepath.Join(dir, "top.qcow2")
			testutil.MakeQcow2(t, mid, "compat=0.10,cluster_size=512", "", "base.qcow2", "qcow2")
			testutil.QemuIO(t, "qcow2", mid, overlayWorkload(512, 8*mib)...)
			testutil.MakeQcow2(t, top, "extended_l2=on", "", filepath.Join(dir, "mid.qcow2"), "qcow2") // absolute name
			testutil.QemuIO(t, "qcow2", top, subclusterWorkload(64*kib)...)
			return top, "qcow2"
		}},
		{"backing-shorter-than-overlay", func(t *testing.T, dir string) (string, string) {
			writeRawSource(t, filepath.Join(dir, "base.raw"), 3*mib+512, 3) // ends inside a cluster
			mid, top := filepath.Join(dir, "mid.qcow2"), filepath.Join(dir, "top.qcow2")
			testutil.MakeQcow2(t, mid, "", sizeArg(5*mib), "base.raw", "raw")
			testutil.QemuIO(t, "qcow2", mid, "write -P 0x81 1m 4k")
			testutil.MakeQcow2(t, top, "cluster_size=4k", sizeArg(8*mib), "mid.qcow2", "qcow2")
			testutil.QemuIO(t, "qcow2", top, "write -P 0x82 6m 4k")
			return top, "qcow2"
		}},
		{"overlay-smaller-than-backing", func(t *testing.T, dir string) (string, string) {
			writeRawSource(t, filepath.Join(dir, "base.raw"), 8*mib, 4)
			top := filepath.Join(dir, "top.qcow2")
			testutil.MakeQcow2(t, top, "", sizeArg(3*mib+4096), "base.raw", "raw")
			testutil.QemuIO(t, "qcow2", top, overlayWorkload(64*kib, 3*mib)...)
			return top, "qcow2"
		}},
		{"v2-overlay-zero-writes-over-backing", func(t *testing.T, dir string) (string, string) {
			writeRawSource(t, filepath.Join(dir, "base.raw"), 4*mib, 5)
			top := filepath.Join(dir, "top.qcow2")
			testutil.MakeQcow2(t, top, "compat=0.10", "", "base.raw", "raw")
			testutil.QemuIO(t, "qcow2", top, overlayWorkload(64*kib, 4*mib)...)
			return top, "qcow2"
		}},
		{"raw-top", func(t *testing.T, dir string) (string, string) {
			p := filepath.Join(dir, "disk.raw")
			writeRawSource(t, p, 2*mib+512, 6)
			return p, "raw"
		}},
	}
}
