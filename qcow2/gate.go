package qcow2

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Gate is the one place that opens files an image names (backing files).
// It accepts a name only if it is a safe plain path (ValidateBackingName),
// resolves a relative name against the directory of the image that names it
// (as qemu does), follows symlinks, and requires the final path to lie under
// one of AllowedRoots. It opens read-only, refuses anything but regular files
// and block devices, and checks after opening that the file it got is the one
// it checked, so a path swapped in between is caught.
//
// The zero Gate allows nothing.
type Gate struct {
	AllowedRoots []string
}

// Resolve returns the absolute, symlink-free path that name, as recorded in
// the image at imagePath, refers to, or an error wrapping ErrBackingName or
// ErrNotAllowed. It does not open the file.
func (g *Gate) Resolve(imagePath, name string) (string, error) {
	p, err := joinBackingName(imagePath, name)
	if err != nil {
		return "", err
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", fmt.Errorf("backing file %q named by %q: %w", name, imagePath, err)
	}
	if !g.underRoot(real) {
		return "", &FieldError{Field: "backing_file", Value: name, Err: ErrNotAllowed,
			Reason: fmt.Sprintf("resolves to %q, which is under none of the allowed roots %q", real, g.AllowedRoots)}
	}
	return real, nil
}

// CheckLexical judges name, as recorded in the image at imagePath, without
// touching the filesystem: the name must be safe and, resolved against the
// image's directory and cleaned (symlinks are not followed), lie under an
// allowed root. Inspection uses it so that looking at a hostile image never
// makes volagent touch the file it names; Open applies the full check.
func (g *Gate) CheckLexical(imagePath, name string) (string, error) {
	p, err := joinBackingName(imagePath, name)
	if err != nil {
		return "", err
	}
	for _, root := range g.AllowedRoots {
		if isUnder(p, filepath.Clean(root)) {
			return p, nil
		}
	}
	return "", &FieldError{Field: "backing_file", Value: name, Err: ErrNotAllowed,
		Reason: fmt.Sprintf("resolves to %q, which is under none of the allowed roots %q", p, g.AllowedRoots)}
}

// joinBackingName validates name and makes it absolute: a relative name is
// relative to the directory of the image that records it, as in qemu.
func joinBackingName(imagePath, name string) (string, error) {
	if errs := ValidateBackingName(name); len(errs) > 0 {
		return "", &ValidationError{Violations: errs}
	}
	if filepath.IsAbs(name) {
		return filepath.Clean(name), nil
	}
	imageAbs, err := filepath.Abs(imagePath)
	if err != nil {
		return "", fmt.Errorf("resolving image path %q: %w", imagePath, err)
	}
	return filepath.Join(filepath.Dir(imageAbs), name), nil
}

func (g *Gate) underRoot(real string) bool {
	for _, root := range g.AllowedRoots {
		r, err := filepath.EvalSymlinks(root)
		if err != nil || !filepath.IsAbs(r) {
			continue
		}
		if isUnder(real, r) {
			return true
		}
	}
	return false
}

// isUnder reports whether the clean absolute path p is root or inside it.
func isUnder(p, root string) bool {
	if !filepath.IsAbs(root) {
		return false
	}
	return p == root || root == "/" || strings.HasPrefix(p, root+"/")
}

// Open resolves name as Resolve does and opens the file read-only. It
// returns the open file and its resolved path.
func (g *Gate) Open(imagePath, name string) (*os.File, string, error) {
	real, err := g.Resolve(imagePath, name)
	if err != nil {
		return nil, "", err
	}
	var before unix.Stat_t
	if err := unix.Stat(real, &before); err != nil {
		return nil, "", fmt.Errorf("backing file %q: %w", real, err)
	}
	if err := checkOpenableType(real, before.Mode); err != nil {
		return nil, "", err
	}
	// O_NONBLOCK so a FIFO swapped in after the check cannot hang us;
	// O_NOFOLLOW because real has no symlinks left.
	fd, err := unix.Open(real, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NONBLOCK|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, "", fmt.Errorf("opening backing file %q: %w", real, err)
	}
	f := os.NewFile(uintptr(fd), real)
	var after unix.Stat_t
	if err := unix.Fstat(fd, &after); err != nil {
		f.Close()
		return nil, "", fmt.Errorf("backing file %q: %w", real, err)
	}
	if after.Dev != before.Dev || after.Ino != before.Ino {
		f.Close()
		return nil, "", &FieldError{Field: "backing_file", Value: name, Err: ErrNotAllowed,
			Reason: fmt.Sprintf("%q changed while it was being opened", real)}
	}
	if err := checkOpenableType(real, after.Mode); err != nil {
		f.Close()
		return nil, "", err
	}
	return f, real, nil
}

func checkOpenableType(path string, mode uint32) error {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG, unix.S_IFBLK:
		return nil
	}
	return &FieldError{Field: "backing_file", Value: path, Err: ErrNotAllowed,
		Reason: "only regular files and block devices can be backing files"}
}
