package qcow2_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

const (
	createKiB = int64(1) << 10
	createMiB = int64(1) << 20
	createGiB = int64(1) << 30
	createTiB = int64(1) << 40
)

func TestCreateOptionErrors(t *testing.T) {
	good := qcow2.CreateOptions{VirtualSize: createMiB, BackingFile: "/var/lib/images/base.raw", BackingFormat: "raw"}
	with := func(change func(*qcow2.CreateOptions)) qcow2.CreateOptions {
		o := good
		change(&o)
		return o
	}
	cases := []struct {
		name       string
		opts       qcow2.CreateOptions
		targetSize int64
		want       error
		refusal    bool   // an unsafe name is a verdict (exit 3 in the CLI)
		mention    string // the message names the value
	}{
		{"missing backing format", with(func(o *qcow2.CreateOptions) { o.BackingFormat = "" }), createGiB, qcow2.ErrBackingFormatMissing, false, "/var/lib/images/base.raw"},
		{"bad backing format", with(func(o *qcow2.CreateOptions) { o.BackingFormat = "vmdk" }), createGiB, qcow2.ErrBackingFormat, false, `"vmdk"`},
		{"format without backing", with(func(o *qcow2.CreateOptions) { o.BackingFile = "" }), createGiB, qcow2.ErrCreateOption, false, `"raw"`},
		{"json: backing name", with(func(o *qcow2.CreateOptions) { o.BackingFile = `json:{"driver":"nbd"}` }), createGiB, qcow2.ErrBackingName, true, "json:"},
		{"nbd: backing name", with(func(o *qcow2.CreateOptions) { o.BackingFile = "nbd:localhost:10809" }), createGiB, qcow2.ErrBackingName, true, `"nbd:"`},
		{"newline in backing name", with(func(o *qcow2.CreateOptions) { o.BackingFile = "/a\nb" }), createGiB, qcow2.ErrBackingName, true, "control character"},
		{"size not multiple of 512", with(func(o *qcow2.CreateOptions) { o.VirtualSize = createMiB + 1 }), createGiB, qcow2.ErrCreateOption, false, "1048577"},
		{"zero size", with(func(o *qcow2.CreateOptions) { o.VirtualSize = 0 }), createGiB, qcow2.ErrCreateOption, false, "virtual size = 0"},
		{"cluster size not power of two", with(func(o *qcow2.CreateOptions) { o.ClusterSize = 3 * 512 }), createGiB, qcow2.ErrCreateOption, false, "1536"},
		{"cluster size too large", with(func(o *qcow2.CreateOptions) { o.ClusterSize = 4 << 20 }), createGiB, qcow2.ErrCreateOption, false, "4194304"},
		{"block size", with(func(o *qcow2.CreateOptions) { o.BlockSize = 1000 }), createGiB, qcow2.ErrCreateOption, false, "1000"},
		{"L1 over qemu's limit", with(func(o *qcow2.CreateOptions) { o.ClusterSize = 512; o.VirtualSize = createTiB }), 2 * createTiB, qcow2.ErrCreateOption, false, "L1 entries"},
		{"target too small", good, 3 * 64 * createKiB, qcow2.ErrTargetTooSmall, false, "196608"},
		{"target smaller than one block", with(func(o *qcow2.CreateOptions) { o.ClusterSize = 512; o.BlockSize = 4096 }), 2048, qcow2.ErrTargetTooSmall, false, "4096"},
		{"2M clusters on 4M target", with(func(o *qcow2.CreateOptions) { o.ClusterSize = 2 << 20 }), 4 * createMiB, qcow2.ErrTargetTooSmall, false, "8388608"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := &createRecordingWriter{}
			_, err := qcow2.Create(w, tc.targetSize, tc.opts)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Create: got %v, want an error wrapping %q", err, tc.want)
			}
			if got := qcow2.IsRefusal(err); got != tc.refusal {
				t.Errorf("IsRefusal(%v) = %v, want %v", err, got, tc.refusal)
			}
			if !strings.Contains(err.Error(), tc.mention) {
				t.Errorf("error %q does not mention %q", err, tc.mention)
			}
			if len(w.writes) > 0 || w.syncs > 0 {
				t.Errorf("Create wrote %d times and synced %d times before failing", len(w.writes), w.syncs)
			}
		})
	}
}

// createRecordingWriter is an in-memory target that records each write and fails
// any write not aligned to align (in offset, length or buffer address), as
// an O_DIRECT device would.
type createRecordingWriter struct {
	align  int
	data   []byte
	writes [][2]int64 // offset, length
	syncs  int
}

func (w *createRecordingWriter) WriteAt(p []byte, off int64) (int, error) {
	if w.syncs > 0 {
		return 0, errors.New("write after Sync")
	}
	w.writes = append(w.writes, [2]int64{off, int64(len(p))})
	if a := int64(w.align); a > 0 {
		if off%a != 0 || int64(len(p))%a != 0 || len(p) > 0 && uintptr(unsafe.Pointer(&p[0]))%uintptr(a) != 0 {
			return 0, fmt.Errorf("unaligned write: offset %d length %d address %p, block size %d", off, len(p), p, a)
		}
	}
	if end := off + int64(len(p)); end > int64(len(w.data)) {
		w.data = append(w.data, make([]byte, end-int64(len(w.data)))...)
	}
	copy(w.data[off:], p)
	return len(p), nil
}

func (w *createRecordingWriter) Sync() error { w.syncs++; return nil }

// TestCreateLayout checks, without qemu, that Create writes one aligned
// block of metadata, that ReadHeader accepts it, and that the refcounts
// cover exactly the metadata clusters.
func TestCreateLayout(t *testing.T) {
	for _, cs := range []int{512, 4096, 64 << 10, 2 << 20} {
		for _, bs := range []int{512, 4096} {
			for _, backing := range []string{"", "raw", "qcow2"} {
				vsize := createLargeVirtualSize(cs)
				t.Run(fmt.Sprintf("cluster%d/block%d/%s", cs, bs, createBackingLabel(backing)), func(t *testing.T) {
					opts := qcow2.CreateOptions{VirtualSize: vsize, ClusterSize: cs, BlockSize: bs}
					if backing != "" {
						opts.BackingFile, opts.BackingFormat = "/srv/base."+backing, backing
					}
					target := 256 * createGiB
					w := &createRecordingWriter{align: bs}
					// Stale bytes the metadata must overwrite.
					w.data = bytes.Repeat([]byte{0xff}, 16<<20)
					l, err := qcow2.Create(w, target, opts)
					if err != nil {
						t.Fatal(err)
					}
					if len(w.writes) != 1 || w.writes[0] != [2]int64{0, l.WriteSize} || w.syncs != 1 {
						t.Fatalf("writes %v syncs %d, want one write [0 %d] and one sync", w.writes, w.syncs, l.WriteSize)
					}
					if l.WriteSize != createRoundUp(l.MetadataClusters*int64(cs), int64(bs)) {
						t.Errorf("WriteSize %d, want %d clusters rounded up to %d", l.WriteSize, l.MetadataClusters, bs)
					}
					img := w.data[:l.WriteSize]
					h, err := qcow2.ReadHeader(bytes.NewReader(img), int64(len(img)))
					if err != nil {
						t.Fatalf("ReadHeader: %v", err)
					}
					if h.Version != 3 || h.Size != uint64(vsize) || h.ClusterSize() != int64(cs) ||
						h.BackingFile != opts.BackingFile || h.BackingFormat != opts.BackingFormat ||
						h.RefcountBits() != 16 || h.IncompatibleFeatures != 0 || h.CompatibleFeatures != 0 {
						t.Errorf("header %+v does not match %+v", h, opts)
					}
					if int64(h.L1Size) != l.L1Entries || int64(h.L1TableOffset) != l.L1TableOffset {
						t.Errorf("L1 %d entries at %d, layout says %d at %d", h.L1Size, h.L1TableOffset, l.L1Entries, l.L1TableOffset)
					}
					if l.FeatureTable != (len(h.FeatureNames) == 8) {
						t.Errorf("feature table: layout %v, header has %d names", l.FeatureTable, len(h.FeatureNames))
					}
					checkCreatedRefcounts(t, img, l)
					// Everything after the header bytes and up to the end of
					// the write is metadata: no stale 0xff survives.
					if i := bytes.IndexByte(img[l.RefcountTableOffset:], 0xff); i >= 0 {
						t.Errorf("stale byte 0xff survives at %d", l.RefcountTableOffset+int64(i))
					}
				})
			}
		}
	}
}

// checkCreatedRefcounts decodes the refcount table and blocks: every metadata
// cluster has refcount 1, everything else 0, and the table covers the
// target.
func checkCreatedRefcounts(t *testing.T, img []byte, l *qcow2.CreateLayout) {
	t.Helper()
	c := l.ClusterSize
	be := func(b []byte) uint64 {
		var v uint64
		for _, x := range b {
			v = v<<8 | uint64(x)
		}
		return v
	}
	entries := l.RefcountTableClusters * c / 8
	refsPerBlock := c / 2
	for i := int64(0); i < entries; i++ {
		blockOff := int64(be(img[l.RefcountTableOffset+i*8 : l.RefcountTableOffset+i*8+8]))
		if i >= l.RefcountBlocks {
			if blockOff != 0 {
				t.Fatalf("refcount table entry %d = %d, want 0", i, blockOff)
			}
			continue
		}
		if blockOff != l.RefcountBlockOffset+i*c {
			t.Fatalf("refcount table entry %d = %d, want %d", i, blockOff, l.RefcountBlockOffset+i*c)
		}
		for j := int64(0); j < refsPerBlock; j++ {
			cluster := i*refsPerBlock + j
			got := be(img[blockOff+2*j : blockOff+2*j+2])
			want := uint64(0)
			if cluster < l.MetadataClusters {
				want = 1
			}
			if got != want {
				t.Fatalf("refcount of cluster %d = %d, want %d", cluster, got, want)
			}
		}
	}
	if l.CoveredSize < 256*createGiB && l.RefcountTableClusters*c < 8<<20 {
		t.Errorf("refcount table covers %d bytes, less than the 256 GiB target", l.CoveredSize)
	}
}

// createLargeVirtualSize gives each cluster size a virtual size whose L1 table
// spans several clusters.
func createLargeVirtualSize(clusterSize int) int64 {
	switch clusterSize {
	case 512:
		return createGiB // L1: 32768 entries, 512 clusters; 3 refcount blocks
	case 4096:
		return 64 * createGiB // L1: 32768 entries, 64 clusters
	case 64 << 10:
		return 16 * createTiB // L1: 32768 entries, 4 clusters
	default:
		return 4 * createTiB // 2 MiB clusters: one L1 cluster
	}
}

func createBackingLabel(format string) string {
	if format == "" {
		return "nobacking"
	}
	return format
}

func createRoundUp(a, b int64) int64 { return (a + b - 1) / b * b }

func TestCreateMaxImageSize(t *testing.T) {
	for _, cs := range []int{512, 64 << 10} {
		opts := qcow2.CreateOptions{VirtualSize: createGiB, ClusterSize: cs}
		max, err := qcow2.MaxImageSize(opts)
		if err != nil {
			t.Fatal(err)
		}
		// Data alone is the virtual size; L2 tables add 1/(cs/8).
		if min := createGiB + createGiB/int64(cs/8); max < min || max > 2*createGiB {
			t.Errorf("cluster %d: MaxImageSize %d, want between %d and %d", cs, max, min, 2*createGiB)
		}
	}
}

func TestCreateBackingVirtualSize(t *testing.T) {
	dir := t.TempDir()
	testutil.RequireTool(t, "qemu-img")
	q := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", q, "3G")
	f, size := openCreateInput(t, q)
	got, err := qcow2.BackingVirtualSize(f, size, "qcow2")
	if err != nil || got != 3*createGiB {
		t.Errorf("qcow2 backing: %d, %v; want %d", got, err, 3*createGiB)
	}
	if got, err := qcow2.BackingVirtualSize(f, size, "raw"); err != nil || got != createRoundUp(size, 512) {
		t.Errorf("qcow2 file as raw: %d, %v; want its length %d", got, err, size)
	}
	if _, err := qcow2.BackingVirtualSize(f, size, ""); !errors.Is(err, qcow2.ErrBackingFormatMissing) {
		t.Errorf("no format: %v, want ErrBackingFormatMissing", err)
	}
	if _, err := qcow2.BackingVirtualSize(f, size, "vmdk"); !errors.Is(err, qcow2.ErrBackingFormat) {
		t.Errorf("vmdk: %v, want ErrBackingFormat", err)
	}

	r := filepath.Join(dir, "odd.raw")
	if err := os.WriteFile(r, make([]byte, 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	f, size = openCreateInput(t, r)
	if got, err := qcow2.BackingVirtualSize(f, size, "raw"); err != nil || got != 1024 {
		t.Errorf("raw of 1000 bytes: %d, %v; want 1024 (rounded up to 512 like qemu)", got, err)
	}
	if _, err := qcow2.BackingVirtualSize(f, size, "qcow2"); !qcow2.IsRefusal(err) || !errors.Is(err, qcow2.ErrNotQcow2) {
		t.Errorf("raw as qcow2: %v, want a refusal wrapping ErrNotQcow2", err)
	}

	// A qcow2 backing whose own backing format breaks the policy is refused.
	vmdkBacked := filepath.Join(dir, "vmdk-backed.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", r, "-F", "vmdk", vmdkBacked, "1M")
	f, size = openCreateInput(t, vmdkBacked)
	if _, err := qcow2.BackingVirtualSize(f, size, "qcow2"); !errors.Is(err, qcow2.ErrBackingFormat) || !qcow2.IsRefusal(err) {
		t.Errorf("qcow2 backing with a vmdk backing: %v, want a refusal wrapping ErrBackingFormat", err)
	}
}

func openCreateInput(t *testing.T, path string) (*os.File, int64) {
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
	return f, st.Size()
}

// TestCreateQemuAcceptsFiles is the oracle on regular files: for every
// cluster size, backing kind and a small and a large virtual size, qemu-img
// check finds no errors and no leaks, qemu-img info reports the backing as
// asked, and a qemu-io write lands and reads back over the backing data.
func TestCreateQemuAcceptsFiles(t *testing.T) {
	testutil.RequireTool(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	rawBase, qcowBase := makeCreateBackings(t, dir, 64*createMiB)
	for _, cs := range []int{512, 4096, 64 << 10, 2 << 20} {
		for _, backing := range []string{"", "raw", "qcow2"} {
			for _, vsize := range []int64{createMiB, createLargeVirtualSize(cs)} {
				name := fmt.Sprintf("cluster%d/%s/size%d", cs, createBackingLabel(backing), vsize)
				t.Run(name, func(t *testing.T) {
					opts := qcow2.CreateOptions{VirtualSize: vsize, ClusterSize: cs}
					switch backing {
					case "raw":
						opts.BackingFile, opts.BackingFormat = rawBase, "raw"
					case "qcow2":
						opts.BackingFile, opts.BackingFormat = qcowBase, "qcow2"
					}
					path := filepath.Join(t.TempDir(), "overlay.qcow2")
					f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
					if err != nil {
						t.Fatal(err)
					}
					maxSize, err := qcow2.MaxImageSize(opts)
					if err != nil {
						t.Fatal(err)
					}
					l, err := qcow2.Create(f, maxSize, opts)
					if cerr := f.Close(); err == nil {
						err = cerr
					}
					if err != nil {
						t.Fatal(err)
					}
					if st, _ := os.Stat(path); st.Size() != l.WriteSize || st.Size()%int64(cs) != 0 {
						t.Errorf("file is %d bytes, want the metadata size %d (whole clusters)", st.Size(), l.WriteSize)
					}
					checkCreatedWithQemu(t, path, opts)
					checkCreatedHeader(t, path, opts)
					if vsize == createMiB || cs == 512 {
						writeAndReadBackCreated(t, path, opts)
					}
				})
			}
		}
	}
}

// makeCreateBackings writes a raw file filled with 0x5a and a qcow2 image whose
// first half reads as 0x3c, both of size bytes.
func makeCreateBackings(t *testing.T, dir string, size int64) (rawPath, qcowPath string) {
	t.Helper()
	rawPath = filepath.Join(dir, "base.raw")
	if err := os.WriteFile(rawPath, bytes.Repeat([]byte{0x5a}, int(size)), 0o600); err != nil {
		t.Fatal(err)
	}
	qcowPath = filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", qcowPath, fmt.Sprint(size))
	testutil.Run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x3c 0 %d", size/2), qcowPath)
	return rawPath, qcowPath
}

// createBackingPattern is what the backing made by makeCreateBackings holds at offset 64k.
func createBackingPattern(format string) string {
	switch format {
	case "raw":
		return "0x5a"
	case "qcow2":
		return "0x3c"
	}
	return "0x00"
}

// createQemuCheck holds the fields of qemu-img check --output=json we judge.
type createQemuCheck struct {
	CheckErrors int  `json:"check-errors"`
	Corruptions int  `json:"corruptions"`
	Leaks       int  `json:"leaks"`
	Fragmented  *int `json:"fragmented-clusters"`
}

// qemuCheckCreated runs qemu-img check on the image alone (no backing opened)
// and fails on any error, corruption or leak.
func qemuCheckCreated(t *testing.T, path string) {
	t.Helper()
	driver := "file"
	if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeDevice != 0 {
		driver = "host_device"
	}
	spec := fmt.Sprintf(`json:{"driver":"qcow2","file":{"driver":%q,"filename":%q},"backing":null}`, driver, path)
	out, err := exec.Command("qemu-img", "check", "--output=json", spec).Output()
	var stderr string
	if ee, ok := err.(*exec.ExitError); ok {
		stderr = string(ee.Stderr)
	}
	if err != nil {
		t.Fatalf("qemu-img check %s: %v\nstdout: %s\nstderr: %s", path, err, out, stderr)
	}
	var res createQemuCheck
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("qemu-img check output %q: %v", out, err)
	}
	if res.CheckErrors != 0 || res.Corruptions != 0 || res.Leaks != 0 {
		t.Fatalf("qemu-img check %s: %+v\n%s", path, res, out)
	}
}

type createQemuInfo struct {
	VirtualSize    int64  `json:"virtual-size"`
	ClusterSize    int64  `json:"cluster-size"`
	Format         string `json:"format"`
	BackingFile    string `json:"backing-filename"`
	BackingFormat  string `json:"backing-filename-format"`
	FormatSpecific struct {
		Data struct {
			Compat       string `json:"compat"`
			RefcountBits int    `json:"refcount-bits"`
			Corrupt      bool   `json:"corrupt"`
		} `json:"data"`
	} `json:"format-specific"`
	Dirty bool `json:"dirty-flag"`
}

// checkCreatedWithQemu runs qemu-img check and info on the image and compares info
// with opts.
func checkCreatedWithQemu(t *testing.T, path string, opts qcow2.CreateOptions) {
	t.Helper()
	qemuCheckCreated(t, path)
	out := testutil.Run(t, "qemu-img", "info", "--output=json", "-f", "qcow2", path)
	var info createQemuInfo
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info output %q: %v", out, err)
	}
	cs := int64(opts.ClusterSize)
	if cs == 0 {
		cs = qcow2.DefaultClusterSize
	}
	if info.VirtualSize != opts.VirtualSize || info.ClusterSize != cs || info.Format != "qcow2" ||
		info.BackingFile != opts.BackingFile || info.BackingFormat != opts.BackingFormat ||
		info.FormatSpecific.Data.Compat != "1.1" || info.FormatSpecific.Data.RefcountBits != 16 ||
		info.FormatSpecific.Data.Corrupt || info.Dirty {
		t.Fatalf("qemu-img info %s:\n%s\nwant virtual size %d, cluster size %d, backing %q format %q, compat 1.1, 16-bit refcounts, clean",
			path, out, opts.VirtualSize, cs, opts.BackingFile, opts.BackingFormat)
	}
}

// writeAndReadBackCreated writes 64 KiB through qemu-io (backing present), checks
// the image again and reads the data back, and the unwritten data after it
// as the backing's.
func writeAndReadBackCreated(t *testing.T, path string, opts qcow2.CreateOptions) {
	t.Helper()
	qemuIOCreated(t, path, "write -P 0xab 0 64k")
	qemuCheckCreated(t, path)
	qemuIOCreated(t, path, "read -P 0xab 0 64k")
	qemuIOCreated(t, path, "read -P "+createBackingPattern(opts.BackingFormat)+" 64k 64k")
}

// qemuIOCreated runs one qemu-io command on a qcow2 image (opening its backing) and
// fails if qemu-io fails or a pattern does not match.
func qemuIOCreated(t *testing.T, path, command string) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", command, path).CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("failed")) || bytes.Contains(out, []byte("rror")) {
		t.Fatalf("qemu-io -c %q %s: %v\n%s", command, path, err, out)
	}
}

// TestCreateOnLoopDevice writes overlays onto loop devices with 512 and
// 4096-byte sectors, opened like the CLI opens them (O_DIRECT, O_EXCL), over
// stale 0xff bytes, and has qemu judge them.
func TestCreateOnLoopDevice(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	rawBase, qcowBase := makeCreateBackings(t, dir, 64*createMiB)
	const devSize = 64 << 20
	for _, sector := range []int{512, 4096} {
		for _, cs := range []int{512, 4096, 64 << 10, 2 << 20} {
			for _, backing := range []string{"raw", "qcow2"} {
				t.Run(fmt.Sprintf("sector%d/cluster%d/%s", sector, cs, backing), func(t *testing.T) {
					dev := looptest.Device(t, devSize, sector)
					fillCreateTarget(t, dev, 0xff)
					opts := qcow2.CreateOptions{VirtualSize: 64 * createMiB, ClusterSize: cs, BlockSize: sector,
						BackingFile: rawBase, BackingFormat: backing}
					if backing == "qcow2" {
						opts.BackingFile = qcowBase
					}
					if cs == 64<<10 {
						opts.VirtualSize = 16 * createTiB // L1 spans 4 clusters; the device stays 64 MiB
					}
					f := openCreateTargetDirect(t, dev)
					w := &createAlignedWriter{f: f, align: sector}
					l, err := qcow2.Create(w, devSize, opts)
					if cerr := f.Close(); err == nil {
						err = cerr
					}
					if err != nil {
						t.Fatal(err)
					}
					if w.writes != 1 || w.syncs != 1 || l.WriteSize%int64(sector) != 0 {
						t.Errorf("%d writes, %d syncs, write size %d; want one write of whole %d-byte sectors and one sync",
							w.writes, w.syncs, l.WriteSize, sector)
					}
					if l.CoveredSize < devSize {
						t.Errorf("refcount table covers %d bytes, less than the device (%d)", l.CoveredSize, devSize)
					}
					checkCreatedWithQemu(t, dev, opts)
					// Unwritten guest data reads as the backing, not as the
					// previous tenant's 0xff.
					qemuIOCreated(t, dev, "read -P "+createBackingPattern(backing)+" 0 64k")
					qemuIOCreated(t, dev, "read -P "+createBackingPattern(backing)+" 1M 64k")
					writeAndReadBackCreated(t, dev, opts)
					checkCreatedHeader(t, dev, opts)
				})
			}
		}
	}
	t.Run("target too small", func(t *testing.T) {
		dev := looptest.Device(t, 4<<20, 4096)
		f := openCreateTargetDirect(t, dev)
		defer f.Close()
		_, err := qcow2.Create(&createAlignedWriter{f: f, align: 4096}, 4<<20,
			qcow2.CreateOptions{VirtualSize: createGiB, ClusterSize: 2 << 20, BlockSize: 4096})
		if !errors.Is(err, qcow2.ErrTargetTooSmall) {
			t.Fatalf("2 MiB clusters on a 4 MiB device: %v, want ErrTargetTooSmall", err)
		}
	})
}

// createAlignedWriter passes writes to an O_DIRECT file after checking they
// are aligned to the sector size, so a misaligned write fails with a clear
// message rather than the kernel's bare EINVAL.
type createAlignedWriter struct {
	f      *os.File
	align  int
	writes int
	syncs  int
}

func (w *createAlignedWriter) WriteAt(p []byte, off int64) (int, error) {
	w.writes++
	a := int64(w.align)
	if off%a != 0 || int64(len(p))%a != 0 || len(p) > 0 && uintptr(unsafe.Pointer(&p[0]))%uintptr(a) != 0 {
		return 0, fmt.Errorf("unaligned write: offset %d length %d address %p, sector size %d", off, len(p), p, a)
	}
	return w.f.WriteAt(p, off)
}

func (w *createAlignedWriter) Sync() error { w.syncs++; return w.f.Sync() }

func openCreateTargetDirect(t *testing.T, dev string) *os.File {
	t.Helper()
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open %s O_DIRECT|O_EXCL: %v", dev, err)
	}
	return os.NewFile(uintptr(fd), dev)
}

// fillCreateTarget overwrites the whole device with b, standing in for a previous
// tenant's data.
func fillCreateTarget(t *testing.T, dev string, b byte) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte{b}, 1<<20)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		if _, err := f.WriteAt(chunk[:min(int64(len(chunk)), size-off)], off); err != nil {
			t.Fatalf("filling %s: %v", dev, err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// checkCreatedHeader reads the device's header back with ReadHeader.
func checkCreatedHeader(t *testing.T, dev string, opts qcow2.CreateOptions) {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	h, err := qcow2.ReadHeader(f, size)
	if err != nil {
		t.Fatalf("ReadHeader %s: %v", dev, err)
	}
	if h.BackingFile != opts.BackingFile || h.BackingFormat != opts.BackingFormat || h.Size != uint64(opts.VirtualSize) {
		t.Errorf("ReadHeader %s: backing %q format %q size %d, want %q %q %d",
			dev, h.BackingFile, h.BackingFormat, h.Size, opts.BackingFile, opts.BackingFormat, opts.VirtualSize)
	}
}
