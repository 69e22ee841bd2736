package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/qcow2"
)

// exportChunkSize is how much export reads and writes at once.
const exportChunkSize = 4 << 20

// exportHoleBlock is the granularity at which export leaves zero runs as
// holes in a regular output file (a common filesystem block size).
const exportHoleBlock = 4 << 10

type exportOptions struct {
	allowBacking []string
	format       string
	force        bool
	forceShare   bool
}

func init() { rootCmd.AddCommand(newExportCmd()) }

func newExportCmd() *cobra.Command {
	var opts exportOptions
	cmd := &cobra.Command{
		GroupID: groupLocal,
		Use:     "export [flags] IMAGE OUTPUT",
		Short:   "Write the guest-visible raw bytes of an image, through its backing chain",
		Long: `export writes what a virtual machine would see on IMAGE, as a raw disk, to
OUTPUT (a file, or - for standard output).

IMAGE is read as --format (default qcow2); it is never probed. Its backing
files are opened with the format each header records, and only if they lie
under a directory given with --allow-backing (repeatable), judged by the
file the kernel opens for the name: symlinks and ".." are taken in order,
as qemu would, never cleaned lexically first. Without --allow-backing an image with a backing file is
refused.

A regular OUTPUT file is written to a temporary file in the same directory
and renamed into place when complete, so a failure leaves nothing behind;
zero runs become holes, so the output is sparse. An existing OUTPUT is only
replaced with --force. New files are created with mode 0600.

IMAGE is held with qemu-img's reader locks while it is read: an image
another process writes (a running guest, qemu-img, volagent import) is
refused, and nobody can start writing it until export ends. With
--force-share (-U, as qemu-img's) an image in use is read anyway, with a
warning: the result may be inconsistent.

Exit status: 0 success, 2 usage or I/O error (including an image in use),
3 image refused (malformed, hostile, or against the policy).`,
		Example: `  # The guest's disk through its chain, backing files allowed under /var/lib/images:
  volagent export --allow-backing /var/lib/images /dev/vg0/vm1-overlay vm1.raw

  # A standalone qcow2 image to standard output:
  volagent export disk.qcow2 - | sha256sum`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			err := runExport(opts, args[0], args[1], cmd.OutOrStdout(), cmd.ErrOrStderr())
			if err != nil && qcow2.IsRefusal(err) {
				return refused(err)
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&opts.allowBacking, "allow-backing", nil, "directory under which backing files may be opened (repeatable)")
	f.StringVar(&opts.format, "format", "qcow2", "format of IMAGE: qcow2 or raw (never probed)")
	f.BoolVar(&opts.force, "force", false, "replace OUTPUT if it exists")
	f.BoolVarP(&opts.forceShare, "force-share", "U", false, "read IMAGE even while another process writes it (the result may be inconsistent)")
	return cmd
}

// runExport writes the guest-visible bytes of image to output ("-" for
// stdout). Warnings go to warn.
func runExport(opts exportOptions, image, output string, stdout, warn io.Writer) error {
	if _, err := qcow2.ParseFormat(opts.format); err != nil {
		return fmt.Errorf("--format: %w", err)
	}
	var roots []string
	for _, r := range opts.allowBacking {
		abs, err := filepath.Abs(r)
		if err != nil {
			return fmt.Errorf("--allow-backing %q: %w", r, err)
		}
		roots = append(roots, abs)
	}
	// qemu's reader locks on IMAGE, held until the export is done.
	lockFile, err := qcow2.OpenImageFile(image)
	if err != nil {
		return err
	}
	defer lockFile.Close()
	if err := lockForReading(lockFile, image, opts.forceShare, warn); err != nil {
		return err
	}
	disk, err := qcow2.OpenChain(image, opts.format, &qcow2.Gate{AllowedRoots: roots})
	if err != nil {
		return err
	}
	defer disk.Close()
	if opts.format == "raw" {
		warnIfImageHeader(disk, image, warn)
	}

	if output == "-" {
		return copyDisk(disk, stdout)
	}
	return exportToFile(disk, output, opts.force)
}

// warnIfImageHeader tells the user when a disk read as raw starts with an
// image format's signature: that is what they asked for, but rarely what
// they meant.
func warnIfImageHeader(disk qcow2.Disk, image string, warn io.Writer) {
	head := make([]byte, qcow2.DetectSize)
	n, _ := disk.ReadAt(head, 0)
	if f := qcow2.DetectImageHeader(head[:n]); f != "" {
		fmt.Fprintf(warn, "volagent: warning: %s is read as raw but starts with a %s header; exporting its bytes unchanged\n", image, f)
	}
}

// copyDisk streams the whole disk to w.
func copyDisk(disk qcow2.Disk, w io.Writer) error {
	buf := make([]byte, exportChunkSize)
	for off := int64(0); off < disk.Size(); {
		n := int(min(int64(len(buf)), disk.Size()-off))
		if err := readChunk(disk, buf[:n], off); err != nil {
			return err
		}
		if _, err := w.Write(buf[:n]); err != nil {
			return fmt.Errorf("writing output: %w", err)
		}
		off += int64(n)
	}
	return nil
}

func readChunk(disk qcow2.Disk, buf []byte, off int64) error {
	got, err := disk.ReadAt(buf, off)
	if got == len(buf) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("reading guest offset %d: %w", off, err)
}

// exportToFile writes the disk sparsely to a temporary file next to output
// and renames it into place.
func exportToFile(disk qcow2.Disk, output string, force bool) (err error) {
	if st, err := os.Lstat(output); err == nil {
		switch {
		case !st.Mode().IsRegular():
			return fmt.Errorf("%s exists and is not a regular file; export writes regular files (use - for standard output)", output)
		case !force:
			return fmt.Errorf("%s exists; use --force to replace it", output)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}

	tmp, err := os.CreateTemp(filepath.Dir(output), "."+filepath.Base(output)+".volagent-export-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := writeSparse(disk, tmp); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return renameIntoPlace(tmp.Name(), output, force)
}

// writeSparse writes the non-zero blocks of disk to f at their offsets,
// leaving zero runs as holes, and sets the file size at the end.
func writeSparse(disk qcow2.Disk, f *os.File) error {
	buf := make([]byte, exportChunkSize)
	zero := make([]byte, exportHoleBlock)
	for off := int64(0); off < disk.Size(); {
		n := int(min(int64(len(buf)), disk.Size()-off))
		chunk := buf[:n]
		if err := readChunk(disk, chunk, off); err != nil {
			return err
		}
		// Write each run of blocks that are not all zero with one WriteAt.
		for start := 0; start < n; {
			for start < n && bytes.Equal(chunk[start:min(start+exportHoleBlock, n)], zero[:min(exportHoleBlock, n-start)]) {
				start += exportHoleBlock
			}
			end := start
			for end < n && !bytes.Equal(chunk[end:min(end+exportHoleBlock, n)], zero[:min(exportHoleBlock, n-end)]) {
				end += exportHoleBlock
			}
			end = min(end, n)
			if start < end {
				if _, err := f.WriteAt(chunk[start:end], off+int64(start)); err != nil {
					return fmt.Errorf("writing %s: %w", f.Name(), err)
				}
			}
			start = end
		}
		off += int64(n)
	}
	if err := f.Truncate(disk.Size()); err != nil {
		return fmt.Errorf("sizing %s: %w", f.Name(), err)
	}
	return nil
}

// renameIntoPlace renames tmp to output. Without force it refuses, even
// against a file created meanwhile, to replace output (RENAME_NOREPLACE, or
// link+unlink where the filesystem lacks it).
func renameIntoPlace(tmp, output string, force bool) error {
	if force {
		return os.Rename(tmp, output)
	}
	err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, output, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		if err = os.Link(tmp, output); err == nil {
			return os.Remove(tmp)
		}
	}
	if errors.Is(err, unix.EEXIST) || errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%s appeared while exporting; use --force to replace it", output)
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: tmp, New: output, Err: err}
	}
	return nil
}
