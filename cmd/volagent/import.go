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

// importUsage names both forms, for usage errors.
const importUsage = `give either the local form, "volagent import [--source-format raw|qcow2] SOURCE TARGET", ` +
	`or the daemon form, "volagent import --pool POOL --name NAME [--source-format raw|qcow2] SOURCE"`

func newImportCmd() *cobra.Command {
	var local importOptions
	var daemon volumesImportFlags
	cmd := &cobra.Command{
		Use: `import [--source-format raw|qcow2] [--allow-backing DIR]... [--json] [--buffered] SOURCE TARGET
  volagent import --pool POOL --name NAME [--source-format raw|qcow2] [--size N] [--no-wait] [--json] SOURCE`,
		Short: "Copy an image's guest view into an existing qcow2 image, or into a new volume through the daemon",
		Long: `import has two forms.

Local (two arguments, no --pool): import copies what a virtual machine
would see on SOURCE into TARGET, an existing qcow2 image on a block device
or in a file, so that afterwards TARGET's guest view equals SOURCE byte for
byte (and reads zeros past the end of SOURCE, when TARGET is larger).

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

Through the daemon (--pool and --name, one argument): the volagent daemon
copies SOURCE into a new base volume NAME in POOL, as "volagent volumes
import" does. SOURCE is opened here, with your rights, and passed to the
daemon as a file descriptor. The copy is a daemon job: its progress is
shown until it ends; with --no-wait the job's object path is printed and
import returns. --allow-backing and --buffered are for the local form;
--size, --no-wait and --bus-address for the daemon form.

Exit status: 0 success, 2 usage or I/O error (including a full device, or
a failed job), 3 image refused (malformed, hostile, or against the policy).`,
		Example: `  # Local: a raw disk into a fresh overlay on a logical volume:
  volagent import --allow-backing /var/lib/images disk.raw /dev/vg0/vm1-overlay

  # Local: a qcow2 image, with machine-readable progress:
  volagent import --source-format qcow2 --json vm.qcow2 /dev/vg0/vm1-overlay

  # Through the daemon: a new base volume "debian12" in pool "fast":
  volagent import --pool fast --name debian12 --source-format qcow2 debian-12.qcow2`,
		DisableFlagsInUseLine: true, // the Use lines list the flags of each form
		Args:                  cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			viaDaemon, err := importForm(cmd, args)
			if err != nil {
				return err
			}
			if viaDaemon {
				daemon.sourceFormat, daemon.json = local.sourceFormat, local.json
				return runVolumesImport(cmd.OutOrStdout(), cmd.ErrOrStderr(), args[0], daemon)
			}
			err = runImport(local, args[0], args[1], cmd.OutOrStdout(), cmd.ErrOrStderr())
			if err != nil && qcow2.IsRefusal(err) {
				return refused(err)
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&local.sourceFormat, "source-format", "raw", "format of SOURCE: raw or qcow2 (never probed)")
	f.BoolVar(&local.json, "json", false, "report progress as JSON lines on standard output")
	f.StringArrayVar(&local.allowBacking, "allow-backing", nil, "local form: directory under which backing files may be opened (repeatable)")
	f.BoolVar(&local.buffered, "buffered", false, "local form: use the page cache when TARGET cannot do O_DIRECT")
	f.StringVar(&daemon.pool, "pool", "", "daemon form: pool to import into")
	f.StringVar(&daemon.name, "name", "", "daemon form: name of the new volume")
	f.StringVar(&daemon.size, "size", "", "daemon form: virtual size of the volume (default: the source's)")
	f.BoolVar(&daemon.noWait, "no-wait", false, "daemon form: print the job and return at once")
	f.StringVar(&daemon.busAddress, "bus-address", "", "daemon form: D-Bus address of the daemon's bus (default: $DBUS_SYSTEM_BUS_ADDRESS, else the system bus)")
	return cmd
}

// importForm tells the daemon form (--pool) from the local one, and
// refuses a mix of the two with the flag or argument that is wrong.
func importForm(cmd *cobra.Command, args []string) (viaDaemon bool, err error) {
	set := func(names ...string) []string {
		var out []string
		for _, n := range names {
			if cmd.Flags().Changed(n) {
				out = append(out, "--"+n)
			}
		}
		return out
	}
	if cmd.Flags().Changed("pool") {
		switch {
		case !cmd.Flags().Changed("name"):
			return false, fmt.Errorf("import --pool needs --name NAME for the new volume; %s", importUsage)
		case len(args) != 1:
			return false, fmt.Errorf("import --pool takes one argument, SOURCE, not %d (%q); %s", len(args), args, importUsage)
		}
		if local := set("allow-backing", "buffered"); len(local) > 0 {
			return false, fmt.Errorf("import --pool: %v are for the local form only; %s", local, importUsage)
		}
		return true, nil
	}
	if daemon := set("name", "size", "no-wait", "bus-address"); len(daemon) > 0 {
		return false, fmt.Errorf("import: %v are for the daemon form, which needs --pool; %s", daemon, importUsage)
	}
	if len(args) != 2 {
		return false, fmt.Errorf("import without --pool copies into an existing image and takes SOURCE and TARGET, not %d arguments (%q); %s", len(args), args, importUsage)
	}
	return false, nil
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
