package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/bytesize"
	"github.com/volagent/volagent/qcow2"
)

type createFlags struct {
	backing       string
	backingFormat string
	size          string
	clusterSize   string
	noBacking     bool
	force         bool
	json          bool
}

func init() {
	var fl createFlags
	cmd := &cobra.Command{
		GroupID: groupLocal,
		Use:     "create (--backing PATH --backing-format raw|qcow2 | --no-backing --size N) [--size N] [--cluster-size N] [--force] [--json] TARGET",
		Short:   "Write a qcow2 overlay onto a block device or a new file",
		Long: `Create writes a qcow2 v3 image onto TARGET: an existing block device (an LVM
logical volume, a loop device) or a new regular file.

With --backing, the image is an overlay: reads of clusters the guest has not
written come from PATH. The backing format must be given with
--backing-format (raw or qcow2); it is recorded in the image so that qemu and
every other tool use it instead of guessing. The name recorded is the
absolute path of PATH (made absolute against the current directory, symlinks
kept as given), so the overlay works from any working directory. A qcow2
backing is validated like 'volagent inspect' does, and refused if it breaks
the policy.

--size is the virtual disk size; it defaults to the backing's virtual size
(a raw backing's size rounded up to 512 bytes). Sizes are bytes or take a
binary suffix: K, M, G, T, P (KiB, MiB, ... also accepted). The virtual size
must be a multiple of 512.

A block device is opened exclusively (a mounted or otherwise claimed device
is refused) holding qemu-img's writer locks (a device a running guest or
another qemu holds is refused, naming it; qemu cannot open it meanwhile),
and with direct I/O where possible; the metadata is written in
one write aligned to the device's logical block size, then flushed. The
device must be writable and large enough for the metadata. Only the
metadata clusters are written; the rest of the device is left as it is,
since qemu reaches it only through the tables written here.

A regular file is created new (never overwriting an existing one unless
--force) and holds just the metadata; qemu grows it as the guest writes.

Exit status: 0 created, 3 the backing is refused (malformed, hostile or
against the policy), 2 usage or I/O error.`,
		Example: `  # An overlay on an LV over a raw base image; the virtual size is the base's.
  volagent create --backing /var/lib/images/base.raw --backing-format raw /dev/vg0/vm1

  # Over a qcow2 base, 20 GiB virtual, 2 MiB clusters, facts as JSON.
  volagent create --backing base.qcow2 --backing-format qcow2 --size 20G \
      --cluster-size 2M --json /dev/vg0/vm2

  # A standalone image (no backing) in a new file.
  volagent create --no-backing --size 10G disk.qcow2`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runCreate(cmd.OutOrStdout(), cmd.ErrOrStderr(), args[0], fl)
		},
	}
	f := cmd.Flags()
	f.StringVar(&fl.backing, "backing", "", "backing file or device PATH; its absolute path is recorded in the image")
	f.StringVar(&fl.backingFormat, "backing-format", "", "format of the backing: raw or qcow2 (required with --backing; never guessed)")
	f.StringVar(&fl.size, "size", "", "virtual size, e.g. 20G (default: the backing's virtual size)")
	f.StringVar(&fl.clusterSize, "cluster-size", "64K", "cluster size, a power of two from 512 to 2M")
	f.BoolVar(&fl.noBacking, "no-backing", false, "create an image without a backing file (needs --size)")
	f.BoolVar(&fl.force, "force", false, "overwrite TARGET if it is an existing regular file")
	f.BoolVar(&fl.json, "json", false, "print the created image's facts as JSON")
	rootCmd.AddCommand(cmd)
}

// createReport is what create prints; the JSON field names are stable.
type createReport struct {
	Target                string `json:"target"`
	TargetType            string `json:"target-type"` // "block-device" or "file"
	TargetSize            int64  `json:"target-size"` // device size; for a file, its size now
	LogicalBlockSize      int    `json:"logical-block-size"`
	DirectIO              bool   `json:"direct-io"`
	VirtualSize           int64  `json:"virtual-size"`
	ClusterSize           int64  `json:"cluster-size"`
	BackingFile           string `json:"backing-file,omitempty"`
	BackingFormat         string `json:"backing-format,omitempty"`
	MetadataBytes         int64  `json:"metadata-bytes"`
	L1TableOffset         int64  `json:"l1-table-offset"`
	L1Size                int64  `json:"l1-size"`
	RefcountTableOffset   int64  `json:"refcount-table-offset"`
	RefcountTableClusters int64  `json:"refcount-table-clusters"`
	RefcountBlocks        int64  `json:"refcount-blocks"`
	RefcountCoveredBytes  int64  `json:"refcount-covered-bytes"`
}

func runCreate(out, errOut io.Writer, target string, fl createFlags) error {
	opts, err := createOptionsFromFlags(fl)
	if err != nil {
		return err
	}
	if fl.backing != "" {
		if err := resolveBacking(errOut, fl.backing, target, &opts); err != nil {
			return err
		}
	}
	if opts.VirtualSize == 0 {
		return errors.New("--size is required with --no-backing")
	}
	// Catch option errors (size, cluster size) before touching the target.
	if _, err := qcow2.MaxImageSize(opts); err != nil {
		return err
	}

	rep := &createReport{Target: target, BackingFile: opts.BackingFile, BackingFormat: opts.BackingFormat}
	var layout *qcow2.CreateLayout
	st, err := os.Stat(target)
	switch {
	case errors.Is(err, os.ErrNotExist):
		layout, err = createOnFile(target, false, opts, rep)
	case err != nil:
		return err
	case st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		layout, err = createOnDevice(target, opts, rep)
	case st.Mode().IsRegular():
		if !fl.force {
			return fmt.Errorf("%s: a regular file already exists; pass --force to overwrite it", target)
		}
		layout, err = createOnFile(target, true, opts, rep)
	default:
		return fmt.Errorf("%s: not a block device or regular file (mode %v)", target, st.Mode().Type())
	}
	if err != nil {
		return err
	}
	rep.VirtualSize = layout.VirtualSize
	rep.ClusterSize = layout.ClusterSize
	rep.MetadataBytes = layout.WriteSize
	rep.L1TableOffset, rep.L1Size = layout.L1TableOffset, layout.L1Entries
	rep.RefcountTableOffset, rep.RefcountTableClusters = layout.RefcountTableOffset, layout.RefcountTableClusters
	rep.RefcountBlocks, rep.RefcountCoveredBytes = layout.RefcountBlocks, layout.CoveredSize
	if rep.TargetType == "file" {
		rep.TargetSize = layout.WriteSize
	}
	if fl.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	backing := "no backing file"
	if rep.BackingFile != "" {
		backing = fmt.Sprintf("backing %s (%s)", rep.BackingFile, rep.BackingFormat)
	}
	fmt.Fprintf(out, "created %s: qcow2 image on a %s, virtual size %d, cluster size %d, %s, %d bytes of metadata\n",
		target, strings.ReplaceAll(rep.TargetType, "-", " "), rep.VirtualSize, rep.ClusterSize, backing, rep.MetadataBytes)
	return nil
}

// createOptionsFromFlags checks the flag combination and parses the sizes.
// VirtualSize stays 0 when it is to come from the backing.
func createOptionsFromFlags(fl createFlags) (qcow2.CreateOptions, error) {
	var opts qcow2.CreateOptions
	switch {
	case fl.noBacking && (fl.backing != "" || fl.backingFormat != ""):
		return opts, errors.New("--no-backing excludes --backing and --backing-format")
	case !fl.noBacking && fl.backing == "":
		return opts, errors.New("give --backing PATH --backing-format raw|qcow2, or --no-backing for an image without a backing file")
	case fl.backing != "" && fl.backingFormat == "":
		return opts, fmt.Errorf("%w: --backing %s needs --backing-format raw or qcow2; volagent never guesses a format",
			qcow2.ErrBackingFormatMissing, fl.backing)
	case fl.backing != "":
		if _, err := qcow2.ParseFormat(fl.backingFormat); err != nil {
			return opts, fmt.Errorf("%w: --backing-format: %w", qcow2.ErrBackingFormat, err)
		}
	}
	opts.BackingFormat = fl.backingFormat
	cs, err := parseSizeFlag("--cluster-size", fl.clusterSize)
	if err != nil {
		return opts, err
	}
	if cs > 1<<30 {
		return opts, fmt.Errorf("%w: --cluster-size %q: must be a power of two from 512 to 2M", qcow2.ErrCreateOption, fl.clusterSize)
	}
	opts.ClusterSize = int(cs)
	if fl.size != "" {
		if opts.VirtualSize, err = parseSizeFlag("--size", fl.size); err != nil {
			return opts, err
		}
		if opts.VirtualSize <= 0 || opts.VirtualSize%512 != 0 {
			return opts, fmt.Errorf("--size %q = %d bytes: must be > 0 and a multiple of 512", fl.size, opts.VirtualSize)
		}
	}
	return opts, nil
}

// parseSizeFlag parses a size flag's value (bytesize.Parse), naming the
// flag in the error.
func parseSizeFlag(flag, value string) (int64, error) {
	n, err := bytesize.Parse(value)
	if err != nil {
		return 0, fmt.Errorf("%s %w", flag, err)
	}
	return n, nil
}

// resolveBacking records the backing's absolute path in opts, checks the
// backing the user named, and fills in the virtual size from it. A backing
// the policy refuses (unsafe name, a qcow2 header with violations) is a
// refusal (exit 3).
func resolveBacking(errOut io.Writer, backing, target string, opts *qcow2.CreateOptions) error {
	abs, err := filepath.Abs(backing)
	if err != nil {
		return fmt.Errorf("--backing %q: %w", backing, err)
	}
	if errs := qcow2.ValidateBackingName(abs); len(errs) > 0 {
		return refused(&qcow2.ValidationError{Violations: errs})
	}
	opts.BackingFile = abs
	f, size, err := openBacking(abs)
	if err != nil {
		return err
	}
	defer f.Close()
	if sameFileOrDevice(target, f) {
		return fmt.Errorf("%s: the target is the backing itself", target)
	}
	virtualSize, err := qcow2.BackingVirtualSize(f, size, opts.BackingFormat)
	if qcow2.IsRefusal(err) {
		return refused(fmt.Errorf("backing %s refused: %w", abs, err))
	}
	if err != nil {
		return fmt.Errorf("backing %s: %w", abs, err)
	}
	if opts.BackingFormat == "raw" {
		warnImageHeaderInRaw(errOut, f, abs)
	}
	if opts.VirtualSize == 0 {
		opts.VirtualSize = virtualSize
	}
	return nil
}

// warnImageHeaderInRaw warns when a raw backing starts with an image header.
// The overlay records "raw", so qemu reads it as raw; but the user may have
// meant another format, and tools that probe would misread the file.
func warnImageHeaderInRaw(errOut io.Writer, f io.ReaderAt, path string) {
	head := make([]byte, qcow2.DetectSize)
	n, _ := f.ReadAt(head, 0)
	if format := qcow2.DetectImageHeader(head[:n]); format != "" {
		fmt.Fprintf(errOut, "volagent: warning: raw backing %s starts with a %s header; it will be read as raw, as --backing-format says\n", path, format)
	}
}

// sameFileOrDevice reports whether path names the file open as f, or the
// same block device through another device node (/dev/vg/lv, /dev/dm-3).
func sameFileOrDevice(path string, f *os.File) bool {
	var a, b unix.Stat_t
	if unix.Stat(path, &a) != nil || unix.Fstat(int(f.Fd()), &b) != nil {
		return false
	}
	if a.Mode&unix.S_IFMT == unix.S_IFBLK && b.Mode&unix.S_IFMT == unix.S_IFBLK {
		return a.Rdev == b.Rdev
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

// openBacking opens the backing the user named, read-only, and returns it
// with its size (a device's size too).
func openBacking(path string) (*os.File, int64, error) {
	// O_NONBLOCK: a FIFO given by mistake must not hang us.
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("--backing: %w", err)
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() && (st.Mode()&os.ModeDevice == 0 || st.Mode()&os.ModeCharDevice != 0) {
		err = fmt.Errorf("not a regular file or block device (mode %v)", st.Mode().Type())
	}
	var size int64
	if err == nil {
		size, err = f.Seek(0, io.SeekEnd)
	}
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("--backing %s: %w", path, err)
	}
	return f, size, nil
}

// createOnFile writes the image into a new regular file (O_EXCL), or
// truncates an existing one when overwrite is set. A new file that could not
// be written is removed.
func createOnFile(path string, overwrite bool, opts qcow2.CreateOptions, rep *createReport) (*qcow2.CreateLayout, error) {
	// Read-write: qemu's locks are read locks, which need read access.
	flags := os.O_RDWR | os.O_CREATE | os.O_EXCL
	if overwrite {
		flags = os.O_RDWR
	}
	f, err := os.OpenFile(path, flags|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, err
	}
	// qemu-img's writer locks before the file is truncated: an image a
	// guest holds is refused, not overwritten.
	if _, err := hostblk.LockImage(f, hostblk.WriterLocks); err != nil {
		f.Close()
		if !overwrite {
			os.Remove(path)
		}
		return nil, err
	}
	if overwrite {
		if err := f.Truncate(0); err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	rep.TargetType, rep.LogicalBlockSize = "file", qcow2.DefaultBlockSize
	// The refcount table covers what the file may grow to, so qemu never
	// has to grow it.
	capacity, err := qcow2.MaxImageSize(opts)
	var layout *qcow2.CreateLayout
	if err == nil {
		opts.BlockSize = qcow2.DefaultBlockSize
		layout, err = qcow2.Create(f, capacity, opts)
	}
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("closing %s: %w", path, cerr)
	}
	if err != nil {
		if !overwrite {
			os.Remove(path)
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if !overwrite {
		syncDir(filepath.Dir(path))
	}
	return layout, nil
}

// syncDir makes a new directory entry durable; failure only costs
// durability of the name, so it is ignored.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// createOnDevice writes the image onto a block device opened exclusively
// and holding qemu-img's writer locks (hostblk.OpenTarget: a device a
// guest holds is refused, naming it), with O_DIRECT unless the device
// refuses it.
func createOnDevice(path string, opts qcow2.CreateOptions, rep *createReport) (*qcow2.CreateLayout, error) {
	tgt, err := hostblk.OpenTarget(path, false)
	if errors.Is(err, hostblk.ErrNoDirectIO) {
		// Some stacked devices do not do O_DIRECT; aligned buffered writes
		// followed by fsync are as durable.
		tgt, err = hostblk.OpenTarget(path, true)
	}
	switch {
	case errors.Is(err, hostblk.ErrImageInUse):
		return nil, err
	case errors.Is(err, hostblk.ErrTargetBusy):
		return nil, fmt.Errorf("%s: refusing a device in use (mounted, or held open exclusively by another program or by the kernel): %w", path, err)
	case errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES):
		return nil, fmt.Errorf("%s: the device is read-only: %w", path, err)
	case err != nil:
		return nil, err
	}
	defer tgt.Close()
	rep.DirectIO = tgt.Direct
	rep.TargetType, rep.TargetSize, rep.LogicalBlockSize = "block-device", tgt.Size, tgt.BlockSize
	opts.BlockSize = tgt.BlockSize
	layout, err := qcow2.Create(tgt.File, tgt.Size, opts)
	if errors.Is(err, qcow2.ErrTargetTooSmall) {
		return nil, fmt.Errorf("%s: device of %d bytes is too small: %w", path, tgt.Size, err)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return layout, nil
}
