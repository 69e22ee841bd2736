// Package hostile builds the hostile-image suite for volagent's tests: images
// made by qemu-img, then patched byte by byte so that each breaks exactly one
// rule of the qcow2 parser. Tests in several packages (the parser, the
// inspect command, the fuzz seeds) share these cases.
package hostile

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/volagent/volagent/qcow2"
)

// Case is one hostile image on disk and the sentinel its refusal must wrap.
type Case struct {
	Name string
	Path string
	Want error
}

// Header field offsets (docs/interop/qcow2.txt).
const (
	offVersion         = 4
	offBackingOffset   = 8
	offBackingSize     = 16
	offClusterBits     = 20
	offSize            = 24
	offCryptMethod     = 32
	offL1Size          = 36
	offL1Offset        = 40
	offRefcountOffset  = 48
	offRefcountCluster = 56
	offNbSnapshots     = 60
	offSnapshotsOffset = 64
	offIncompatible    = 72
	offAutoclear       = 88
	offRefcountOrder   = 96
	offHeaderLength    = 100
	offCompressionType = 104
)

// Bases are the qemu-made images the cases start from.
type Bases struct {
	Dir       string
	BaseRaw   string // a raw backing file
	Plain     []byte // v3, 64 KiB clusters, no backing
	Overlay   []byte // v3 overlay of BaseRaw with -F raw
	V2        []byte // compat=0.10 overlay of BaseRaw with -F raw
	DataFile  []byte // v3 with an external data file
	Luks      []byte // v3, LUKS encrypted
	Snapshot  []byte // v3 with one internal snapshot
	ExtL2Zstd []byte // v3, extended L2, zstd
}

func qemuImg(t testing.TB, args ...string) {
	t.Helper()
	cmd := exec.Command("qemu-img", args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %q: %v\n%s", args, err, out)
	}
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// MakeBases creates the base images in dir with qemu-img.
func MakeBases(t testing.TB, dir string) *Bases {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatalf("the hostile suite needs qemu-img (package qemu-utils); run scripts/install-deps.sh")
	}
	b := &Bases{Dir: dir, BaseRaw: filepath.Join(dir, "base.raw")}
	p := func(name string) string { return filepath.Join(dir, name) }
	qemuImg(t, "create", "-q", "-f", "raw", b.BaseRaw, "16M")
	qemuImg(t, "create", "-q", "-f", "qcow2", p("plain.qcow2"), "16M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", b.BaseRaw, "-F", "raw", p("overlay.qcow2"))
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", b.BaseRaw, "-F", "raw", p("v2.qcow2"))
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+p("data.raw"), p("datafile.qcow2"), "16M")
	// qemu benchmarks PBKDF iterations first; on a loaded machine that can
	// fail ("Unable to get accurate CPU usage"), so give it a few tries.
	luksArgs := []string{"create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=volagent-test",
		"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100", p("luks.qcow2"), "16M"}
	for try := 1; ; try++ {
		out, err := exec.Command("qemu-img", luksArgs...).CombinedOutput()
		if err == nil {
			break
		}
		if try == 5 {
			t.Fatalf("qemu-img %q: %v\n%s", luksArgs, err, out)
		}
	}
	qemuImg(t, "create", "-q", "-f", "qcow2", p("snap.qcow2"), "16M")
	qemuImg(t, "snapshot", "-c", "s1", p("snap.qcow2"))
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd", p("extl2.qcow2"), "16M")
	b.Plain = readFile(t, p("plain.qcow2"))
	b.Overlay = readFile(t, p("overlay.qcow2"))
	b.V2 = readFile(t, p("v2.qcow2"))
	b.DataFile = readFile(t, p("datafile.qcow2"))
	b.Luks = readFile(t, p("luks.qcow2"))
	b.Snapshot = readFile(t, p("snap.qcow2"))
	b.ExtL2Zstd = readFile(t, p("extl2.qcow2"))
	return b
}

type patch func(t testing.TB, img []byte) []byte

func put32(off int, v uint32) patch {
	return func(_ testing.TB, img []byte) []byte { binary.BigEndian.PutUint32(img[off:], v); return img }
}

func put64(off int, v uint64) patch {
	return func(_ testing.TB, img []byte) []byte { binary.BigEndian.PutUint64(img[off:], v); return img }
}

func or64(off int, bits uint64) patch {
	return func(_ testing.TB, img []byte) []byte {
		binary.BigEndian.PutUint64(img[off:], binary.BigEndian.Uint64(img[off:])|bits)
		return img
	}
}

func seq(ps ...patch) patch {
	return func(t testing.TB, img []byte) []byte {
		for _, p := range ps {
			img = p(t, img)
		}
		return img
	}
}

// setBackingName writes name where the image keeps its backing name and
// records its length.
func setBackingName(name string) patch {
	return func(t testing.TB, img []byte) []byte {
		off := binary.BigEndian.Uint64(img[offBackingOffset:])
		if off == 0 {
			t.Fatalf("setBackingName: base image has no backing name")
		}
		copy(img[off:], name)
		binary.BigEndian.PutUint32(img[offBackingSize:], uint32(len(name)))
		return img
	}
}

// extensionAt finds the n-th header extension (0-based) of a valid image.
func extensionAt(t testing.TB, img []byte, n int) qcow2.ExtensionInfo {
	h, err := qcow2.ReadHeader(bytes.NewReader(img), int64(len(img)))
	if h == nil || n >= len(h.Extensions) {
		t.Fatalf("extensionAt(%d): base image has %v extensions (err %v)", n, h, err)
	}
	return h.Extensions[n]
}

// rewriteExtension replaces the n-th extension's type, length and data and
// writes an end marker after it.
func rewriteExtension(n int, typ uint32, data []byte) patch {
	return func(t testing.TB, img []byte) []byte {
		e := extensionAt(t, img, n)
		hdr := int(e.Offset) - 8
		binary.BigEndian.PutUint32(img[hdr:], typ)
		binary.BigEndian.PutUint32(img[hdr+4:], uint32(len(data)))
		copy(img[e.Offset:], data)
		end := int(e.Offset) + (len(data)+7)&^7
		copy(img[end:], make([]byte, 8))
		return img
	}
}

func truncate(n int) patch {
	return func(_ testing.TB, img []byte) []byte { return img[:n] }
}

// Write builds every case in b.Dir and returns them. The decoy file named by
// the cases that point at one is b.Dir/decoy; it exists, so a parser that
// followed a name would find it.
func Write(t testing.TB, b *Bases) []Case {
	t.Helper()
	decoy := filepath.Join(b.Dir, "decoy")
	if err := os.WriteFile(decoy, []byte("decoy: must never be opened\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	bitmaps := func(nb, reserved uint32, size, off uint64) []byte {
		d := make([]byte, 24)
		binary.BigEndian.PutUint32(d[0:], nb)
		binary.BigEndian.PutUint32(d[4:], reserved)
		binary.BigEndian.PutUint64(d[8:], size)
		binary.BigEndian.PutUint64(d[16:], off)
		return d
	}
	// The snapshot table follows the first snapshot's offset in the header.
	snapExtra := func(v uint32) patch {
		return func(_ testing.TB, img []byte) []byte {
			off := binary.BigEndian.Uint64(img[offSnapshotsOffset:])
			binary.BigEndian.PutUint32(img[off+36:], v)
			return img
		}
	}
	snapL1 := func(v uint64) patch {
		return func(_ testing.TB, img []byte) []byte {
			off := binary.BigEndian.Uint64(img[offSnapshotsOffset:])
			binary.BigEndian.PutUint64(img[off:], v)
			return img
		}
	}
	// A data file name pointing at the decoy, as json: (CVE-2024-4467).
	dataFileJSON := func(t testing.TB, img []byte) []byte {
		name := fmt.Sprintf(`json:{"driver":"raw","file":{"driver":"file","filename":%q}}`, decoy)
		return rewriteExtension(0, qcow2.ExtDataFile, []byte(name))(t, img)
	}

	cases := []struct {
		name string
		base []byte
		p    patch
		want error
	}{
		{"bad-magic", b.Plain, put32(0, 0x514649fa), qcow2.ErrNotQcow2},
		{"version-1", b.Plain, put32(offVersion, 1), qcow2.ErrUnsupported},
		{"version-4", b.Plain, put32(offVersion, 4), qcow2.ErrUnsupported},
		{"cluster-bits-8", b.Plain, put32(offClusterBits, 8), qcow2.ErrInvalidHeader},
		{"cluster-bits-22", b.Plain, put32(offClusterBits, 22), qcow2.ErrInvalidHeader},
		{"cluster-bits-huge", b.Plain, put32(offClusterBits, 0xffffffff), qcow2.ErrInvalidHeader},
		{"header-length-short", b.Plain, put32(offHeaderLength, 100), qcow2.ErrInvalidHeader},
		{"header-length-not-8-aligned", b.Plain, put32(offHeaderLength, 116), qcow2.ErrInvalidHeader},
		{"header-length-past-cluster", b.Plain, put32(offHeaderLength, 0x10008), qcow2.ErrInvalidHeader},
		{"backing-offset-in-header", b.Overlay, put64(offBackingOffset, 16), qcow2.ErrInvalidHeader},
		{"backing-offset-in-extensions", b.Overlay, func(t testing.TB, img []byte) []byte {
			e := extensionAt(t, img, 1) // the feature name table
			return put64(offBackingOffset, e.Offset+64)(t, img)
		}, qcow2.ErrInvalidExtension},
		{"backing-offset-past-cluster", b.Overlay, put64(offBackingOffset, 0x10000-4), qcow2.ErrInvalidHeader},
		{"backing-size-too-long", b.Overlay, put32(offBackingSize, 2000), qcow2.ErrTooLarge},
		{"backing-size-without-offset", b.Plain, put32(offBackingSize, 8), qcow2.ErrInvalidHeader},
		{"backing-name-nul", b.Overlay, setBackingName("/tmp/a\x00/etc/passwd"), qcow2.ErrBackingName},
		{"backing-name-bad-utf8", b.Overlay, setBackingName("/tmp/\xff\xfe.raw"), qcow2.ErrBackingName},
		{"backing-name-control-char", b.Overlay, setBackingName("/tmp/a\x1b[2J.raw"), qcow2.ErrBackingName},
		{"backing-name-json", b.Overlay, setBackingName(`json:{"driver":"raw","file":{"filename":"` + decoy + `"}}`), qcow2.ErrBackingName},
		{"backing-name-nbd", b.Overlay, setBackingName("nbd:127.0.0.1:10809"), qcow2.ErrBackingName},
		{"backing-name-file-proto", b.Overlay, setBackingName("file:" + decoy), qcow2.ErrBackingName},
		{"backing-name-relative-proto", b.Overlay, setBackingName("http:x"), qcow2.ErrBackingName},
		{"backing-format-missing", b.Overlay, seq(setBackingName(decoy), func(t testing.TB, img []byte) []byte {
			e := extensionAt(t, img, 0)
			binary.BigEndian.PutUint32(img[e.Offset-8:], 0x12345678) // now an unknown extension
			return img
		}), qcow2.ErrBackingFormatMissing},
		{"backing-format-missing-v2", b.V2, func(t testing.TB, img []byte) []byte {
			e := extensionAt(t, img, 0)
			binary.BigEndian.PutUint32(img[e.Offset-8:], qcow2.ExtEnd)
			return img
		}, qcow2.ErrBackingFormatMissing},
		{"backing-format-vpc", b.Overlay, rewriteExtension(0, qcow2.ExtBackingFormat, []byte("vpc")), qcow2.ErrBackingFormat},
		{"backing-format-nul", b.Overlay, rewriteExtension(0, qcow2.ExtBackingFormat, []byte("ra\x00")), qcow2.ErrInvalidExtension},
		{"backing-format-too-long", b.Overlay, func(t testing.TB, img []byte) []byte {
			e := extensionAt(t, img, 0)
			binary.BigEndian.PutUint32(img[e.Offset-4:], 16)
			return img
		}, qcow2.ErrInvalidExtension},
		{"backing-format-duplicate", b.Overlay, rewriteExtension(1, qcow2.ExtBackingFormat, []byte("qcow2")), qcow2.ErrInvalidExtension},
		{"extension-too-long", b.Plain, func(t testing.TB, img []byte) []byte {
			e := extensionAt(t, img, 0)
			binary.BigEndian.PutUint32(img[e.Offset-4:], 0x7fffffff)
			return img
		}, qcow2.ErrInvalidExtension},
		{"data-file-qemu-made", b.DataFile, nil, qcow2.ErrDataFile},
		{"data-file-json-decoy", b.DataFile, dataFileJSON, qcow2.ErrDataFile},
		{"data-file-bit-only", b.Plain, or64(offIncompatible, qcow2.IncompatDataFile), qcow2.ErrDataFile},
		{"data-file-raw-autoclear", b.Plain, or64(offAutoclear, qcow2.AutoclearDataFileRaw), qcow2.ErrDataFile},
		{"data-file-ext-without-bit", b.Plain, rewriteExtension(0, qcow2.ExtDataFile, []byte(decoy)), qcow2.ErrDataFile},
		{"encrypted-luks", b.Luks, nil, qcow2.ErrEncrypted},
		{"encrypted-aes", b.Plain, put32(offCryptMethod, 1), qcow2.ErrEncrypted},
		{"encrypted-unknown-method", b.Plain, put32(offCryptMethod, 7), qcow2.ErrEncrypted},
		{"corrupt-bit", b.Plain, or64(offIncompatible, qcow2.IncompatCorrupt), qcow2.ErrCorrupt},
		{"unknown-incompatible-bit", b.Plain, or64(offIncompatible, 1<<33), qcow2.ErrIncompatibleFeature},
		{"l1-past-end", b.Plain, put64(offL1Offset, 1<<40), qcow2.ErrOutOfBounds},
		{"l1-unaligned", b.Plain, put64(offL1Offset, 196608+512), qcow2.ErrInvalidHeader},
		{"l1-offset-overflow", b.Plain, put64(offL1Offset, 0xffffffffffff0000), qcow2.ErrTooLarge},
		{"l1-size-huge", b.Plain, put32(offL1Size, 0xffffffff), qcow2.ErrTooLarge},
		{"l1-too-small", b.Plain, put64(offSize, 1<<40), qcow2.ErrInvalidHeader},
		{"virtual-size-negative", b.Plain, put64(offSize, 1<<63), qcow2.ErrTooLarge},
		{"refcount-table-past-end", b.Plain, put64(offRefcountOffset, 1<<40), qcow2.ErrOutOfBounds},
		{"refcount-table-huge", b.Plain, put32(offRefcountCluster, 0xffffffff), qcow2.ErrTooLarge},
		{"refcount-table-missing", b.Plain, put32(offRefcountCluster, 0), qcow2.ErrInvalidHeader},
		{"refcount-order-7", b.Plain, put32(offRefcountOrder, 7), qcow2.ErrInvalidHeader},
		{"snapshots-too-many", b.Plain, put32(offNbSnapshots, 70000), qcow2.ErrTooLarge},
		{"snapshot-table-past-end", b.Plain, seq(put32(offNbSnapshots, 1), put64(offSnapshotsOffset, 1<<40)), qcow2.ErrOutOfBounds},
		{"snapshot-count-past-end", b.Snapshot, put32(offNbSnapshots, 60000), qcow2.ErrOutOfBounds},
		{"snapshot-extra-data-huge", b.Snapshot, snapExtra(0xffffffff), qcow2.ErrTooLarge},
		{"snapshot-l1-past-end", b.Snapshot, snapL1(1 << 40), qcow2.ErrOutOfBounds},
		{"compression-type-unknown", b.Plain, func(_ testing.TB, img []byte) []byte { img[offCompressionType] = 2; return img }, qcow2.ErrInvalidHeader},
		{"compression-zstd-without-bit", b.Plain, func(_ testing.TB, img []byte) []byte { img[offCompressionType] = 1; return img }, qcow2.ErrInvalidHeader},
		{"compression-zlib-with-bit", b.Plain, or64(offIncompatible, qcow2.IncompatCompression), qcow2.ErrInvalidHeader},
		{"extended-l2-small-clusters", b.ExtL2Zstd, put32(offClusterBits, 12), qcow2.ErrUnsupported},
		{"bitmaps-reserved", b.Plain, rewriteExtension(0, qcow2.ExtBitmaps, bitmaps(1, 1, 64, 0x10000)), qcow2.ErrInvalidExtension},
		{"bitmaps-zero", b.Plain, rewriteExtension(0, qcow2.ExtBitmaps, bitmaps(0, 0, 64, 0x10000)), qcow2.ErrInvalidExtension},
		{"bitmaps-directory-past-end", b.Plain, rewriteExtension(0, qcow2.ExtBitmaps, bitmaps(1, 0, 64, 1<<40)), qcow2.ErrOutOfBounds},
		{"bitmaps-directory-huge", b.Plain, rewriteExtension(0, qcow2.ExtBitmaps, bitmaps(1, 0, 1<<40, 0x10000)), qcow2.ErrTooLarge},
		{"bitmaps-bad-length", b.Plain, rewriteExtension(0, qcow2.ExtBitmaps, make([]byte, 16)), qcow2.ErrInvalidExtension},
		{"crypto-extension", b.Plain, rewriteExtension(0, qcow2.ExtCrypto, make([]byte, 16)), qcow2.ErrEncrypted},
		{"truncated-header", b.Plain, truncate(60), qcow2.ErrTruncated},
		{"truncated-magic", b.Plain, truncate(4), qcow2.ErrNotQcow2},
		{"truncated-extensions", b.Plain, truncate(130), qcow2.ErrTruncated},
		{"truncated-backing-name", b.Overlay, func(t testing.TB, img []byte) []byte {
			off := binary.BigEndian.Uint64(img[offBackingOffset:])
			return img[:off+4]
		}, qcow2.ErrTruncated},
	}
	out := make([]Case, 0, len(cases))
	for _, c := range cases {
		img := append([]byte(nil), c.base...)
		if c.p != nil {
			img = c.p(t, img)
		}
		path := filepath.Join(b.Dir, c.name+".qcow2")
		if err := os.WriteFile(path, img, 0o644); err != nil {
			t.Fatal(err)
		}
		out = append(out, Case{Name: c.name, Path: path, Want: c.want})
	}
	return out
}

// Decoy is the path of the file that hostile cases point at.
func Decoy(b *Bases) string { return filepath.Join(b.Dir, "decoy") }
