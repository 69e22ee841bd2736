package qcow2_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/volagent/volagent/internal/hostile"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

func readHeaderFile(t *testing.T, path string) (*qcow2.Header, error) {
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
	return qcow2.ReadHeader(f, st.Size())
}

// qemuInfo is the part of `qemu-img info --output=json` the tests compare.
type qemuInfo struct {
	VirtualSize           uint64 `json:"virtual-size"`
	ClusterSize           int64  `json:"cluster-size"`
	BackingFilename       string `json:"backing-filename"`
	BackingFilenameFormat string `json:"backing-filename-format"`
	FormatSpecific        struct {
		Data struct {
			Compat          string `json:"compat"`
			RefcountBits    int    `json:"refcount-bits"`
			LazyRefcounts   bool   `json:"lazy-refcounts"`
			ExtendedL2      bool   `json:"extended-l2"`
			CompressionType string `json:"compression-type"`
		} `json:"data"`
	} `json:"format-specific"`
}

// TestReadHeaderAgreesWithQemu: valid images made by qemu-img are accepted,
// and every fact the parser reports matches qemu-img info.
func TestReadHeaderAgreesWithQemu(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "raw", base, "24M")
	baseQcow := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", baseQcow, "8M")
	cases := []struct {
		name string
		args []string
	}{
		{"v3-default", []string{"-o", "cluster_size=65536"}},
		{"v2", []string{"-o", "compat=0.10"}},
		{"cluster-512", []string{"-o", "cluster_size=512"}},
		{"cluster-2M", []string{"-o", "cluster_size=2M"}},
		{"refcount-1", []string{"-o", "refcount_bits=1"}},
		{"refcount-64", []string{"-o", "refcount_bits=64"}},
		{"lazy", []string{"-o", "lazy_refcounts=on"}},
		{"extl2-zstd", []string{"-o", "extended_l2=on,compression_type=zstd"}},
		{"overlay-raw", []string{"-b", base, "-F", "raw"}},
		{"overlay-qcow2-v2", []string{"-o", "compat=0.10", "-b", baseQcow, "-F", "qcow2"}},
		{"overlay-relative", []string{"-b", "base.raw", "-F", "raw"}},
		{"prealloc-metadata", []string{"-o", "preallocation=metadata"}},
		{"huge-virtual", []string{"-o", "cluster_size=4096"}},
		{"snapshot-last", nil}, // qemu does not pad the last snapshot entry
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img := filepath.Join(dir, c.name+".qcow2")
			args := append([]string{"create", "-q", "-f", "qcow2"}, c.args...)
			args = append(args, img)
			switch {
			case c.name == "huge-virtual":
				args = append(args, "1T")
			case len(c.args) > 0 && c.args[0] == "-b":
			default:
				args = append(args, "16M")
			}
			testutil.Run(t, "qemu-img", args...)
			if c.name == "snapshot-last" {
				testutil.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", img)
				testutil.Run(t, "qemu-img", "snapshot", "-c", "s1", img)
			}
			h, err := readHeaderFile(t, img)
			if err != nil {
				t.Fatalf("ReadHeader refused a qemu-made image: %v", err)
			}
			var info qemuInfo
			out := testutil.Run(t, "qemu-img", "info", "--output=json", "-U", "json:"+mustJSON(map[string]any{
				"driver": "qcow2", "backing": nil, "file": map[string]any{"driver": "file", "filename": img}}))
			if err := json.Unmarshal(out, &info); err != nil {
				t.Fatalf("qemu-img info: %v\n%s", err, out)
			}
			d := info.FormatSpecific.Data
			wantVersion := uint32(3)
			if d.Compat == "0.10" {
				wantVersion = 2
			}
			wantCompression := d.CompressionType
			if wantCompression == "" {
				wantCompression = "zlib"
			}
			checks := []struct {
				field     string
				got, want any
			}{
				{"version", h.Version, wantVersion},
				{"virtual size", h.Size, info.VirtualSize},
				{"cluster size", h.ClusterSize(), info.ClusterSize},
				{"refcount bits", h.RefcountBits(), d.RefcountBits},
				{"lazy refcounts", h.LazyRefcounts(), d.LazyRefcounts},
				{"extended l2", h.ExtendedL2(), d.ExtendedL2},
				{"compression", h.CompressionName(), wantCompression},
				{"backing file", h.BackingFile, info.BackingFilename},
				{"backing format", h.BackingFormat, info.BackingFilenameFormat},
			}
			for _, ch := range checks {
				if fmt.Sprint(ch.got) != fmt.Sprint(ch.want) {
					t.Errorf("%s: volagent says %v, qemu-img says %v", ch.field, ch.got, ch.want)
				}
			}
		})
	}
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// TestHostileImagesRefused: every rule has a patched image that breaks it,
// and the parser refuses each with the named sentinel, inside a FieldError
// that names a field.
func TestHostileImagesRefused(t *testing.T) {
	bases := hostile.MakeBases(t, t.TempDir())
	for _, c := range hostile.Write(t, bases) {
		t.Run(c.Name, func(t *testing.T) {
			h, err := readHeaderFile(t, c.Path)
			if err == nil {
				t.Fatalf("accepted; want an error wrapping %v", c.Want)
			}
			if !errors.Is(err, c.Want) {
				t.Fatalf("error %v; want one wrapping %v", err, c.Want)
			}
			vs := qcow2.Violations(err)
			if len(vs) == 0 {
				t.Fatalf("error %v carries no violations; want a verdict, not an I/O error", err)
			}
			for _, v := range vs {
				if v.Field == "" || v.Code() == "other" {
					t.Errorf("violation %q lacks a field or a known kind", v)
				}
			}
			if c.Want != qcow2.ErrNotQcow2 && h == nil {
				t.Errorf("no header facts returned with the verdict")
			}
		})
	}
}

// TestReadHeaderAllocationBounded: headers that claim huge tables must not
// make the parser allocate for them.
func TestReadHeaderAllocationBounded(t *testing.T) {
	bases := hostile.MakeBases(t, t.TempDir())
	for _, c := range hostile.Write(t, bases) {
		img, err := os.ReadFile(c.Path)
		if err != nil {
			t.Fatal(err)
		}
		r := bytes.NewReader(img)
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		qcow2.ReadHeader(r, int64(len(img)))
		runtime.ReadMemStats(&after)
		// The first cluster (64 KiB here) and small bookkeeping; a parser
		// that believed l1_size or nb_snapshots would allocate megabytes.
		if got := after.TotalAlloc - before.TotalAlloc; got > 1<<20 {
			t.Errorf("%s: ReadHeader allocated %d bytes", c.Name, got)
		}
	}
}

func TestValidateBackingName(t *testing.T) {
	good := []string{"/var/lib/images/base.raw", "base.qcow2", "../images/b.img", "dir/x:y.raw", "/a/b:c"}
	bad := []string{"", "json:{}", "JSON:{\"a\":1}", "nbd:localhost:10809", "file:/etc/passwd", "http://x/y",
		"a:b", "/x\x00y", "\xff", "/a\nb", "/a\x7fb", string(make([]byte, 1024))}
	for _, n := range good {
		if errs := qcow2.ValidateBackingName(n); len(errs) > 0 {
			t.Errorf("ValidateBackingName(%q) = %v; want accepted", n, errs)
		}
	}
	for _, n := range bad {
		errs := qcow2.ValidateBackingName(n)
		if len(errs) == 0 {
			t.Errorf("ValidateBackingName(%q) accepted; want refused", n)
			continue
		}
		for _, e := range errs {
			if !errors.Is(e, qcow2.ErrBackingName) {
				t.Errorf("ValidateBackingName(%q): %v does not wrap ErrBackingName", n, e)
			}
		}
	}
}

func TestGate(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	imagesDir := filepath.Join(root, "images")
	if err := os.Mkdir(imagesDir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(p string) string {
		if err := os.WriteFile(p, []byte("data"), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	inside := write(filepath.Join(imagesDir, "base.raw"))
	secret := write(filepath.Join(outside, "secret"))
	if err := os.Symlink(secret, filepath.Join(imagesDir, "escape")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(inside, filepath.Join(imagesDir, "alias")); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(imagesDir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	image := filepath.Join(imagesDir, "overlay.qcow2")
	gate := &qcow2.Gate{AllowedRoots: []string{root}}

	accept := []struct{ name, want string }{
		{inside, inside},
		{"base.raw", inside},
		{"alias", inside},
		{"../images/base.raw", inside},
	}
	for _, c := range accept {
		f, real, err := gate.Open(image, c.name)
		if err != nil {
			t.Errorf("Open(%q): %v; want accepted", c.name, err)
			continue
		}
		f.Close()
		if want, _ := filepath.EvalSymlinks(c.want); real != want {
			t.Errorf("Open(%q) resolved to %q; want %q", c.name, real, want)
		}
	}
	refuse := []struct {
		name string
		want error
	}{
		{secret, qcow2.ErrNotAllowed},
		{"escape", qcow2.ErrNotAllowed},
		{"../../" + filepath.Base(outside) + "/secret", qcow2.ErrNotAllowed},
		{"/dev/null", qcow2.ErrNotAllowed},
		{"fifo", qcow2.ErrNotAllowed},
		{"json:{\"file\":\"" + inside + "\"}", qcow2.ErrBackingName},
		{"file:" + inside, qcow2.ErrBackingName},
	}
	gateWithDev := &qcow2.Gate{AllowedRoots: []string{root, "/dev"}}
	for _, c := range refuse {
		g := gate
		if c.name == "/dev/null" {
			g = gateWithDev // under a root, but a character device
		}
		f, _, err := g.Open(image, c.name)
		if err == nil {
			f.Close()
			t.Errorf("Open(%q) accepted; want %v", c.name, c.want)
			continue
		}
		if !errors.Is(err, c.want) {
			t.Errorf("Open(%q): %v; want %v", c.name, err, c.want)
		}
	}
	if _, _, err := (&qcow2.Gate{}).Open(image, inside); !errors.Is(err, qcow2.ErrNotAllowed) {
		t.Errorf("the zero Gate opened %q: %v", inside, err)
	}
	// The lexical check never touches the filesystem: a name that does not
	// exist is judged by where it points.
	if _, err := gate.CheckLexical(image, "missing.raw"); err != nil {
		t.Errorf("CheckLexical(missing.raw): %v", err)
	}
	if _, err := gate.CheckLexical(image, "../../x"); !errors.Is(err, qcow2.ErrNotAllowed) {
		t.Errorf("CheckLexical(../../x): %v; want ErrNotAllowed", err)
	}
}

func TestDetectImageHeader(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	for _, format := range []string{"qcow2", "qcow", "qed", "vmdk", "vhdx", "vpc", "vdi", "parallels"} {
		p := filepath.Join(dir, "img."+format)
		testutil.Run(t, "qemu-img", "create", "-q", "-f", format, p, "1M")
		head := make([]byte, qcow2.DetectSize)
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		n, _ := f.ReadAt(head, 0)
		f.Close()
		if got := qcow2.DetectImageHeader(head[:n]); got != format {
			t.Errorf("DetectImageHeader(%s image) = %q", format, got)
		}
	}
	if got := qcow2.DetectImageHeader(make([]byte, 512)); got != "" {
		t.Errorf("DetectImageHeader(zeros) = %q; want none", got)
	}
}

// FuzzReadHeader: no input makes the parser panic, and what it accepts
// satisfies the invariants the reader relies on.
func FuzzReadHeader(f *testing.F) {
	f.Fuzz(func(t *testing.T, img []byte) {
		h, err := qcow2.ReadHeader(bytes.NewReader(img), int64(len(img)))
		if h != nil && (len(h.Extensions) > qcow2.MaxListedExtensions || len(h.Extensions) > h.ExtensionCount) {
			t.Fatalf("%d extensions listed of %d", len(h.Extensions), h.ExtensionCount)
		}
		if n := len(qcow2.Violations(err)); n > qcow2.MaxViolations+1 {
			t.Fatalf("%d violations listed; at most %d and a count", n, qcow2.MaxViolations)
		}
		if err != nil {
			for _, v := range qcow2.Violations(err) {
				if v.Field == "" {
					t.Fatalf("violation without a field: %v", v)
				}
			}
			return
		}
		if h.ClusterBits < qcow2.MinClusterBits || h.ClusterBits > qcow2.MaxClusterBits {
			t.Fatalf("accepted cluster_bits %d", h.ClusterBits)
		}
		if h.L1Size > 0 && h.L1TableOffset+uint64(h.L1Size)*8 > uint64(len(img)) {
			t.Fatalf("accepted an L1 table past the end")
		}
		if h.HasBacking() && h.BackingFormat != "raw" && h.BackingFormat != "qcow2" {
			t.Fatalf("accepted backing format %q", h.BackingFormat)
		}
		if h.DataFile != "" || h.CryptMethod != 0 || h.IncompatibleFeatures&qcow2.IncompatCorrupt != 0 {
			t.Fatalf("accepted a data file, encryption or the corrupt bit")
		}
	})
}

// TestReadHeaderBoundsCostlyImages: a header packed with extensions,
// violations and snapshots is parsed with bounded allocation, and what is
// kept says how much more there was.
func TestReadHeaderBoundsCostlyImages(t *testing.T) {
	img := hostile.Costly()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	h, err := qcow2.ReadHeader(bytes.NewReader(img), int64(len(img)))
	runtime.ReadMemStats(&after)
	if h == nil || !qcow2.IsRefusal(err) {
		t.Fatalf("ReadHeader: %v", err)
	}
	// The 2 MiB header cluster, one 64 KiB snapshot buffer and small change.
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 8<<20 {
		t.Errorf("ReadHeader allocated %d MiB for one header", alloc>>20)
	}
	if h.ExtensionCount != hostile.CostlyExtensions || len(h.Extensions) != qcow2.MaxListedExtensions {
		t.Errorf("ExtensionCount %d, %d listed; want %d, %d", h.ExtensionCount, len(h.Extensions), hostile.CostlyExtensions, qcow2.MaxListedExtensions)
	}
	vs := qcow2.Violations(err)
	if len(vs) != qcow2.MaxViolations+1 {
		t.Fatalf("%d violations listed; want %d and a count of the rest", len(vs), qcow2.MaxViolations+1)
	}
	last := vs[len(vs)-1]
	// One per backing format extension (the first is not printable, the others repeat it), one per snapshot.
	want := (hostile.CostlyExtensions+1)/2 + hostile.CostlySnapshots - qcow2.MaxViolations
	if last.Field != "violations" || last.Value != want || !strings.Contains(last.Error(), fmt.Sprintf("and %d more", want)) {
		t.Errorf("last violation %v; want it to say and %d more", last, want)
	}
	rep, err := qcow2.Inspect(bytes.NewReader(img), int64(len(img)), "costly", "qcow2", nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Qcow2.Extensions) != qcow2.MaxListedExtensions || rep.Qcow2.ExtensionCount != hostile.CostlyExtensions || len(rep.Violations) != qcow2.MaxViolations+1 {
		t.Errorf("report: %d extensions listed of %d, %d violations", len(rep.Qcow2.Extensions), rep.Qcow2.ExtensionCount, len(rep.Violations))
	}
}

// TestReadHeaderPastPrefix: ReadHeader reads the first 4 KiB of an image
// and the rest of the first cluster only when the extensions or the
// backing name reach past them. An image whose extension area (a 5000-byte
// unknown extension before the backing format) and backing name (at 8192)
// lie past 4 KiB reads as qemu-img info reads it.
func TestReadHeaderPastPrefix(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", base, "1M")
	path := filepath.Join(dir, "far.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, "1M")
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	hdrLen := int(be.Uint32(img[100:]))
	// The extension area: an unknown extension of 5000 bytes, the backing
	// format, the end marker; the backing name at 8192.
	ext := make([]byte, 0, 5100)
	ext = be.AppendUint32(ext, 0x12345678)
	ext = be.AppendUint32(ext, 5000)
	ext = append(ext, make([]byte, 5000)...)
	ext = be.AppendUint32(ext, qcow2.ExtBackingFormat)
	ext = be.AppendUint32(ext, 3)
	ext = append(ext, 'r', 'a', 'w', 0, 0, 0, 0, 0)
	ext = append(ext, make([]byte, 8)...) // end marker
	const nameOff = 8192
	if hdrLen+len(ext) > nameOff {
		t.Fatalf("extension area of %d bytes at %d runs into the name at %d", len(ext), hdrLen, nameOff)
	}
	clear(img[hdrLen:65536])
	copy(img[hdrLen:], ext)
	copy(img[nameOff:], base)
	be.PutUint64(img[8:], nameOff)
	be.PutUint32(img[16:], uint32(len(base)))
	if err := os.WriteFile(path, img, 0o644); err != nil {
		t.Fatal(err)
	}

	out := testutil.QemuImg(t, "info", "--output=json", "-f", "qcow2", path)
	var want qemuInfo
	if err := json.Unmarshal([]byte(out), &want); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	if want.BackingFilename != base || want.BackingFilenameFormat != "raw" {
		t.Fatalf("qemu-img info reads backing %q (%q): the test image is not what it means to be", want.BackingFilename, want.BackingFilenameFormat)
	}
	h, err := readHeaderFile(t, path)
	if err != nil {
		t.Fatalf("ReadHeader: %v", err)
	}
	if h.BackingFile != base || h.BackingFormat != "raw" || h.ExtensionCount != 2 {
		t.Fatalf("ReadHeader: backing %q (%q), %d extensions; want %q (raw), 2 extensions", h.BackingFile, h.BackingFormat, h.ExtensionCount, base)
	}
}
