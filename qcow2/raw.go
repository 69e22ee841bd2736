package qcow2

import (
	"fmt"
	"io"
	"os"
)

// rawDisk is a raw image: the file's bytes are the guest's bytes.
type rawDisk struct {
	f    *os.File
	size int64
}

// OpenRaw returns the raw Disk of an open file or block device, taking
// ownership of f (Close closes it). The size is taken once, by seeking to
// the end, which works for block devices where Stat reports 0; reads past
// that size return io.EOF even if the file grows later.
func OpenRaw(f *os.File) (Disk, error) {
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, fmt.Errorf("size of %s: %w", f.Name(), err)
	}
	return &rawDisk{f: f, size: size}, nil
}

func (d *rawDisk) Size() int64    { return d.size }
func (d *rawDisk) Format() string { return "raw" }
func (d *rawDisk) Close() error   { return d.f.Close() }

func (d *rawDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("raw: negative read offset %d", off)
	}
	if off >= d.size {
		return 0, io.EOF
	}
	if rest := d.size - off; int64(len(p)) > rest {
		n, err := d.f.ReadAt(p[:rest], off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	return d.f.ReadAt(p, off)
}
