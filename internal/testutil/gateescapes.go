package testutil

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// GateCase is one backing name of the gate escape table: the image at
// Layout.Image records Backing, and the gate is given Roots.
type GateCase struct {
	Name    string
	Backing string
	Roots   []string
	// Escapes: the kernel, walking the name, reaches a file outside the
	// roots (or none at all, for a loop). The gate must refuse it.
	Escapes bool
	// Want is the file the kernel opens ("" when the walk fails).
	Want string
}

// GateLayout is a directory tree where backing names walk out of an
// allowed root through symlinks and ".." in every order. Every raw file
// holds a different byte, so the bytes read tell which file was opened.
type GateLayout struct {
	Root, Outside string
	ImageDir      string // Root/img, where the overlay lives
	Image         string // ImageDir/top.qcow2 (not created here)
	Files         map[string]byte
	Cases         []GateCase
}

// GateEscapes builds the layout in a new temporary directory. Lexically
// cleaned, every escaping name lands on a file inside the root (there is
// one, as a decoy), so a gate that cleans before it resolves approves it.
func GateEscapes(t testing.TB) *GateLayout {
	t.Helper()
	base, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	l := &GateLayout{Root: filepath.Join(base, "root"), Outside: filepath.Join(base, "outside"), Files: map[string]byte{}}
	l.ImageDir = filepath.Join(l.Root, "img")
	l.Image = filepath.Join(l.ImageDir, "top.qcow2")
	R, O, I := l.Root, l.Outside, l.ImageDir
	for _, d := range []string{I, filepath.Join(I, "inner"), filepath.Join(O, "sub")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	fill := byte(0x11)
	for _, f := range []string{I + "/s.raw", R + "/s.raw", R + "/other.raw", O + "/s.raw", O + "/sub/s.raw"} {
		if err := os.WriteFile(f, bytes.Repeat([]byte{fill}, 64<<10), 0o644); err != nil {
			t.Fatal(err)
		}
		l.Files[f] = fill
		fill += 0x11
	}
	link := func(target, at string) {
		if err := os.Symlink(target, at); err != nil {
			t.Fatal(err)
		}
	}
	link(O+"/sub", I+"/l")                       // absolute, to a directory outside
	link(O, R+"/esc")                            // a root-level door outside
	link("b", I+"/a")                            // relative, to another symlink
	link(O+"/sub", I+"/b")                       //
	link(O+"/s.raw", I+"/abs")                   // absolute, to a file outside
	link("inner/../../../outside/sub", I+"/rel") // relative, walking out with ..
	link("l/../s.raw", I+"/t")                   // a trailing symlink whose target escapes
	link("loop2", I+"/loop1")                    // a loop
	link("loop1", I+"/loop2")                    //
	link(I+"/inner", I+"/inl")                   // a symlink that stays inside
	link("../other.raw", I+"/alias")             // a relative alias inside
	link(R, base+"/rootlink")                    // the allowed root, named through a symlink
	link(O, I+"/inner/out")                      // a door out, one level down
	roots, linkRoots := []string{R}, []string{base + "/rootlink"}
	l.Cases = []GateCase{
		{"symlink then ..", "l/../s.raw", roots, true, O + "/s.raw"},
		{".. then symlink", "../esc/s.raw", roots, true, O + "/s.raw"},
		{"nested symlinks then ..", "a/../s.raw", roots, true, O + "/s.raw"},
		{"absolute symlink", "abs", roots, true, O + "/s.raw"},
		{"relative symlink with ..", "rel/s.raw", roots, true, O + "/sub/s.raw"},
		{"trailing symlink to outside", "t", roots, true, O + "/s.raw"},
		{"symlink loop", "loop1", roots, true, ""},
		{"absolute name, symlink then ..", I + "/l/../s.raw", roots, true, O + "/s.raw"},
		{"deep symlink then .. twice", "inner/out/sub/../s.raw", roots, true, O + "/s.raw"},
		{"symlinked root, symlink then ..", base + "/rootlink/img/l/../s.raw", linkRoots, true, O + "/s.raw"},
		{"symlinked root, .. out of it", base + "/rootlink/../outside/s.raw", linkRoots, true, O + "/s.raw"},
		{"plain .. out of the root", "../../outside/s.raw", roots, true, O + "/s.raw"},
		// Controls: the kernel stays inside.
		{"plain name", "s.raw", roots, false, I + "/s.raw"},
		{"symlink then .. inside", "inl/../s.raw", roots, false, I + "/s.raw"},
		{"dir then ..", "inner/../s.raw", roots, false, I + "/s.raw"},
		{".. and back", "../img/./s.raw", roots, false, I + "/s.raw"},
		{"alias inside", "alias", roots, false, R + "/other.raw"},
		{"symlinked root", "s.raw", linkRoots, false, I + "/s.raw"},
		{"symlinked root, absolute", base + "/rootlink/other.raw", linkRoots, false, R + "/other.raw"},
	}
	return l
}
