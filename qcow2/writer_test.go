package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/testutil"
)

// randomWorkload writes, zeroes and discards random ranges of many sizes
// and alignments through w and the model alike.
func randomWorkload(t testing.TB, w *Writer, model guestModel, seed uint64, ops int) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 7))
	size := int64(len(model))
	sizes := []int64{1, 7, 512, 4096, 4097, 65536, 65536 + 512, 3 * 65536, 1 << 20, 2<<20 + 123}
	for i := range ops {
		n := min(sizes[r.IntN(len(sizes))], size)
		var off int64
		switch r.IntN(3) {
		case 0: // aligned to the length's power of two
			off = r.Int64N(size-n+1) &^ 511
		case 1:
			off = r.Int64N(size - n + 1)
		default: // sequential after the previous op
			off = min(int64(i)*n%size, size-n)
		}
		switch r.IntN(10) {
		case 0:
			if err := w.WriteZeroes(off, n); err != nil {
				t.Fatalf("op %d: WriteZeroes(%d, %d): %v", i, off, n, err)
			}
			model.zero(off, n)
		case 1:
			if err := w.Discard(off, n); err != nil {
				t.Fatalf("op %d: Discard(%d, %d): %v", i, off, n, err)
			}
			// Whole clusters read zeros afterwards (v3), and whole
			// subclusters with extended L2; edges unchanged.
			c := w.c
			if w.ext {
				c /= subclusters
			}
			first, end := ceilDiv(off, c)*c, (off+n)/c*c
			if off+n == size {
				end = size
			}
			if first < end {
				model.zero(first, end-first)
			}
		case 2:
			if err := w.Flush(); err != nil {
				t.Fatalf("op %d: Flush: %v", i, err)
			}
			fallthrough
		default:
			p := make([]byte, n)
			patternFill(p, i+1, off)
			if got, err := w.WriteAt(p, off); err != nil || got != len(p) {
				t.Fatalf("op %d: WriteAt(%d bytes, %d) = %d, %v", i, n, off, got, err)
			}
			model.write(p, off)
		}
	}
}

// TestWriterRandomMatchesQemu writes random ranges into fresh overlays on
// O_DIRECT files and lets qemu judge: the guest view, qemu-img check.
func TestWriterRandomMatchesQemu(t *testing.T) {
	testutil.RequireTool(t, "qemu-img", "qemu-io")
	const size = 8 << 20
	cases := []struct{ name, backing, options string }{
		{"raw-backing", "raw", ""},
		{"compressed-backing", "qcow2-compressed", ""},
		{"no-backing", "", ""},
		{"small-clusters-64bit-refcounts", "raw", "cluster_size=512,refcount_bits=64"},
		{"4k-clusters-8bit-refcounts", "raw", "cluster_size=4096,refcount_bits=8"},
		{"32bit-refcounts", "raw", "refcount_bits=32"},
		{"extended-l2", "raw", "extended_l2=on,cluster_size=128k"},
		{"compressed-target", "", ""},
		{"version-2", "raw", "compat=0.10"},
	}
	for ci, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			image := filepath.Join(dir, "overlay.qcow2")
			model := guestModel(make([]byte, size))
			rawBase := filepath.Join(dir, "base.raw")
			base := writeRandomFile(t, rawBase, size, uint64(ci))
			switch tc.backing {
			case "raw":
				copy(model, base)
				testutil.MakeQcow2(t, image, tc.options, "", rawBase, "raw")
			case "qcow2-compressed":
				copy(model, base)
				cbase := filepath.Join(dir, "base.qcow2")
				testutil.QemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", rawBase, cbase)
				testutil.MakeQcow2(t, image, tc.options, "", cbase, "qcow2")
			case "":
				if tc.name == "compressed-target" {
					copy(model, base)
					testutil.QemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", rawBase, image)
				} else {
					testutil.MakeQcow2(t, image, tc.options, fmt.Sprint(size), "", "")
				}
			}
			w, _ := openFileWriter(t, image)
			randomWorkload(t, w, model, uint64(ci)+100, 60)
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			requireClean(t, image)
			compareWithQemu(t, image, model)
		})
	}
}

// TestWriterCrashAtEveryRequest stops the device after its N-th request,
// for every N of a workload that allocates L2 tables, refcount blocks and
// grows the refcount table (512-byte clusters, 64-bit refcounts: a block
// covers 32 KiB and the first table 2 MiB). After each crash qemu-img
// check must find no corruption, every write flushed before the crash must
// read back, and every other write reads either old or new bytes. It runs
// on devices with 512- and 4096-byte logical blocks (eight clusters share
// a block there, so every metadata write is a read-modify-write).
func TestWriterCrashAtEveryRequest(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	for _, bs := range []int64{512, 4096} {
		t.Run(fmt.Sprint("block-", bs), func(t *testing.T) { crashAtEveryRequest(t, bs) })
	}
}

func crashAtEveryRequest(t *testing.T, bs int64) {
	const size = 4 << 20
	dir := t.TempDir()
	rawBase := filepath.Join(dir, "base.raw")
	base := writeRandomFile(t, rawBase, size, 1)
	image := filepath.Join(dir, "overlay.qcow2")
	testutil.MakeQcow2(t, image, "cluster_size=512,refcount_bits=64", "", rawBase, "raw")
	pristine, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	if pad := int64(len(pristine)) % bs; pad != 0 {
		pristine = append(pristine, make([]byte, bs-pad)...)
	}

	type op struct {
		off, n int64
		zero   bool
	}
	// Disjoint ranges, so what a flushed write left is never overwritten.
	r := rand.New(rand.NewPCG(3, 4))
	var ops []op
	for off := int64(0); off < 3<<20; {
		n := []int64{700, 4096, 512, 20000, 65536, 130000}[r.IntN(6)]
		ops = append(ops, op{off: off, n: n, zero: r.IntN(8) == 0})
		off += n + int64(r.IntN(3))*512
	}
	r.Shuffle(len(ops), func(i, j int) { ops[i], ops[j] = ops[j], ops[i] })
	patterns := make([][]byte, len(ops))
	for i, o := range ops {
		patterns[i] = make([]byte, o.n)
		if !o.zero {
			patternFill(patterns[i], i+1, o.off)
		}
	}

	// run performs the workload on a fresh copy; it returns the device, how
	// many ops were flushed and how many were attempted.
	run := func(failAfter int) (*memDevice, int, int) {
		dev := &memDevice{data: append(make([]byte, 0, 8<<20), pristine...), bs: bs, growable: true, failAfter: failAfter}
		backing, err := OpenRaw(mustOpen(t, rawBase))
		if err != nil {
			t.Fatal(err)
		}
		w, err := OpenWriter(dev, int64(len(dev.data)), WriterOptions{BlockSize: int(bs), Backing: backing})
		if err != nil {
			t.Fatal(err)
		}
		defer w.img.Close()
		flushed := 0
		for i, o := range ops {
			if o.zero {
				err = w.WriteZeroes(o.off, o.n)
			} else {
				_, err = w.WriteAt(patterns[i], o.off)
			}
			if err == nil && i%5 == 4 {
				if err = w.Flush(); err == nil {
					flushed = i + 1
				}
			}
			if err != nil {
				return dev, flushed, i + 1
			}
		}
		if err := w.Close(); err == nil {
			flushed = len(ops)
		}
		return dev, flushed, len(ops)
	}

	full, _, _ := run(0)
	total := full.requests
	t.Logf("%d ops, %d device requests", len(ops), total)
	if total < 50 {
		t.Fatalf("workload too small: %d requests", total)
	}
	if h, err := ReadHeader(bytesReaderAt(full.data), int64(len(full.data))); err != nil || h.RefcountTableOffset == 0 {
		t.Fatal(err)
	} else if orig, _ := ReadHeader(bytesReaderAt(pristine), int64(len(pristine))); orig.RefcountTableOffset == h.RefcountTableOffset {
		t.Fatal("the workload did not grow the refcount table")
	}
	// checkCrashAt crashes the workload after request n and judges the
	// image; it reports failures with t.Errorf (it runs on workers).
	checkCrashAt := func(n int, crashed string) bool {
		dev, flushed, attempted := run(n)
		img := dev.snapshot()
		if !crashedImageConsistent(t, img, crashed, n, total) {
			return false
		}
		backing, err := OpenRaw(mustOpen(t, rawBase))
		if err != nil {
			t.Error(err)
			return false
		}
		reader, err := OpenImage(bytesReaderAt(img), int64(len(img)), backing)
		if err != nil {
			t.Errorf("crash after request %d: reopening: %v", n, err)
			return false
		}
		defer reader.Close()
		for i, o := range ops[:attempted] {
			got := make([]byte, o.n)
			if _, err := reader.ReadAt(got, o.off); err != nil {
				t.Errorf("crash after request %d: reading op %d: %v", n, i, err)
				return false
			}
			want := patterns[i]
			if i < flushed {
				if !bytesEqual(got, want) {
					t.Errorf("crash after request %d: op %d (%d bytes at %d) was flushed but does not read back", n, i, o.n, o.off)
					return false
				}
				continue
			}
			// Unflushed: each 512-byte cluster piece is either old or new.
			old := base[o.off : o.off+o.n]
			for p := int64(0); p < o.n; {
				end := min(o.n, (o.off+p)/512*512+512-o.off)
				if !bytesEqual(got[p:end], want[p:end]) && !bytesEqual(got[p:end], old[p:end]) {
					t.Errorf("crash after request %d: op %d bytes %d-%d are neither old nor new", n, i, o.off+p, o.off+end)
					return false
				}
				p = end
			}
		}
		return true
	}
	// qemu-img check is the slow part; two workers share the Ns.
	var wg sync.WaitGroup
	var failed atomic.Bool
	for worker := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			crashed := filepath.Join(dir, fmt.Sprintf("crashed-%d.qcow2", worker))
			for n := 1 + worker; n <= total && !failed.Load(); n += 2 {
				if !checkCrashAt(n, crashed) {
					failed.Store(true)
				}
			}
		}()
	}
	wg.Wait()
}

func mustOpen(t testing.TB, path string) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

type bytesReaderAt []byte

func (b bytesReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(b)) {
		return 0, errors.New("EOF")
	}
	n := copy(p, b[off:])
	if n < len(p) {
		return n, errors.New("short read")
	}
	return n, nil
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

// TestWriterRefusals: what the writer does not handle is refused before
// anything is written.
func TestWriterRefusals(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	cases := []struct {
		name  string
		setup func(path string)
		want  error
	}{
		{"snapshot", func(p string) {
			testutil.MakeQcow2(t, p, "", "1M", "", "")
			testutil.QemuImg(t, "snapshot", "-c", "s1", p)
			// qemu ends the file inside the last (unpadded) snapshot entry,
			// which ReadHeader's walk rejects; pad it so the writer's own
			// refusal is what is tested.
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(p, (st.Size()+65535)/65536*65536); err != nil {
				t.Fatal(err)
			}
		}, ErrUnsupported},
		{"dirty bit", func(p string) {
			testutil.MakeQcow2(t, p, "", "1M", "", "")
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt([]byte{1}, 79); err != nil { // incompatible_features bit 0
				t.Fatal(err)
			}
		}, ErrUnsupported},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name+".qcow2")
			tc.setup(p)
			before, _ := os.ReadFile(p)
			tgt, err := hostblk.OpenTarget(p, false)
			if err != nil {
				t.Fatal(err)
			}
			defer tgt.Close()
			_, err = OpenWriter(tgt, tgt.Size, WriterOptions{BlockSize: tgt.BlockSize})
			if !errors.Is(err, tc.want) || !IsRefusal(err) {
				t.Fatalf("OpenWriter: %v, want a refusal wrapping %v", err, tc.want)
			}
			t.Log(err)
			if after, _ := os.ReadFile(p); string(after) != string(before) {
				t.Fatal("the refused image was modified")
			}
		})
	}
}

// TestWriterClearsAutoclear: bitmaps are not updated, so their autoclear
// bit goes before the first write.
func TestWriterClearsAutoclear(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	image := filepath.Join(t.TempDir(), "bitmap.qcow2")
	testutil.MakeQcow2(t, image, "", "4M", "", "")
	testutil.QemuImg(t, "bitmap", "--add", image, "b0")
	w, tgt := openFileWriter(t, image)
	if w.Header().AutoclearFeatures&AutoclearBitmaps == 0 {
		t.Fatal("test image has no bitmaps autoclear bit")
	}
	p := make([]byte, 4096)
	patternFill(p, 1, 0)
	if _, err := w.WriteAt(p, 8192); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f := mustOpen(t, image)
	defer f.Close()
	h, err := ReadHeader(f, tgt.Size)
	if err != nil {
		t.Fatal(err)
	}
	if h.AutoclearFeatures != 0 {
		t.Fatalf("autoclear features %#x after a write, want 0", h.AutoclearFeatures)
	}
	// qemu now ignores the bitmaps ("a program lacking bitmap support
	// modified this file"), so their clusters count as leaks, never as
	// corruption.
	if res := qemuCheck(t, image); res.Corruptions != 0 || res.CheckErrors != 0 {
		t.Fatalf("qemu-img check: %+v", res)
	}
}

// TestSecondWriterRefused: one writer per image file.
func TestSecondWriterRefused(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	image := filepath.Join(t.TempDir(), "one.qcow2")
	testutil.MakeQcow2(t, image, "", "1M", "", "")
	first, err := hostblk.OpenTarget(image, false)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if second, err := hostblk.OpenTarget(image, false); !errors.Is(err, hostblk.ErrTargetBusy) {
		if second != nil {
			second.Close()
		}
		t.Fatalf("second OpenTarget: %v, want hostblk.ErrTargetBusy", err)
	}
}

// TestOpenTargetNoDirectIO: on a filesystem that refuses O_DIRECT the
// error says so (ErrNoDirectIO, keeping the kernel's EINVAL) unless
// buffered I/O is asked for. ramfs refuses O_DIRECT (tmpfs accepts it
// since Linux 6.6, so it no longer exercises this path).
func TestOpenTargetNoDirectIO(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	if err := unix.Mount("volagent-test-ramfs", dir, "ramfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0700"); err != nil {
		t.Fatalf("mounting a ramfs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting the ramfs on %s: %v", dir, err)
		}
	})
	p := filepath.Join(dir, "x.qcow2")
	if err := os.WriteFile(p, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	// The precondition, checked rather than assumed.
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_DIRECT, 0)
	if err == nil {
		unix.Close(fd)
		t.Fatal("this kernel's ramfs accepts O_DIRECT: find another filesystem that refuses it for this test")
	}
	if !errors.Is(err, unix.EINVAL) {
		t.Fatalf("O_DIRECT open on ramfs: %v, want EINVAL", err)
	}
	tgt, err := hostblk.OpenTarget(p, false)
	if err == nil {
		tgt.Close()
		t.Fatal("OpenTarget on a filesystem without O_DIRECT succeeded; want hostblk.ErrNoDirectIO")
	}
	if !errors.Is(err, hostblk.ErrNoDirectIO) || !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), p) {
		t.Fatalf("OpenTarget on a filesystem without O_DIRECT: %v, want hostblk.ErrNoDirectIO wrapping EINVAL and naming %s", err, p)
	}
	tgt, err = hostblk.OpenTarget(p, true)
	if err != nil {
		t.Fatalf("buffered OpenTarget: %v", err)
	}
	if tgt.Direct {
		t.Error("buffered OpenTarget says Direct")
	}
	tgt.Close()
}

// TestWriterExtendedL2SubclusterZeroes: with extended L2 entries, zeroing
// whole subclusters sets their zero bits (no data written), in allocated
// and unallocated clusters alike.
func TestWriterExtendedL2SubclusterZeroes(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	const size = 1 << 20
	dir := t.TempDir()
	rawBase := filepath.Join(dir, "base.raw")
	model := guestModel(writeRandomFile(t, rawBase, size, 5))
	image := filepath.Join(dir, "ext.qcow2")
	testutil.MakeQcow2(t, image, "extended_l2=on,cluster_size=64k", "", rawBase, "raw")
	w, _ := openFileWriter(t, image)
	p := make([]byte, 65536)
	patternFill(p, 1, 0)
	if _, err := w.WriteAt(p, 0); err != nil {
		t.Fatal(err)
	}
	model.write(p, 0)
	// 2 KiB subclusters: [4096, 12288) is four whole ones; 100 bytes at
	// each edge are written as data. The second range lies in a cluster
	// never allocated.
	for _, r := range [][2]int64{{4096 - 100, 8192 + 200}, {65536 + 2048, 6144}} {
		if err := w.WriteZeroes(r[0], r[1]); err != nil {
			t.Fatal(err)
		}
		model.zero(r[0], r[1])
	}
	for _, off := range []int64{4096, 12288 - 1, 65536 + 2048, 65536 + 8191} {
		if m, err := w.Map(off); err != nil || m.Kind != MapZero {
			t.Fatalf("Map(%d) = %+v, %v; want a zero subcluster", off, m, err)
		}
	}
	if m, err := w.Map(65536 + 8192); err != nil || m.Kind != MapUnallocated {
		t.Fatalf("Map(%d) = %+v, %v; want unallocated", 65536+8192, m, err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	requireClean(t, image)
	compareWithQemu(t, image, model)
}

// TestWriterCrashWhileFreeing stops the device after every request of a
// workload that frees clusters: partial overwrites of compressed clusters
// (several streams share a host cluster), discards and zero writes over
// allocated data, each op followed by Flush. After every crash qemu-img
// check finds no corruption, Check agrees, and every cluster reads either
// as after the last completed Flush or as after the op in progress.
func TestWriterCrashWhileFreeing(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	const size = 1 << 20
	const cluster = 4096
	dir := t.TempDir()
	src := make([]byte, size)
	for c := 0; c < size/cluster; c++ { // compressible, different per cluster
		for i := range cluster {
			src[c*cluster+i] = byte(c*7 + i%13)
		}
	}
	rawSource := filepath.Join(dir, "source.raw")
	if err := os.WriteFile(rawSource, src, 0o600); err != nil {
		t.Fatal(err)
	}
	image := filepath.Join(dir, "compressed.qcow2")
	testutil.QemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", rawSource, image)
	pristine, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}

	type op struct {
		kind   int // 0 write, 1 zero, 2 discard
		off, n int64
	}
	r := rand.New(rand.NewPCG(8, 9))
	var ops []op
	models := []guestModel{guestModel(bytes.Clone(src))}
	for i := range 40 {
		o := op{kind: []int{0, 0, 0, 1, 2}[r.IntN(5)], n: 1 + r.Int64N(3*cluster)}
		o.off = r.Int64N(size - o.n)
		m := guestModel(bytes.Clone(models[len(models)-1]))
		switch o.kind {
		case 0:
			p := make([]byte, o.n)
			patternFill(p, i+1, o.off)
			m.write(p, o.off)
		case 1:
			m.zero(o.off, o.n)
		case 2:
			if first, end := ceilDiv(o.off, cluster)*cluster, (o.off+o.n)/cluster*cluster; first < end {
				m.zero(first, end-first)
			}
		}
		ops = append(ops, o)
		models = append(models, m)
	}
	run := func(failAfter int) (*memDevice, int) {
		dev := &memDevice{data: append(make([]byte, 0, 4<<20), pristine...), bs: 512, growable: true, failAfter: failAfter}
		w, err := OpenWriter(dev, int64(len(dev.data)), WriterOptions{BlockSize: 512})
		if err != nil {
			t.Error(err)
			return dev, 0
		}
		defer w.img.Close()
		for i, o := range ops {
			switch o.kind {
			case 0:
				p := make([]byte, o.n)
				patternFill(p, i+1, o.off)
				_, err = w.WriteAt(p, o.off)
			case 1:
				err = w.WriteZeroes(o.off, o.n)
			case 2:
				err = w.Discard(o.off, o.n)
			}
			if err == nil {
				err = w.Flush()
			}
			if err != nil {
				return dev, i
			}
		}
		if w.Close() != nil {
			return dev, len(ops) - 1
		}
		return dev, len(ops)
	}
	full, done := run(0)
	if done != len(ops) {
		t.Fatalf("workload without faults stopped at op %d", done)
	}
	total := full.requests
	t.Logf("%d ops, %d device requests", len(ops), total)
	final := filepath.Join(dir, "final.qcow2")
	if err := os.WriteFile(final, full.data, 0o600); err != nil {
		t.Fatal(err)
	}
	requireClean(t, final)
	compareWithQemu(t, final, models[len(ops)])

	checkCrashAt := func(n int, crashed string) bool {
		dev, flushed := run(n)
		img := dev.snapshot()
		if !crashedImageConsistent(t, img, crashed, n, total) {
			return false
		}
		reader, err := OpenImage(bytesReaderAt(img), int64(len(img)), nil)
		if err != nil {
			t.Errorf("crash after request %d: reopening: %v", n, err)
			return false
		}
		got := make([]byte, size)
		if _, err := reader.ReadAt(got, 0); err != nil {
			t.Errorf("crash after request %d: reading: %v", n, err)
			return false
		}
		before, after := models[flushed], models[min(flushed+1, len(ops))]
		for c := int64(0); c < size; c += cluster {
			g := got[c : c+cluster]
			if !bytesEqual(g, before[c:c+cluster]) && !bytesEqual(g, after[c:c+cluster]) {
				t.Errorf("crash after request %d (op %d in progress): cluster at %d is neither before nor after", n, flushed, c)
				return false
			}
		}
		return true
	}
	var wg sync.WaitGroup
	var failed atomic.Bool
	for worker := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			crashed := filepath.Join(dir, fmt.Sprintf("crashed-%d.qcow2", worker))
			for n := 1 + worker; n <= total && !failed.Load(); n += 2 {
				if !checkCrashAt(n, crashed) {
					failed.Store(true)
				}
			}
		}()
	}
	wg.Wait()
}

// TestWriterClustersSmallerThanBlocks: 512-byte clusters on a device with
// 4096-byte logical blocks; every request is still whole aligned blocks
// (memDevice enforces it), neighbours are read-modify-written.
func TestWriterClustersSmallerThanBlocks(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	const size = 2 << 20
	dir := t.TempDir()
	rawBase := filepath.Join(dir, "base.raw")
	model := guestModel(writeRandomFile(t, rawBase, size, 12))
	image := filepath.Join(dir, "small.qcow2")
	testutil.MakeQcow2(t, image, "cluster_size=512", "", rawBase, "raw")
	data, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	dev := &memDevice{data: data, bs: 4096, growable: true}
	if pad := len(dev.data) % 4096; pad != 0 {
		dev.data = append(dev.data, make([]byte, 4096-pad)...)
	}
	backing, err := OpenRaw(mustOpen(t, rawBase))
	if err != nil {
		t.Fatal(err)
	}
	w, err := OpenWriter(dev, int64(len(dev.data)), WriterOptions{BlockSize: 4096, Backing: backing})
	if err != nil {
		t.Fatal(err)
	}
	randomWorkload(t, w, model, 99, 60)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(image, dev.data, 0o600); err != nil {
		t.Fatal(err)
	}
	requireClean(t, image)
	compareWithQemu(t, image, model)
}

// crashedImageConsistent writes the image a crash after request n (of
// total) left to path and judges it: qemu-img check finds no corruption
// and no check error, and Check agrees with it on every count. Failures
// are reported with t.Errorf (callers run on workers).
func crashedImageConsistent(t *testing.T, img []byte, path string, n, total int) bool {
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Error(err)
		return false
	}
	qres := qemuCheck(t, path)
	if qres.Corruptions != 0 || qres.CheckErrors != 0 {
		t.Errorf("crash after request %d of %d: qemu-img check: %+v", n, total, qres)
		return false
	}
	if res, err := Check(bytesReaderAt(img), int64(len(img))); err != nil || res.Corruptions != qres.Corruptions || res.Leaks != qres.Leaks || res.CheckErrors != qres.CheckErrors {
		t.Errorf("crash after request %d: Check %+v, %v; qemu-img check %+v", n, res, err, qres)
		return false
	}
	return true
}

// TestWriterEveryRefcountWidth: every refcount width qemu writes (1 to 64
// bits), with 512-byte clusters so the workload creates refcount blocks
// (and, for 32 and 64 bits, grows the refcount table); qemu-img check and
// the guest view judge.
// Sub-byte widths are packed from the lowest bit up, as qemu reads them.
func TestWriterEveryRefcountWidth(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	const size = 4 << 20
	for _, bits := range []int{1, 2, 4, 8, 16, 32, 64} {
		t.Run(fmt.Sprint("bits-", bits), func(t *testing.T) {
			dir := t.TempDir()
			rawBase := filepath.Join(dir, "base.raw")
			model := guestModel(writeRandomFile(t, rawBase, size, uint64(bits)))
			image := filepath.Join(dir, "overlay.qcow2")
			testutil.MakeQcow2(t, image, fmt.Sprintf("cluster_size=512,refcount_bits=%d", bits), "", rawBase, "raw")
			f := mustOpen(t, image)
			st, err := f.Stat()
			if err != nil {
				t.Fatal(err)
			}
			orig, err := ReadHeader(f, st.Size())
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			w, tgt := openFileWriter(t, image)
			randomWorkload(t, w, model, uint64(bits)+40, 40)
			// 512-byte blocks of 32- and 64-bit refcounts cover 64 and 32
			// KiB: the first 512-byte table (64 blocks) no longer suffices.
			if bits >= 32 && w.Header().RefcountTableOffset == orig.RefcountTableOffset {
				t.Fatal("the workload did not grow the refcount table")
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			tgt.Close() // releases qemu's image locks for qemu to judge
			requireClean(t, image)
			compareWithQemu(t, image, model)
			// qemu allocates after volagent: its refcounts must agree.
			testutil.QemuIO(t, "qcow2", image, "write -P 0x5a 1m 300k", "discard 0 64k")
			requireClean(t, image)
		})
	}
}

// countingDevice counts the bytes written through it.
type countingDevice struct {
	Device
	written int64
}

func (d *countingDevice) WriteAt(p []byte, off int64) (int, error) {
	d.written += int64(len(p))
	return d.Device.WriteAt(p, off)
}

// TestWriterSubclusterAllocation: with extended L2 entries a write into a
// cluster without a host cluster allocates one and marks only the
// subclusters it touches; a partial subcluster at an edge is completed
// from the backing file, nothing else is copied. Partial discards mark
// whole subclusters zero. qemu judges the image.
func TestWriterSubclusterAllocation(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	const size = 4 << 20
	const c, sub = 128 << 10, 4 << 10
	dir := t.TempDir()
	rawBase := filepath.Join(dir, "base.raw")
	model := guestModel(writeRandomFile(t, rawBase, size, 21))
	image := filepath.Join(dir, "ext.qcow2")
	testutil.MakeQcow2(t, image, "extended_l2=on,cluster_size=128k", "", rawBase, "raw")
	tgt, err := hostblk.OpenTarget(image, false)
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Close()
	dev := &countingDevice{Device: tgt}
	w, err := OpenWriter(dev, tgt.Size, WriterOptions{BlockSize: tgt.BlockSize, Backing: backingOf(t, image)})
	if err != nil {
		t.Fatal(err)
	}
	write := func(off, n int64) {
		t.Helper()
		p := AlignedBuffer(int(n), 4096)
		patternFill(p, int(off), off)
		if _, err := w.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		model.write(p, off)
	}
	wantKind := func(off int64, kind MappingKind) {
		t.Helper()
		if m, err := w.Map(off); err != nil || m.Kind != kind {
			t.Fatalf("Map(%d) = %+v, %v; want %v", off, m, err, kind)
		}
	}
	write(0, sub) // allocates the L2 table and reserves clusters ahead
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	before := dev.written
	write(3*c+5*sub, sub) // one aligned subcluster
	if got := dev.written - before; got != sub {
		t.Fatalf("a %d-byte write into a fresh cluster wrote %d bytes, want %d (no copy-on-write)", sub, got, sub)
	}
	wantKind(3*c+5*sub, MapData)
	wantKind(3*c+4*sub, MapUnallocated)
	wantKind(3*c+6*sub, MapUnallocated)
	before = dev.written
	write(5*c+2*sub+100, sub) // straddles subclusters 2 and 3 of a fresh cluster
	if got := dev.written - before; got != 2*sub {
		t.Fatalf("an unaligned %d-byte write wrote %d bytes, want the two subclusters it touches (%d)", sub, got, 2*sub)
	}
	wantKind(5*c+2*sub, MapData)
	wantKind(5*c+3*sub, MapData)
	wantKind(5*c+4*sub, MapUnallocated)
	// Into a cluster that has a host cluster: subclusters 7 and 8 are
	// completed in place from the backing file.
	write(3*c+7*sub+10, sub)
	wantKind(3*c+7*sub, MapData)
	wantKind(3*c+8*sub, MapData)
	wantKind(3*c+6*sub, MapUnallocated)
	// A partial discard: whole subclusters read zeros; freeing the last
	// allocated subclusters frees the host cluster.
	if err := w.Discard(5*c+sub+1, 3*sub); err != nil {
		t.Fatal(err)
	}
	model.zero(5*c+2*sub, 2*sub)
	wantKind(5*c+2*sub, MapZero)
	wantKind(5*c+sub, MapUnallocated)
	if e, _, err := w.lookup(5); err != nil || e != 0 {
		t.Fatalf("L2 entry %#x, %v after discarding its last allocated subclusters; want 0 (host cluster freed)", e, err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	requireClean(t, image)
	compareWithQemu(t, image, model)
}
