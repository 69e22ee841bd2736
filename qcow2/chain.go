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

// chainLayer is one opened image of a chain, top first.
type chainLayer struct {
	file   *os.File
	path   string // as qemu would name it; relative backing names resolve against its directory
	name   string // the backing file name its parent records; "" for the top
	format string
	header *Header // qcow2 only
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
	if _, err := ParseFormat(format); err != nil {
		return nil, fmt.Errorf("opening %s: format: %w", path, err)
	}
	if gate == nil {
		gate = &Gate{}
	}
	top, err := OpenImageFile(path)
	if err != nil {
		return nil, err
	}
	layers, err := openLayers(chainLayer{file: top, path: path, format: format}, gate)
	if err != nil {
		for _, l := range layers {
			l.file.Close()
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

// openLayers opens top and the files below it. It returns every layer it
// opened, also on error, so the caller can close them.
func openLayers(top chainLayer, gate *Gate) ([]chainLayer, error) {
	type fileID struct{ dev, ino uint64 }
	seen := map[fileID]string{}
	var layers []chainLayer
	cur := top
	for {
		layers = append(layers, cur)
		var st unix.Stat_t
		if err := unix.Fstat(int(cur.file.Fd()), &st); err != nil {
			return layers, &os.PathError{Op: "stat", Path: cur.path, Err: err}
		}
		id := fileID{uint64(st.Dev), st.Ino}
		if first, ok := seen[id]; ok {
			return layers, fieldErr(ErrChain, "backing_file", cur.name,
				"named by %q, is the same file as %q higher up the chain: the chain loops", layers[len(layers)-2].path, first)
		}
		seen[id] = cur.path
		if cur.format == "raw" {
			return layers, nil
		}
		size, err := cur.file.Seek(0, io.SeekEnd)
		if err != nil {
			return layers, fmt.Errorf("size of %s: %w", cur.path, err)
		}
		h, err := ReadHeader(cur.file, size)
		if err != nil {
			return layers, fmt.Errorf("%s: %w", cur.path, formatMismatch(err, len(layers) == 1))
		}
		layers[len(layers)-1].header = h
		if !h.HasBacking() {
			return layers, nil
		}
		if len(layers) >= MaxChainDepth {
			return layers, fieldErr(ErrChain, "backing_file", h.BackingFile,
				"named by %q, image %d of the chain; at most %d images are allowed", cur.path, len(layers), MaxChainDepth)
		}
		f, _, err := gate.Open(cur.path, h.BackingFile)
		if err != nil {
			return layers, fmt.Errorf("%s: %w", cur.path, err)
		}
		cur = chainLayer{file: f, path: BackingPath(cur.path, h.BackingFile), name: h.BackingFile, format: h.BackingFormat}
	}
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
func assembleChain(layers []chainLayer) (Disk, error) {
	var below Disk
	for i := len(layers) - 1; i >= 0; i-- {
		l := layers[i]
		var d Disk
		var err error
		if l.format == "raw" {
			d, err = OpenRaw(l.file)
		} else {
			var img *Image
			img, err = newImage(l.file, l.header, below)
			if err == nil {
				img.closer = l.file
				d = img
			}
		}
		if err != nil {
			if below != nil {
				below.Close()
			}
			for _, above := range layers[:i+1] {
				above.file.Close()
			}
			return nil, fmt.Errorf("%s: %w", l.path, err)
		}
		below = d
	}
	return below, nil
}
