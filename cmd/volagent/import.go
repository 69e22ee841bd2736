package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/volagent/volagent/qcow2"
)

// importChunkSize is how much import reads from SOURCE at once; data runs
// of a chunk go to the writer as one request.
const importChunkSize = 8 << 20

// importFlushBytes is how often import makes what it copied durable (and
// says so in --json progress as durable-bytes), so a crash costs at most
// this much work and leaks at most this much space.
const importFlushBytes = 256 << 20

type importOptions struct {
	sourceFormat string
	allowBacking []string
	json         bool
	buffered     bool
}

func init() { rootCmd.AddCommand(newImportCmd()) }

func newImportCmd() *cobra.Command {
	var opts importOptions
	cmd := &cobra.Command{
		Use:   "import [--source-format raw|qcow2] [--allow-backing DIR]... [--json] [--buffered] SOURCE TARGET",
		Short: "Copy the guest-visible content of an image into an existing qcow2 image",
		Long: `import copies what a virtual machine would see on SOURCE into TARGET, an
existing qcow2 image on a block device or in a file, so that afterwards
TARGET's guest view equals SOURCE byte for byte (and reads zeros past the
end of SOURCE, when TARGET is larger).

SOURCE is read as --source-format (default raw); it is never probed. Backing
files of SOURCE and of TARGET are opened with the format their headers
record, and only under a directory given with --allow-backing.

TARGET is opened exclusively (a second writer is refused) with O_DIRECT; a
target that cannot do O_DIRECT is refused unless --buffered is given. The
image stays consistent for qemu whenever volagent stops, even killed: at
worst clusters leak (qemu-img check -r leaks reclaims them). Zero ranges of
SOURCE cost no data writes: they become zero clusters where TARGET has a
backing file, and are skipped where TARGET already reads zeros.

Progress: a bar on a terminal; with --json, one JSON object per line on
standard output ({"event":"progress",...}, then {"event":"done",...});
"durable-bytes" says how much of SOURCE is flushed to TARGET for good.

Exit status: 0 success, 2 usage or I/O error (including a full device),
3 image refused (malformed, hostile, or against the policy).`,
		Example: `  # A raw disk into a fresh overlay on a logical volume:
  volagent import --allow-backing /var/lib/images disk.raw /dev/vg0/vm1-overlay

  # A qcow2 image, with machine-readable progress:
  volagent import --source-format qcow2 --json vm.qcow2 /dev/vg0/vm1-overlay`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			err := runImport(opts, args[0], args[1], cmd.OutOrStdout(), cmd.ErrOrStderr())
			if err != nil && qcow2.IsRefusal(err) {
				return refused(err)
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.sourceFormat, "source-format", "raw", "format of SOURCE: raw or qcow2 (never probed)")
	f.StringArrayVar(&opts.allowBacking, "allow-backing", nil, "directory under which backing files may be opened (repeatable)")
	f.BoolVar(&opts.json, "json", false, "report progress as JSON lines on standard output")
	f.BoolVar(&opts.buffered, "buffered", false, "use the page cache when TARGET cannot do O_DIRECT")
	return cmd
}

// backingView lends the target's backing disk to the writer; the chain
// that opened it closes it.
type backingView struct{ qcow2.Disk }

func (backingView) Close() error { return nil }

func runImport(opts importOptions, source, target string, stdout, stderr io.Writer) (err error) {
	if opts.sourceFormat != "raw" && opts.sourceFormat != "qcow2" {
		return fmt.Errorf("--source-format %q: volagent reads raw and qcow2", opts.sourceFormat)
	}
	var roots []string
	for _, r := range opts.allowBacking {
		abs, err := filepath.Abs(r)
		if err != nil {
			return fmt.Errorf("--allow-backing %q: %w", r, err)
		}
		roots = append(roots, abs)
	}
	if a, err := os.Stat(source); err == nil {
		if b, err := os.Stat(target); err == nil && os.SameFile(a, b) {
			return fmt.Errorf("SOURCE %s and TARGET %s are the same file", source, target)
		}
	}
	gate := &qcow2.Gate{AllowedRoots: roots}
	src, err := qcow2.OpenChain(source, opts.sourceFormat, gate)
	if err != nil {
		return err
	}
	defer src.Close()
	if opts.sourceFormat == "raw" {
		warnIfImageHeader(src, source, stderr)
	}

	// The writer's exclusive open comes first, so nobody else writes
	// TARGET while its chain is opened and checked.
	tgt, err := qcow2.OpenTarget(target, opts.buffered)
	if err != nil {
		return err
	}
	defer tgt.Close()
	chain, err := qcow2.OpenChain(target, "qcow2", gate)
	if err != nil {
		return err
	}
	defer chain.Close()
	top := chain.(*qcow2.Image)
	var backing qcow2.Disk
	if top.Backing() != nil {
		backing = backingView{top.Backing()}
	}
	w, err := qcow2.OpenWriter(tgt, tgt.Size, qcow2.WriterOptions{BlockSize: tgt.BlockSize, Backing: backing, ContainerSize: tgt.ContainerSize()})
	if err != nil {
		return fmt.Errorf("%s: %w", target, err)
	}
	defer func() {
		if cerr := w.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("%s: %w", target, cerr)
		}
	}()
	if h, seen := w.Header(), top.Header(); h.BackingFile != seen.BackingFile || h.BackingFormat != seen.BackingFormat || h.Size != seen.Size {
		return fmt.Errorf("%s changed while it was being opened", target)
	}
	if src.Size() > w.Size() {
		return fmt.Errorf("%s is %d bytes, larger than the virtual size of %s (%d bytes)", source, src.Size(), target, w.Size())
	}

	prog := newProgress(stdout, stderr, opts.json, w.Size())
	st, err := copyInto(w, src, tgt.BlockSize, prog)
	if err != nil {
		prog.abandon()
		if errors.Is(err, qcow2.ErrNoSpace) {
			return fmt.Errorf("%s: %w; the image needs a container of more than %d bytes", target, err, w.HighestAllocated())
		}
		return err
	}
	// TARGET is larger: its guest view past SOURCE reads zeros too.
	if tail := w.Size() - src.Size(); tail > 0 {
		if err := w.WriteZeroes(src.Size(), tail); err != nil {
			return err
		}
		st.zero += tail
	}
	if err := w.Flush(); err != nil {
		return err
	}
	prog.finish(w.Size(), st.data, st.zero)
	if !opts.json {
		fmt.Fprintf(stdout, "imported %s into %s: %d bytes of data, %d bytes of zeros\n", source, target, st.data, st.zero)
	}
	return nil
}

type copyStats struct{ data, zero int64 }

type chunk struct {
	buf []byte
	off int64
	err error
}

// copyInto copies src into w chunk by chunk; a reader goroutine fills the
// next chunk while the current one is written.
func copyInto(w *qcow2.Writer, src qcow2.Disk, blockSize int, prog *progress) (copyStats, error) {
	c := w.Header().ClusterSize()
	size := max(importChunkSize/c, 1) * c
	free := make(chan []byte, 2)
	for range 2 {
		free <- qcow2.AlignedBuffer(int(size), max(blockSize, 4096))
	}
	filled := make(chan chunk, 1)
	done := make(chan struct{})
	defer close(done)
	go func() {
		defer close(filled)
		for off := int64(0); off < src.Size(); off += size {
			var buf []byte
			select {
			case buf = <-free:
			case <-done:
				return
			}
			n := min(size, src.Size()-off)
			got, err := src.ReadAt(buf[:n], off)
			if got == int(n) {
				err = nil
			} else if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			if err != nil {
				err = fmt.Errorf("reading source at offset %d: %w", off, err)
			}
			select {
			case filled <- chunk{buf: buf[:n], off: off, err: err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()

	zeros := make([]byte, c)
	var st copyStats
	for ch := range filled {
		if ch.err != nil {
			return st, ch.err
		}
		// Runs of whole clusters that are all zero, or not.
		for pos := int64(0); pos < int64(len(ch.buf)); {
			isZero := func(p int64) bool {
				end := min(p+c, int64(len(ch.buf)))
				return bytes.Equal(ch.buf[p:end], zeros[:end-p])
			}
			zero := isZero(pos)
			end := pos + c
			for end < int64(len(ch.buf)) && isZero(end) == zero {
				end += c
			}
			end = min(end, int64(len(ch.buf)))
			if zero {
				if err := w.WriteZeroes(ch.off+pos, end-pos); err != nil {
					return st, err
				}
				st.zero += end - pos
			} else {
				if _, err := w.WriteAt(ch.buf[pos:end], ch.off+pos); err != nil {
					return st, err
				}
				st.data += end - pos
			}
			pos = end
		}
		copied := ch.off + int64(len(ch.buf))
		if copied/importFlushBytes > ch.off/importFlushBytes {
			if err := w.Flush(); err != nil {
				return st, err
			}
			prog.durable(copied)
		}
		prog.update(copied)
		free <- ch.buf[:cap(ch.buf)]
	}
	return st, nil
}
