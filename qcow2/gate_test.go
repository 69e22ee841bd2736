package qcow2_test

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// kernelOpens asks the kernel which file open(2) reaches for p: the real
// path of the opened descriptor, or the error.
func kernelOpens(p string) (string, error) {
	fd, err := unix.Open(p, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	return os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
}

// TestGateWalksLikeTheKernel judges Resolve and Open against the kernel
// on names that walk out of the root through symlinks and ".." in every
// order: the gate must name the file the kernel opens, refuse every name
// whose file lies outside, and accept the controls inside.
func TestGateWalksLikeTheKernel(t *testing.T) {
	l := testutil.GateEscapes(t)
	for _, c := range l.Cases {
		t.Run(c.Name, func(t *testing.T) {
			joined := qcow2.BackingPath(l.Image, c.Backing)
			kernel, kerr := kernelOpens(joined)
			if kernel != c.Want || (kerr != nil) != (c.Want == "") {
				t.Fatalf("layout: the kernel opens %q (%v) for %q; the case says %q", kernel, kerr, joined, c.Want)
			}
			gate := &qcow2.Gate{AllowedRoots: c.Roots}
			resolved, rerr := gate.Resolve(l.Image, c.Backing)
			f, opened, oerr := gate.Open(l.Image, c.Backing)
			if c.Escapes {
				if oerr == nil {
					f.Close()
					t.Fatalf("Open(%q) approved %q; the kernel opens %q, outside %q", c.Backing, opened, kernel, c.Roots)
				}
				if !errors.Is(oerr, qcow2.ErrNotAllowed) || !errors.Is(rerr, qcow2.ErrNotAllowed) {
					t.Errorf("Open(%q): %v; Resolve: %v; want both ErrNotAllowed", c.Backing, oerr, rerr)
				}
				return
			}
			if rerr != nil || oerr != nil {
				t.Fatalf("Resolve(%q): %q, %v; Open: %v; want both accepted", c.Backing, resolved, rerr, oerr)
			}
			defer f.Close()
			if resolved != kernel || opened != kernel {
				t.Errorf("Resolve(%q) = %q, Open = %q; the kernel opens %q", c.Backing, resolved, opened, kernel)
			}
			head := make([]byte, 1)
			if _, err := io.ReadFull(f, head); err != nil || head[0] != l.Files[kernel] {
				t.Errorf("Open(%q) reads %x (%v); %q holds %x", c.Backing, head, err, kernel, l.Files[kernel])
			}
		})
	}
}

// TestGateRefusals covers what the kernel would open but the gate refuses
// for its own reasons, and the lexical first filter.
func TestGateRefusals(t *testing.T) {
	l := testutil.GateEscapes(t)
	gate := &qcow2.Gate{AllowedRoots: []string{l.Root, "/"}}
	// A /proc magic link reaches the file, but the gate never walks /proc links.
	if _, _, err := gate.Open(l.Image, "/proc/self/root"+l.ImageDir+"/s.raw"); !errors.Is(err, qcow2.ErrNotAllowed) {
		t.Errorf("Open through /proc/self/root: %v; want ErrNotAllowed", err)
	}
	// A name whose middle is a file: the kernel says ENOTDIR; a clean would not.
	if _, _, err := gate.Open(l.Image, "s.raw/../s.raw"); !errors.Is(err, unix.ENOTDIR) {
		t.Errorf("Open(s.raw/../s.raw): %v; want ENOTDIR as the kernel", err)
	}
	if _, err := kernelOpens(l.ImageDir + "/s.raw/../s.raw"); !errors.Is(err, unix.ENOTDIR) {
		t.Errorf("the kernel: %v", err)
	}
	// A missing last component resolves to where the kernel would look.
	inRoot := &qcow2.Gate{AllowedRoots: []string{l.Root}}
	if p, err := inRoot.Resolve(l.Image, "missing.raw"); err != nil || p != l.ImageDir+"/missing.raw" {
		t.Errorf("Resolve(missing.raw) = %q, %v", p, err)
	}
	if _, _, err := inRoot.Open(l.Image, "missing.raw"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open(missing.raw): %v; want ErrNotExist", err)
	}
	// The lexical filter refuses what it cannot judge without walking.
	for _, name := range []string{"l/../s.raw", "./s.raw", "../../x"} {
		if _, err := inRoot.CheckLexical(l.Image, name); !errors.Is(err, qcow2.ErrNotAllowed) {
			t.Errorf("CheckLexical(%q): %v; want ErrNotAllowed", name, err)
		}
	}
	if p, err := inRoot.CheckLexical(l.Image, "missing.raw"); err != nil || p != filepath.Join(l.ImageDir, "missing.raw") {
		t.Errorf("CheckLexical(missing.raw) = %q, %v", p, err)
	}
	// qemu's path_combine: no slash in the image path means the working directory.
	if p := qcow2.BackingPath("top.qcow2", "a/../b"); p != "a/../b" {
		t.Errorf("BackingPath = %q", p)
	}
	if p := qcow2.BackingPath("/x/y/top.qcow2", "a/../b"); p != "/x/y/a/../b" {
		t.Errorf("BackingPath = %q", p)
	}
}
