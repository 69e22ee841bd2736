package qcow2

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/volagent/volagent/internal/testutil"
)

// readDisk reads a whole Disk in irregular chunks, so reads start and end
// inside clusters and subclusters.
func readDisk(t testing.TB, d Disk) []byte {
	t.Helper()
	out := make([]byte, d.Size())
	chunk := int64(1*mib + 4096 + 7)
	for off := int64(0); off < d.Size(); off += chunk {
		end := min(off+chunk, d.Size())
		n, err := d.ReadAt(out[off:end], off)
		if err != nil && !(err == io.EOF && end == d.Size()) {
			t.Fatalf("ReadAt(%d bytes at %d): %d, %v", end-off, off, n, err)
		}
		if int64(n) != end-off {
			t.Fatalf("ReadAt(%d bytes at %d) = %d", end-off, off, n)
		}
	}
	return out
}

func requireSameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, qemu sees %d", what, len(got), len(want))
	}
	if bytes.Equal(got, want) {
		return
	}
	for i := range got {
		if got[i] != want[i] {
			end := min(i+16, len(got))
			t.Fatalf("%s: first difference at guest offset %d: got % x, qemu sees % x", what, i, got[i:end], want[i:end])
		}
	}
}

// TestReaderMatchesQemu reads every image of the matrix through OpenChain
// and compares it with qemu-img convert -O raw, whole and in random pieces.
func TestReaderMatchesQemu(t *testing.T) {
	testutil.RequireTool(t, "qemu-img", "qemu-io")
	for _, ti := range imageMatrix() {
		t.Run(ti.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path, format := ti.build(t, dir)
			want := testutil.QemuGuestBytes(t, format, path)

			d, err := OpenChain(path, format, &Gate{AllowedRoots: []string{dir}})
			if err != nil {
				t.Fatalf("OpenChain: %v", err)
			}
			defer d.Close()
			requireSameBytes(t, "whole disk", readDisk(t, d), want)

			rng := rand.New(rand.NewPCG(1, uint64(len(ti.name))))
			for range 300 {
				off := rng.Int64N(d.Size())
				n := min(rng.Int64N(300*kib)+1, d.Size()-off)
				got := make([]byte, n)
				if _, err := d.ReadAt(got, off); err != nil && err != io.EOF {
					t.Fatalf("ReadAt(%d at %d): %v", n, off, err)
				}
				requireSameBytes(t, "random read", got, want[off:off+n])
			}
			if img, ok := d.(*Image); ok {
				kinds := requireMapMatchesQemu(t, img, path)
				requireKindsCovered(t, ti.name, img, kinds)
			}
		})
	}
}

// qemuMapEntry is one extent of qemu-img map --output=json.
type qemuMapEntry struct {
	Start, Length int64
	Depth         int
	Present       bool
	Zero, Data    bool
	Offset        *int64
}

// requireMapMatchesQemu checks Map at the first and last byte of every
// extent qemu-img map reports for the top image, and returns the kinds seen.
func requireMapMatchesQemu(t *testing.T, img *Image, path string) map[MappingKind]bool {
	t.Helper()
	var entries []qemuMapEntry
	out := testutil.QemuImg(t, "map", "-f", "qcow2", "--output=json", path)
	if err := json.Unmarshal(out, &entries); err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	kinds := map[MappingKind]bool{}
	for _, e := range entries {
		for _, off := range []int64{e.Start, e.Start + e.Length - 1} {
			m, err := img.Map(off)
			if err != nil {
				t.Fatalf("Map(%d): %v", off, err)
			}
			kinds[m.Kind] = true
			want := MapUnallocated
			switch {
			case e.Depth > 0 || !e.Present:
			case e.Data && e.Offset == nil:
				want = MapCompressed
			case e.Data: // qemu also says zero when the host range is a hole
				want = MapData
			case e.Zero:
				want = MapZero
			}
			if m.Kind != want {
				t.Fatalf("Map(%d) = %v, qemu-img map says %+v", off, m.Kind, e)
			}
			if want == MapData && m.HostOffset != *e.Offset+(off-e.Start) {
				t.Fatalf("Map(%d) host offset %d, qemu-img map says %d", off, m.HostOffset, *e.Offset+(off-e.Start))
			}
		}
	}
	return kinds
}

// requireKindsCovered guards the matrix itself: images meant to hold
// compressed clusters, zero clusters or subclusters must hold them.
func requireKindsCovered(t *testing.T, name string, img *Image, kinds map[MappingKind]bool) {
	t.Helper()
	if strings.Contains(name, "-c-") && !kinds[MapCompressed] {
		t.Errorf("no compressed cluster in %s", name)
	}
	if strings.Contains(name, "compat1.1") && !kinds[MapZero] {
		t.Errorf("no zero cluster in %s", name)
	}
	if strings.HasPrefix(name, "extl2-") {
		sub := false
		for off := int64(0); off < img.Size() && !sub; {
			m, err := img.Map(off)
			if err != nil {
				t.Fatal(err)
			}
			inCluster := off % img.clusterSize
			sub = m.Length < min(img.clusterSize-inCluster, img.Size()-off)
			off += m.Length
		}
		if !sub || !kinds[MapZero] || !kinds[MapData] || !kinds[MapUnallocated] {
			t.Errorf("%s: kinds %v, subcluster extents %v", name, kinds, sub)
		}
	}
}

// TestReaderConcurrent reads one compressed, chained image from several
// goroutines at once (the ReaderAt contract); run with -race.
func TestReaderConcurrent(t *testing.T) {
	dir := t.TempDir()
	ti := chainImages()[1]
	path, format := ti.build(t, dir)
	want := testutil.QemuGuestBytes(t, format, path)
	d, err := OpenChain(path, format, &Gate{AllowedRoots: []string{dir}})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	errs := make(chan error, 4)
	for g := range 4 {
		go func() {
			rng := rand.New(rand.NewPCG(uint64(g), 2))
			for range 200 {
				off := rng.Int64N(d.Size())
				n := min(rng.Int64N(200*kib)+1, d.Size()-off)
				got := make([]byte, n)
				if _, err := d.ReadAt(got, off); err != nil && err != io.EOF {
					errs <- err
					return
				}
				if !bytes.Equal(got, want[off:off+n]) {
					errs <- errors.New("concurrent read differs from qemu")
					return
				}
			}
			errs <- nil
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// openFileImage opens an image file alone with OpenImage.
func openFileImage(t *testing.T, path string, opts ...ImageOption) (*Image, error) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return OpenImage(f, st.Size(), nil, opts...)
}

// l2EntryOffset returns where in the file the L2 entry of guestOff lies.
func l2EntryOffset(t *testing.T, path string, guestOff int64) int64 {
	t.Helper()
	img, err := openFileImage(t, path, WithoutBacking())
	if err != nil {
		t.Fatal(err)
	}
	h := img.Header()
	cluster := guestOff >> h.ClusterBits
	l1e := img.l1[cluster/h.L2Entries()]
	l2 := int64(l1e & tableOffsetMask)
	if l2 == 0 {
		t.Fatalf("guest offset %d has no L2 table", guestOff)
	}
	return l2 + (cluster%h.L2Entries())*h.L2EntrySize()
}

func patchUint64(t *testing.T, path string, off int64, v uint64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

func readUint64(t *testing.T, path string, off int64) uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b[:])
}

// readAllErr reads the whole disk and returns the first error.
func readAllErr(d Disk) error {
	buf := make([]byte, 256*kib)
	for off := int64(0); off < d.Size(); off += int64(len(buf)) {
		if _, err := d.ReadAt(buf, off); err != nil && err != io.EOF {
			return err
		}
	}
	return nil
}

// requireCorrupt checks that err is a *FieldError wrapping ErrCorrupt
// that names the guest offset.
func requireCorrupt(t *testing.T, err error, guestOff int64) {
	t.Helper()
	var fe *FieldError
	if !errors.Is(err, ErrCorrupt) || !errors.As(err, &fe) {
		t.Fatalf("want a FieldError wrapping ErrCorrupt, got %v", err)
	}
	t.Logf("%v", err)
	if !bytes.Contains([]byte(fe.Field), []byte(" "+strconv.FormatInt(guestOff, 10))) {
		t.Errorf("error %q does not name guest offset %d", err, guestOff)
	}
	if !IsRefusal(err) {
		t.Errorf("IsRefusal(%v) = false", err)
	}
}

// TestCorruptL2Entries patches one L2 entry of a qemu-made image per case;
// reading that cluster must fail with ErrCorrupt, never panic, and reading
// other clusters must still work.
func TestCorruptL2Entries(t *testing.T) {
	base := filepath.Join(t.TempDir(), "base.qcow2")
	testutil.MakeQcow2(t, base, "", sizeArg(4*mib), "", "")
	testutil.QemuIO(t, "qcow2", base, "write -P 0x11 0 128k", "write -c -P 0x22 1m 64k")
	origData := readUint64(t, base, l2EntryOffset(t, base, 0))
	origCompressed := readUint64(t, base, l2EntryOffset(t, base, 1*mib))

	cases := []struct {
		name     string
		guestOff int64
		entry    uint64
	}{
		{"reserved bits 1-8", 0, origData | 1<<4},
		{"reserved bits 56-61", 0, origData | 1<<57},
		{"unaligned host offset", 0, origData + 512},
		{"host offset past the end", 0, l2Copied | 1<<40},
		{"copied flag without offset", 0, l2Copied},
		{"compressed with copied flag", 1 * mib, origCompressed | l2Copied},
		{"compressed data past the end", 1 * mib, l2Compressed | 1<<40},
		{"compressed sectors past the end", 1 * mib, origCompressed | 0xff<<54},
		{"compressed in the header cluster", 1 * mib, l2Compressed | 100},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			copyFile(t, base, p)
			patchUint64(t, p, l2EntryOffset(t, p, c.guestOff), c.entry)
			img, err := openFileImage(t, p)
			if err != nil {
				t.Fatalf("OpenImage: %v (the header is intact)", err)
			}
			_, err = img.ReadAt(make([]byte, 4096), c.guestOff+100)
			requireCorrupt(t, err, c.guestOff+100)
			_, err = img.Map(c.guestOff)
			requireCorrupt(t, err, c.guestOff)
			if _, err := img.ReadAt(make([]byte, 4096), 2*mib); err != nil {
				t.Errorf("reading an intact cluster: %v", err)
			}
		})
	}
}

// TestCorruptL1Entry sets reserved bits in an L1 entry and points another at
// an unaligned offset.
func TestCorruptL1Entry(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img.qcow2")
	testutil.MakeQcow2(t, p, "cluster_size=4k", sizeArg(4*mib), "", "")
	testutil.QemuIO(t, "qcow2", p, "write -P 0x11 0 4k", "write -P 0x12 2m 4k")
	img, err := openFileImage(t, p)
	if err != nil {
		t.Fatal(err)
	}
	l1 := int64(img.Header().L1TableOffset)
	patchUint64(t, p, l1, img.l1[0]|1<<60)
	patchUint64(t, p, l1+8, img.l1[1]+512)
	img, err = openFileImage(t, p)
	if err != nil {
		t.Fatal(err)
	}
	_, err = img.ReadAt(make([]byte, 10), 0)
	requireCorrupt(t, err, 0)
	_, err = img.ReadAt(make([]byte, 10), 2*mib)
	requireCorrupt(t, err, 2*mib)
}

// TestCorruptExtendedL2Bitmap marks a subcluster both allocated and zero.
func TestCorruptExtendedL2Bitmap(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img.qcow2")
	testutil.MakeQcow2(t, p, "extended_l2=on", sizeArg(4*mib), "", "")
	testutil.QemuIO(t, "qcow2", p, "write -P 0x11 0 2k")
	bitmapAt := l2EntryOffset(t, p, 0) + 8
	patchUint64(t, p, bitmapAt, readUint64(t, p, bitmapAt)|1<<32)
	img, err := openFileImage(t, p)
	if err != nil {
		t.Fatal(err)
	}
	_, err = img.ReadAt(make([]byte, 10), 0)
	requireCorrupt(t, err, 0)
}

// TestCompressedStreamSize replaces a compressed cluster's stream with one
// that decodes to less, or more, than a cluster.
func TestCompressedStreamSize(t *testing.T) {
	const cs = 64 * kib
	for _, ct := range []string{"zlib", "zstd"} {
		for _, outLen := range []int{cs - 1, cs + 1, 0} {
			t.Run(ct+"-"+strconv.Itoa(outLen), func(t *testing.T) {
				p := filepath.Join(t.TempDir(), "img.qcow2")
				testutil.MakeQcow2(t, p, "compression_type="+ct, sizeArg(4*mib), "", "")
				testutil.QemuIO(t, "qcow2", p, "write -c -P 0x22 1m 64k")
				entry := readUint64(t, p, l2EntryOffset(t, p, 1*mib))
				host, area := compressedDescriptor(entry, 16)
				stream := compressStream(t, ct, make([]byte, outLen))
				if uint64(len(stream)) > area {
					t.Fatalf("replacement stream of %d bytes does not fit the %d-byte area", len(stream), area)
				}
				f, err := os.OpenFile(p, os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := f.WriteAt(stream, int64(host)); err != nil {
					t.Fatal(err)
				}
				f.Close()
				img, err := openFileImage(t, p)
				if err != nil {
					t.Fatal(err)
				}
				_, err = img.ReadAt(make([]byte, 10), 1*mib)
				requireCorrupt(t, err, 1*mib)
			})
		}
	}
}

func compressStream(t *testing.T, ct string, data []byte) []byte {
	var buf bytes.Buffer
	switch ct {
	case "zlib":
		w, _ := flate.NewWriter(&buf, flate.BestCompression)
		w.Write(data)
		w.Close()
	case "zstd":
		w, err := zstd.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(data)
		w.Close()
	}
	return buf.Bytes()
}

// TestTruncatedImage cuts a qemu-made image at many lengths: OpenImage or
// the reads must fail cleanly (or succeed where nothing needed is cut).
func TestTruncatedImage(t *testing.T) {
	dir := t.TempDir()
	full := filepath.Join(dir, "full.qcow2")
	testutil.MakeQcow2(t, full, "cluster_size=4k,compression_type=zstd", sizeArg(1*mib), "", "")
	testutil.QemuIO(t, "qcow2", full, "write -P 0x11 0 64k", "write -c -P 0x22 512k 4k", "write -P 0x33 900k 8k")
	data, err := os.ReadFile(full)
	if err != nil {
		t.Fatal(err)
	}
	sawReadError := false
	for cut := int64(0); cut < int64(len(data)); cut += 1021 {
		img, err := OpenImage(bytes.NewReader(data[:cut]), cut, nil)
		if err != nil {
			continue
		}
		if err := readAllErr(img); err != nil {
			sawReadError = true
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("cut at %d: %v does not wrap ErrCorrupt", cut, err)
			}
		}
	}
	if !sawReadError {
		t.Error("no cut produced a read error; the test does not cut through data")
	}
}

// TestOpenImageBackingRules covers the backing/no-backing combinations.
func TestOpenImageBackingRules(t *testing.T) {
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.raw"), filepath.Join(dir, "top.qcow2")
	writeRawSource(t, base, 1*mib, 9)
	testutil.MakeQcow2(t, top, "", "", "base.raw", "raw")
	testutil.QemuIO(t, "qcow2", top, "write -P 0x11 0 64k")
	alone := filepath.Join(dir, "alone.qcow2")
	testutil.MakeQcow2(t, alone, "", sizeArg(1*mib), "", "")

	if _, err := openFileImage(t, top); err == nil {
		t.Error("an image naming a backing file opened without one")
	}
	img, err := openFileImage(t, top, WithoutBacking())
	if err != nil {
		t.Fatalf("WithoutBacking: %v", err)
	}
	got := readDisk(t, img)
	want := append(bytes.Repeat([]byte{0x11}, 64*kib), make([]byte, 1*mib-64*kib)...)
	requireSameBytes(t, "overlay alone", got, want)

	rawFile, err := os.Open(base)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := OpenRaw(rawFile)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	f, _ := os.Open(alone)
	defer f.Close()
	if _, err := OpenImage(f, 1*mib, raw); err == nil {
		t.Error("a backing disk was accepted for an image that names none")
	}
	if _, err := OpenImage(f, 1*mib, raw, WithoutBacking()); err == nil {
		t.Error("WithoutBacking with a backing disk was accepted")
	}

	// A qcow2 backing disk where the header records raw.
	ft, _ := os.Open(top)
	defer ft.Close()
	st, _ := ft.Stat()
	qcowBacking, err := OpenImage(f, 1*mib, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := OpenImage(ft, st.Size(), qcowBacking); !errors.Is(err, ErrFormat) {
		t.Errorf("backing format mismatch: got %v, want ErrFormat", err)
	}
}

// TestL2CacheBounded reads an image with many L2 tables through a cache of
// two tables; it must stay within its bound and still read correctly.
func TestL2CacheBounded(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img.qcow2")
	testutil.MakeQcow2(t, p, "cluster_size=512", sizeArg(4*mib), "", "")
	// 512-byte clusters: one L2 table maps 32 KiB; write into many tables.
	var cmds []string
	for off := int64(0); off < 4*mib; off += 96 * kib {
		cmds = append(cmds, fmt.Sprintf("write -P 0x5a %d 1k", off))
	}
	testutil.QemuIO(t, "qcow2", p, cmds...)
	want := testutil.QemuGuestBytes(t, "qcow2", p)
	img, err := openFileImage(t, p, WithL2CacheSize(1024))
	if err != nil {
		t.Fatal(err)
	}
	requireSameBytes(t, "small cache", readDisk(t, img), want)
	if img.l2.curBytes > 1024 || img.l2.order.Len() > 2 {
		t.Errorf("cache holds %d bytes in %d tables, bound 1024", img.l2.curBytes, img.l2.order.Len())
	}
}

// FuzzReader opens arbitrary bytes as an image (read alone) and reads the
// whole virtual disk, up to 16 MiB. It must not panic, hang or allocate
// without bound.
func FuzzReader(f *testing.F) {
	buf := make([]byte, 1*mib) // reused: the fuzzer runs many inputs per process
	f.Fuzz(func(t *testing.T, data []byte) {
		img, err := OpenImage(bytes.NewReader(data), int64(len(data)), nil, WithoutBacking(), WithL2CacheSize(4*mib))
		if err != nil {
			return
		}
		for off := int64(0); off < min(img.Size(), 16*mib); off += int64(len(buf)) {
			if _, err := img.ReadAt(buf, off); err != nil {
				if err != io.EOF && !errors.Is(err, ErrCorrupt) && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("read at %d: unexpected error kind: %v", off, err)
				}
				return
			}
		}
	})
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}
