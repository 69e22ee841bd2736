package qcow2

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// MaxChainDepth is the most images a backing chain may hold, the top one
// included. Deeper chains are refused with ErrChain.
const MaxChainDepth = 16

// Layer is one image of a backing chain, as WalkChain reaches it.
type Layer struct {
	// File is the image, open read-only. The visitor owns it from the
	// moment it is handed over (close it, or keep it).
	File *os.File
	// Index is the image's place in the chain: 0 for the top.
	Index int
	// Path is the image's path as qemu names it (BackingPath of the name
	// its parent records); relative backing names resolve against it.
	Path string
	// Resolved is the symlink-free path the Gate approved ("" for the top).
	Resolved string
	// Name is the backing file name the parent records ("" for the top).
	Name string
	// Format is the caller's (top) or the parent's backing_format.
	Format string
	// Header is the qcow2 header (nil for raw). When HeaderErr is set it
	// is what could be read, possibly nil.
	Header *Header
	// HeaderErr is why the qcow2 header was refused or could not be read.
	// The walk ends after this layer with it (wrapped, naming the image),
	// unless the visitor returns an error of its own.
	HeaderErr error
}

// WalkChain is the one walker of backing chains: it opens the image at
// path as format ("raw" or "qcow2"; never probed) and, for qcow2, every
// backing file below it through gate (a nil gate allows none), each as the
// format its parent's header records, and calls visit for each image, top
// first. The top image is the caller's choice and is opened directly.
//
// visit is called for every image reached, also for one whose header is
// refused (Layer.HeaderErr); the walk stops at the first error visit
// returns and returns it. The walker refuses, with a *FieldError wrapping
// ErrChain, a chain of more than MaxChainDepth images (before opening the
// next one) and a file seen twice (same device and inode; the repeated
// file is not visited). A backing file the gate refuses ends the walk with
// the gate's error; the file is not opened. Every error the walker makes
// names the image it concerns; the concerned image is the last one
// visited, except for a top image that cannot be opened (none visited).
func WalkChain(path, format string, gate *Gate, visit func(*Layer) error) error {
	if _, err := ParseFormat(format); err != nil {
		return fmt.Errorf("opening %s: format: %w", path, err)
	}
	if gate == nil {
		gate = &Gate{}
	}
	f, err := OpenImageFile(path)
	if err != nil {
		return err
	}
	type fileID struct{ dev, ino uint64 }
	seen := map[fileID]string{}
	l := &Layer{File: f, Path: path, Format: format}
	parent := ""
	for {
		var st unix.Stat_t
		if err := unix.Fstat(int(l.File.Fd()), &st); err != nil {
			l.File.Close()
			return &os.PathError{Op: "stat", Path: l.Path, Err: err}
		}
		id := fileID{uint64(st.Dev), st.Ino}
		if first, ok := seen[id]; ok {
			l.File.Close()
			return fieldErr(ErrChain, "backing_file", l.Name,
				"named by %q, is the same file as %q higher up the chain: the chain loops", parent, first)
		}
		seen[id] = l.Path
		if l.Format == "qcow2" {
			size, err := l.File.Seek(0, io.SeekEnd)
			if err != nil {
				l.File.Close()
				return fmt.Errorf("size of %s: %w", l.Path, err)
			}
			l.Header, l.HeaderErr = ReadHeader(l.File, size)
		}
		if err := visit(l); err != nil {
			return err
		}
		if l.HeaderErr != nil {
			return fmt.Errorf("%s: %w", l.Path, l.HeaderErr)
		}
		h := l.Header
		if h == nil || !h.HasBacking() {
			return nil
		}
		if l.Index+1 >= MaxChainDepth {
			return fieldErr(ErrChain, "backing_file", h.BackingFile,
				"named by %q, image %d of the chain; at most %d images are allowed", l.Path, l.Index+1, MaxChainDepth)
		}
		next, resolved, err := gate.Open(l.Path, h.BackingFile)
		if err != nil {
			return fmt.Errorf("%s: %w", l.Path, err)
		}
		parent = l.Path
		l = &Layer{File: next, Index: l.Index + 1, Path: BackingPath(l.Path, h.BackingFile), Resolved: resolved,
			Name: h.BackingFile, Format: h.BackingFormat}
	}
}

// OpenChain opens the image at path as the caller-given format ("raw" or
// "qcow2"; never probed) and, for qcow2, every backing file below it, each
// as the format its parent's header records. The top image is the caller's
// choice and is opened directly; every backing file is opened only through
// gate (a nil gate allows none). Closing the returned Disk closes the chain.
//
// Results, case by case:
//   - format "qcow2" but the file is not qcow2: a *ValidationError wrapping
//     ErrFormat and ErrNotQcow2;
//   - a header that breaks any rule: its *ValidationError;
//   - a backing file the gate refuses: an error wrapping ErrNotAllowed or
//     ErrBackingName; the file is not opened;
//   - more than MaxChainDepth images, or a file seen twice (same device and
//     inode): a *FieldError wrapping ErrChain;
//   - an I/O error: that error.
//
// Every error names the image it concerns.
func OpenChain(path, format string, gate *Gate) (Disk, error) {
	var layers []*Layer
	err := WalkChain(path, format, gate, func(l *Layer) error {
		layers = append(layers, l)
		if l.HeaderErr != nil {
			return fmt.Errorf("%s: %w", l.Path, formatMismatch(l.HeaderErr, l.Index == 0))
		}
		return nil
	})
	if err != nil {
		for _, l := range layers {
			l.File.Close()
		}
		return nil, err
	}
	return assembleChain(layers)
}

// OpenImageFile opens an image the caller chose (never one an image names:
// those go through the Gate) read-only. O_NONBLOCK keeps a FIFO from
// hanging the open; only regular files and block devices are accepted.
func OpenImageFile(path string) (*os.File, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	if t := st.Mode & unix.S_IFMT; t != unix.S_IFREG && t != unix.S_IFBLK {
		f.Close()
		return nil, fmt.Errorf("%s: only regular files and block devices can be read as images", path)
	}
	return f, nil
}

// formatMismatch adds ErrFormat to a header refusal that says the file is
// not qcow2 at all: the format it was to be read as (the caller's choice
// for the top image, the parent's backing_format below) is wrong.
func formatMismatch(err error, isTop bool) error {
	var ve *ValidationError
	if !errors.As(err, &ve) || !errors.Is(err, ErrNotQcow2) {
		return err
	}
	source := "its parent's backing_format"
	if isTop {
		source = "the caller"
	}
	mismatch := fieldErr(ErrFormat, "format", "qcow2", "%s says qcow2, but the file is not a qcow2 image", source)
	return &ValidationError{Violations: append([]*FieldError{mismatch}, ve.Violations...)}
}

// assembleChain builds the Disks bottom-up. On error it closes everything.
func assembleChain(layers []*Layer) (Disk, error) {
	var below Disk
	for i := len(layers) - 1; i >= 0; i-- {
		l := layers[i]
		var d Disk
		var err error
		if l.Format == "raw" {
			d, err = OpenRaw(l.File)
		} else {
			var img *Image
			img, err = newImage(l.File, l.Header, below)
			if err == nil {
				img.closer = l.File
				d = img
			}
		}
		if err != nil {
			if below != nil {
				below.Close()
			}
			for _, above := range layers[:i+1] {
				above.File.Close()
			}
			return nil, fmt.Errorf("%s: %w", l.Path, err)
		}
		below = d
	}
	return below, nil
}
