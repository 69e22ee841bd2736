package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// exportFixture is a three-image chain: a raw base with data, a zstd
// compressed qcow2 middle, and an extended-L2 top with subcluster writes.
// Most of its 16 MiB is zero, so a sparse export must be mostly holes.
func exportFixture(t *testing.T) (dir, top string) {
	dir = t.TempDir()
	base := filepath.Join(dir, "base.raw")
	data := make([]byte, 16<<20)
	for i := range 1 << 20 {
		data[i] = byte(i * 13)
	}
	if err := os.WriteFile(base, data, 0o644); err != nil {
		t.Fatal(err)
	}
	mid, top := filepath.Join(dir, "mid.qcow2"), filepath.Join(dir, "top.qcow2")
	testutil.MakeQcow2(t, mid, "compression_type=zstd", "", "base.raw", "raw")
	testutil.QemuIO(t, "qcow2", mid, "write -c -P 0x42 2m 128k", "write -z 64k 64k")
	testutil.MakeQcow2(t, top, "extended_l2=on", "", "mid.qcow2", "qcow2")
	testutil.QemuIO(t, "qcow2", top, "write -P 0x17 5000 3000", "write -z 2m 2k", "write -P 0x18 8m 1k")
	return dir, top
}

func TestExportMatchesQemu(t *testing.T) {
	dir, top := exportFixture(t)
	want := testutil.QemuGuestBytes(t, "qcow2", top)

	out := filepath.Join(t.TempDir(), "disk.raw")
	var stdout, warn bytes.Buffer
	if err := runExport(exportOptions{allowBacking: []string{dir}, format: "qcow2"}, top, out, &stdout, &warn); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("exported file differs from qemu-img convert -O raw")
	}
	var st syscall.Stat_t
	if err := syscall.Stat(out, &st); err != nil {
		t.Fatal(err)
	}
	if allocated := st.Blocks * 512; allocated > 4<<20 {
		t.Errorf("export allocates %d bytes for a disk that is mostly zero; holes were not kept", allocated)
	}

	stdout.Reset()
	if err := runExport(exportOptions{allowBacking: []string{dir}, format: "qcow2"}, top, "-", &stdout, &warn); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(stdout.Bytes(), want) {
		t.Fatal("export to stdout differs from qemu-img convert -O raw")
	}

	// A qcow2 read as raw is exported unchanged, with a warning.
	rawOut := filepath.Join(t.TempDir(), "asraw")
	warn.Reset()
	if err := runExport(exportOptions{format: "raw"}, top, rawOut, &stdout, &warn); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(warn.Bytes(), []byte("qcow2 header")) {
		t.Errorf("no warning for a qcow2 file read as raw: %q", warn.String())
	}
	src, _ := os.ReadFile(top)
	if got, _ := os.ReadFile(rawOut); !bytes.Equal(got, src) {
		t.Error("raw export is not the file's bytes")
	}
}

// TestExportFailureLeavesNothing: a read error midway removes the
// temporary file and leaves no output.
func TestExportFailureLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	testutil.MakeQcow2(t, img, "", "8M", "", "")
	testutil.QemuIO(t, "qcow2", img, "write -P 0x11 0 64k", "write -P 0x12 6m 64k")
	corruptL2Entry(t, img, 6<<20)

	outDir := t.TempDir()
	out := filepath.Join(outDir, "disk.raw")
	err := runExport(exportOptions{format: "qcow2"}, img, out, io.Discard, io.Discard)
	if !errors.Is(err, qcow2.ErrCorrupt) || !qcow2.IsRefusal(err) {
		t.Fatalf("want a refusal wrapping ErrCorrupt, got %v", err)
	}
	if entries, _ := os.ReadDir(outDir); len(entries) != 0 {
		t.Fatalf("a failed export left %v behind", entries)
	}
}

// corruptL2Entry sets a reserved bit in the L2 entry of guestOff.
func corruptL2Entry(t *testing.T, path string, guestOff int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	img, err := qcow2.OpenImage(f, st.Size(), nil)
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Map(guestOff)
	if err != nil || m.Kind != qcow2.MapData {
		t.Fatalf("Map(%d) = %+v, %v; want data", guestOff, m, err)
	}
	// Find the L2 entry by its content: the only entry holding this host cluster.
	h := img.Header()
	want := uint64(m.HostOffset) | 1<<63
	buf := make([]byte, st.Size())
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	for off := h.ClusterSize(); off+8 <= st.Size(); off += 8 {
		if binary.BigEndian.Uint64(buf[off:]) == want {
			binary.BigEndian.PutUint64(buf[off:], want|1<<5)
			if _, err := f.WriteAt(buf[off:off+8], off); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
	t.Fatalf("no L2 entry %#x found", want)
}

// TestExportBinary checks the command line: exit statuses, --force, help.
func TestExportBinary(t *testing.T) {
	dir, top := exportFixture(t)
	want := testutil.QemuGuestBytes(t, "qcow2", top)
	outDir := t.TempDir()
	out := filepath.Join(outDir, "disk.raw")

	_, stderr, code := runVolagent(t, "export", "--allow-backing", dir, top, out)
	if code != exitOK {
		t.Fatalf("export: exit %d: %s", code, stderr)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
		t.Fatal("binary export differs from qemu-img convert -O raw")
	}

	stdout, stderr, code := runVolagent(t, "export", "--allow-backing", dir, "--format", "qcow2", top, "-")
	if code != exitOK || stdout != string(want) {
		t.Fatalf("export to stdout: exit %d, %d bytes: %s", code, len(stdout), stderr)
	}

	// An existing output is kept without --force, replaced with it.
	if err := os.WriteFile(out, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, code = runVolagent(t, "export", "--allow-backing", dir, top, out)
	if got, _ := os.ReadFile(out); code != exitFailure || string(got) != "keep me" {
		t.Fatalf("existing output without --force: exit %d (%s), output %d bytes", code, stderr, len(got))
	}
	_, stderr, code = runVolagent(t, "export", "--force", "--allow-backing", dir, top, out)
	if got, _ := os.ReadFile(out); code != exitOK || !bytes.Equal(got, want) {
		t.Fatalf("--force: exit %d: %s", code, stderr)
	}

	// Backing outside the allowed roots: refused, exit 3, nothing written.
	refusedOut := filepath.Join(outDir, "refused.raw")
	_, stderr, code = runVolagent(t, "export", top, refusedOut)
	if code != exitRefused {
		t.Fatalf("backing not allowed: exit %d, want %d: %s", code, exitRefused, stderr)
	}
	if _, err := os.Stat(refusedOut); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused export created its output: %v", err)
	}

	// A raw file given as qcow2: refused (format mismatch), exit 3.
	_, stderr, code = runVolagent(t, "export", filepath.Join(dir, "base.raw"), "-")
	if code != exitRefused {
		t.Fatalf("raw as qcow2: exit %d, want %d: %s", code, exitRefused, stderr)
	}

	// I/O and usage errors: exit 2.
	for _, args := range [][]string{
		{"export", filepath.Join(dir, "missing.qcow2"), "-"},
		{"export", "--format", "vmdk", top, "-"},
		{"export", top},
	} {
		if _, stderr, code := runVolagent(t, args...); code != exitFailure {
			t.Errorf("%q: exit %d, want %d: %s", args, code, exitFailure, stderr)
		}
	}

	stdout, _, code = runVolagent(t, "export", "--help")
	if code != exitOK || !strings.Contains(stdout, "--allow-backing") || !strings.Contains(stdout, "Examples:") {
		t.Errorf("--help: exit %d:\n%s", code, stdout)
	}
}
