package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/qcow2"
)

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

// volumesImportCmdLine is where the daemon's import lives; import itself
// only copies locally.
const volumesImportCmdLine = "volagent volumes import --pool POOL --name NAME [--source-format raw|qcow2] SOURCE"

// removedDaemonFlags were import's daemon form (before import meant one
// thing); they stay, hidden, only to point to volumes import.
var removedDaemonFlags = []string{"pool", "name", "size", "no-wait", "bus-address"}

func newImportCmd() *cobra.Command {
	var local importOptions
	cmd := &cobra.Command{
		GroupID: groupLocal,
		Use:     "import [--source-format raw|qcow2] [--allow-backing DIR]... [--json] [--buffered] SOURCE TARGET",
		Short:   "Copy an image's guest view into an existing qcow2 image",
		Long: `import copies what a virtual machine would see on SOURCE into TARGET, an
existing qcow2 image on a block device or in a file, so that afterwards
TARGET's guest view equals SOURCE byte for byte (and reads zeros past the
end of SOURCE, when TARGET is larger). It runs here, without the daemon; to
import into a new volume of a daemon's pool, use
"` + volumesImportCmdLine + `".

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
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := importArgs(cmd, args); err != nil {
				return err
			}
			err := runImport(local, args[0], args[1], cmd.OutOrStdout(), cmd.ErrOrStderr())
			if err != nil && qcow2.IsRefusal(err) {
				return refused(err)
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&local.sourceFormat, "source-format", "raw", "format of SOURCE: raw or qcow2 (never probed)")
	f.BoolVar(&local.json, "json", false, "report progress as JSON lines on standard output")
	f.StringArrayVar(&local.allowBacking, "allow-backing", nil, "directory under which backing files may be opened (repeatable)")
	f.BoolVar(&local.buffered, "buffered", false, "use the page cache when TARGET cannot do O_DIRECT")
	for _, n := range removedDaemonFlags {
		if n == "no-wait" {
			f.Bool(n, false, "removed: the daemon's import is volumes import")
		} else {
			f.String(n, "", "removed: the daemon's import is volumes import")
		}
		_ = f.MarkHidden(n)
	}
	return cmd
}

// importArgs refuses the old daemon form (import --pool), which now has
// its own name, and a wrong number of arguments.
func importArgs(cmd *cobra.Command, args []string) error {
	var old []string
	for _, n := range removedDaemonFlags {
		if cmd.Flags().Changed(n) {
			old = append(old, "--"+n)
		}
	}
	if len(old) > 0 {
		return fmt.Errorf("import %v: import only copies locally into an existing image now; "+
			"to import into a new volume through the daemon, run %q", old, volumesImportCmdLine)
	}
	if len(args) != 2 {
		return fmt.Errorf("import copies into an existing image and takes SOURCE and TARGET, not %d arguments (%q); "+
			"to import into a new volume through the daemon, run %q", len(args), args, volumesImportCmdLine)
	}
	return nil
}

func runImport(opts importOptions, source, target string, stdout, stderr io.Writer) (err error) {
	if _, err := qcow2.ParseFormat(opts.sourceFormat); err != nil {
		return fmt.Errorf("--source-format: %w", err)
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

	// The exclusive open comes first, so nobody else writes TARGET while
	// its chain is opened and checked.
	w, err := backend.OpenWriterWithChain(target, gate, opts.buffered)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := w.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("%s: %w", target, cerr)
		}
	}()
	if src.Size() > w.Size() {
		return fmt.Errorf("%s is %d bytes, larger than the virtual size of %s (%d bytes)", source, src.Size(), target, w.Size())
	}

	prog := newProgress(stdout, stderr, opts.json, w.Size())
	st, err := qcow2.CopyGuest(context.Background(), w, src, qcow2.CopyOptions{
		FlushEvery:  importFlushBytes,
		Durable:     prog.durable,
		Progress:    func(done, _ int64) { prog.update(done) },
		BufferAlign: w.Target.BlockSize,
	})
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
		st.Zero += tail
	}
	if err := w.Flush(); err != nil {
		return err
	}
	prog.finish(w.Size(), st.Data, st.Zero)
	if !opts.json {
		fmt.Fprintf(stdout, "imported %s into %s: %d bytes of data, %d bytes of zeros\n", source, target, st.Data, st.Zero)
	}
	return nil
}
