package qcow2

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/internal/testutil"
)

// watchAccess reports, through the returned function, whether path was
// opened or read since watchAccess was called (inotify IN_OPEN|IN_ACCESS).
func watchAccess(t *testing.T, path string) func() bool {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatalf("inotify: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if _, err := unix.InotifyAddWatch(fd, path, unix.IN_OPEN|unix.IN_ACCESS); err != nil {
		t.Fatalf("inotify watch %s: %v", path, err)
	}
	return func() bool {
		buf := make([]byte, 4096)
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EAGAIN) {
			return false
		}
		if err != nil {
			t.Fatalf("reading inotify events: %v", err)
		}
		return n > 0
	}
}

// TestChainGateRefusesOutsideRoots: a backing file outside the allowed
// roots is refused with ErrNotAllowed and never opened, let alone read.
func TestChainGateRefusesOutsideRoots(t *testing.T) {
	outside, inside := t.TempDir(), t.TempDir()
	base := filepath.Join(outside, "base.raw")
	writeRawSource(t, base, 1*mib, 1)
	top := filepath.Join(inside, "top.qcow2")
	testutil.MakeQcow2(t, top, "", "", base, "raw")

	accessed := watchAccess(t, base)
	_, err := OpenChain(top, "qcow2", &Gate{AllowedRoots: []string{inside}})
	if !errors.Is(err, ErrNotAllowed) || !IsRefusal(err) {
		t.Fatalf("want a refusal wrapping ErrNotAllowed, got %v", err)
	}
	if accessed() {
		t.Fatal("the refused backing file was opened")
	}
	if _, err := OpenChain(top, "qcow2", nil); !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("nil gate: want ErrNotAllowed, got %v", err)
	}

	// Positive control: the watch does see the open once the root allows it.
	d, err := OpenChain(top, "qcow2", &Gate{AllowedRoots: []string{inside, outside}})
	if err != nil {
		t.Fatal(err)
	}
	readDisk(t, d)
	d.Close()
	if !accessed() {
		t.Fatal("inotify saw no access to an allowed backing file; the witness is broken")
	}
}

// TestChainLoop: a backing b→a after a→b (made with rebase -u) is a loop.
func TestChainLoop(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
	testutil.MakeQcow2(t, a, "", sizeArg(1*mib), "", "")
	testutil.MakeQcow2(t, b, "", "", "a.qcow2", "qcow2")
	testutil.QemuImg(t, "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)

	_, err := OpenChain(b, "qcow2", &Gate{AllowedRoots: []string{dir}})
	if !errors.Is(err, ErrChain) || !IsRefusal(err) {
		t.Fatalf("want a refusal wrapping ErrChain, got %v", err)
	}
	t.Log(err)

	// A self-loop, and a loop through a symlink (same inode, other name).
	testutil.QemuImg(t, "rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", a)
	if _, err := OpenChain(a, "qcow2", &Gate{AllowedRoots: []string{dir}}); !errors.Is(err, ErrChain) {
		t.Fatalf("self loop: want ErrChain, got %v", err)
	}
	if err := os.Symlink("a.qcow2", filepath.Join(dir, "link.qcow2")); err != nil {
		t.Fatal(err)
	}
	testutil.QemuImg(t, "rebase", "-u", "-f", "qcow2", "-b", "link.qcow2", "-F", "qcow2", a)
	if _, err := OpenChain(a, "qcow2", &Gate{AllowedRoots: []string{dir}}); !errors.Is(err, ErrChain) {
		t.Fatalf("loop through a symlink: want ErrChain, got %v", err)
	}
}

// TestChainDepthLimit: MaxChainDepth images open; one more is refused.
func TestChainDepthLimit(t *testing.T) {
	dir := t.TempDir()
	name := func(i int) string { return fmt.Sprintf("layer%02d.qcow2", i) }
	testutil.MakeQcow2(t, filepath.Join(dir, name(0)), "cluster_size=4k", sizeArg(1*mib), "", "")
	for i := 1; i <= MaxChainDepth; i++ {
		p := filepath.Join(dir, name(i))
		testutil.MakeQcow2(t, p, "cluster_size=4k", "", name(i-1), "qcow2")
		testutil.QemuIO(t, "qcow2", p, fmt.Sprintf("write -P %d %d 4k", i, i*8192))
	}
	gate := &Gate{AllowedRoots: []string{dir}}

	deepest := filepath.Join(dir, name(MaxChainDepth-1)) // MaxChainDepth images
	d, err := OpenChain(deepest, "qcow2", gate)
	if err != nil {
		t.Fatalf("a chain of %d images: %v", MaxChainDepth, err)
	}
	requireSameBytes(t, "deep chain", readDisk(t, d), testutil.QemuGuestBytes(t, "qcow2", deepest))
	d.Close()

	_, err = OpenChain(filepath.Join(dir, name(MaxChainDepth)), "qcow2", gate)
	if !errors.Is(err, ErrChain) || !IsRefusal(err) {
		t.Fatalf("a chain of %d images: want ErrChain, got %v", MaxChainDepth+1, err)
	}
}

// TestChainFormats: no probing in either direction.
func TestChainFormats(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	writeRawSource(t, raw, 1*mib, 3)
	_, err := OpenChain(raw, "qcow2", &Gate{})
	if !errors.Is(err, ErrFormat) || !errors.Is(err, ErrNotQcow2) || !IsRefusal(err) {
		t.Fatalf("raw file opened as qcow2: want ErrFormat and ErrNotQcow2, got %v", err)
	}

	// A qcow2 file read as raw is its bytes, never interpreted.
	img := filepath.Join(dir, "img.qcow2")
	testutil.MakeQcow2(t, img, "", sizeArg(1*mib), "", "")
	d, err := OpenChain(img, "raw", &Gate{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	want, _ := os.ReadFile(img)
	requireSameBytes(t, "qcow2 read as raw", readDisk(t, d), want)

	// A backing recorded as qcow2 that is raw: ErrFormat for that layer.
	top := filepath.Join(dir, "top.qcow2")
	testutil.MakeQcow2(t, top, "", sizeArg(1*mib), "disk.raw", "raw")
	testutil.QemuImg(t, "rebase", "-u", "-f", "qcow2", "-b", "disk.raw", "-F", "qcow2", top)
	if _, err := OpenChain(top, "qcow2", &Gate{AllowedRoots: []string{dir}}); !errors.Is(err, ErrFormat) {
		t.Fatalf("raw backing recorded as qcow2: want ErrFormat, got %v", err)
	}

	if _, err := OpenChain(img, "vmdk", &Gate{}); err == nil || IsRefusal(err) {
		t.Fatalf("unknown format: want a usage error, got %v", err)
	}
	if _, err := OpenChain(dir, "raw", &Gate{}); err == nil {
		t.Fatal("a directory opened as an image")
	}
}
