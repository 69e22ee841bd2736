package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/bytesize"
	"github.com/volagent/volagent/qcow2"
)

type inspectFlags struct {
	json         bool
	format       string
	allowBacking []string
}

func init() {
	var fl inspectFlags
	cmd := &cobra.Command{
		GroupID: groupLocal,
		Use:     "inspect [--json] [--format qcow2|raw] [--allow-backing DIR]... PATH",
		Short:   "Safely report what an image header says (a qemu-img info that opens nothing else)",
		Long: `Inspect reads the header of the image at PATH, a file or a block device, and
reports its facts, the backing file name and format it records, and a verdict
listing every violation found. It opens PATH and nothing else: the backing
file and any external data file an image names are judged from their names
only, never touched.

The format is never guessed: --format says what PATH is (default qcow2).
With --format raw, inspect reports whether the raw content starts with an
image header; such a disk would be misread by any tool that probes formats
(a guest can write such a header into its own raw disk).

Inspect takes no lock (it reads only the header) and reports whether the
image is in use: which of qemu's image locks other processes hold on it
(a running guest, qemu-img, volagent import) and which processes they
are. A header read while another process writes may be stale.

With --allow-backing, a backing file name must resolve under one of the
given directories: relative to the image's directory as qemu combines it,
walked as the kernel walks it (symlinks and ".." in order) with lstat and
readlink only, so the named file is never opened.

Exit status: 0 accepted, 3 refused (malformed, hostile or against the
policy), 2 usage or I/O error.`,
		Example: `  volagent inspect /dev/vg0/vm1-overlay
  volagent inspect --json --allow-backing /var/lib/images overlay.qcow2
  volagent inspect --format raw /dev/vg0/vm1-data`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runInspect(cmd.OutOrStdout(), args[0], fl)
		},
	}
	cmd.Flags().BoolVar(&fl.json, "json", false, "print the report as JSON")
	cmd.Flags().StringVar(&fl.format, "format", "qcow2", "what PATH is: qcow2 or raw (never guessed)")
	cmd.Flags().StringArrayVar(&fl.allowBacking, "allow-backing", nil, "directory backing files may lie under (repeatable)")
	rootCmd.AddCommand(cmd)
}

// The report types live in qcow2; these names keep the CLI code short.
type (
	inspectReport = qcow2.Report
	qcow2Facts    = qcow2.Facts
	violation     = qcow2.ReportViolation
)

func runInspect(out io.Writer, path string, fl inspectFlags) error {
	if _, err := qcow2.ParseFormat(fl.format); err != nil {
		return fmt.Errorf("--format: %w", err)
	}
	f, size, err := openImageReadOnly(path)
	if err != nil {
		return err
	}
	defer f.Close()

	rep, err := qcow2.Inspect(f, size, path, fl.format, fl.allowBacking)
	if err != nil {
		return err
	}
	use, err := inUse(f)
	if err != nil {
		return fmt.Errorf("%s: finding out whether the image is in use: %w", path, err)
	}
	if fl.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(inspectOutput{inspectReport: rep, InUse: use}); err != nil {
			return err
		}
	} else {
		printInspectText(out, rep)
		printInUse(out, use)
	}
	if rep.Verdict == "refused" {
		return refused(fmt.Errorf("%s: refused with %d violation(s)", path, len(rep.Violations)))
	}
	return nil
}

// inspectOutput is inspect's JSON: the header report and "in-use".
type inspectOutput struct {
	*inspectReport
	InUse inUseReport `json:"in-use"`
}

// inUseReport says which of qemu's image locks others hold on the image,
// and who.
type inUseReport struct {
	InUse    bool           `json:"in-use"`
	Held     []string       `json:"held"`     // permissions others hold
	Unshared []string       `json:"unshared"` // permissions others do not share
	Holders  []holderReport `json:"holders"`
}

type holderReport struct {
	PID      int      `json:"pid"`
	Command  string   `json:"command"`
	Domain   string   `json:"domain,omitempty"`
	Held     []string `json:"held"`
	Unshared []string `json:"unshared"`
}

// inUse probes qemu's image locks on f without taking any.
func inUse(f *os.File) (inUseReport, error) {
	u, err := hostblk.ProbeImage(f)
	if err != nil {
		return inUseReport{}, err
	}
	r := inUseReport{InUse: u.InUse(), Held: nonNil(u.Held.Names()), Unshared: nonNil(u.Unshared.Names()), Holders: []holderReport{}}
	for _, h := range u.Holders {
		r.Holders = append(r.Holders, holderReport{PID: h.PID, Command: h.Command, Domain: h.Domain, Held: nonNil(h.Held.Names()), Unshared: nonNil(h.Unshared.Names())})
	}
	return r, nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func printInUse(out io.Writer, r inUseReport) {
	if !r.InUse {
		fmt.Fprintf(out, "in use: no\n")
		return
	}
	who := "another process (not found in /proc)"
	if len(r.Holders) > 0 {
		names := make([]string, len(r.Holders))
		for i, h := range r.Holders {
			names[i] = hostblk.Holder{PID: h.PID, Command: h.Command, Domain: h.Domain}.String()
		}
		who = strings.Join(names, ", ")
	}
	fmt.Fprintf(out, "in use: yes, by %q; held: %s; not shared: %s\n", who, strings.Join(r.Held, ", "), strings.Join(r.Unshared, ", "))
}

// openImageReadOnly opens a regular file or block device that the user named
// (never one an image names) and returns it with its size.
func openImageReadOnly(path string) (*os.File, int64, error) {
	f, err := qcow2.OpenImageFile(path)
	if err != nil {
		return nil, 0, err
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("%s: size: %w", path, err)
	}
	return f, size, nil
}

// printInspectText prints the report for people. Every string that came
// from the image is quoted, so a hostile name cannot inject terminal escapes.
func printInspectText(out io.Writer, rep *inspectReport) {
	w := func(format string, args ...any) { fmt.Fprintf(out, format, args...) }
	w("image: %q\n", rep.Path)
	w("format: %s (as given, not probed)\n", rep.Format)
	w("image size: %s (%d bytes)\n", bytesize.Format(rep.ImageSize), rep.ImageSize)
	if rep.Format == "raw" {
		if rep.DetectedHeader == "" {
			w("leading image header: none\n")
		} else {
			w("leading image header: %s\n", rep.DetectedHeader)
		}
	}
	if q := rep.Qcow2; q != nil {
		w("qcow2 version: %d\n", q.Version)
		w("virtual size: %s (%d bytes)\n", bytesize.Format(q.VirtualSize), q.VirtualSize)
		w("cluster size: %d\n", q.ClusterSize)
		w("refcount bits: %d\n", q.RefcountBits)
		w("compression type: %s\n", q.CompressionType)
		w("extended l2: %t\n", q.ExtendedL2)
		w("lazy refcounts: %t\n", q.LazyRefcounts)
		w("dirty: %t\n", q.Dirty)
		w("snapshots: %d\n", q.Snapshots)
		if q.BackingFile != "" {
			w("backing file: %q\n", q.BackingFile)
			if q.BackingFormat != "" {
				w("backing format: %q\n", q.BackingFormat)
			} else {
				w("backing format: (not recorded)\n")
			}
			if q.BackingResolved != "" {
				w("backing resolves to: %q\n", q.BackingResolved)
			}
		} else {
			w("backing file: none\n")
		}
		if q.DataFile != "" {
			w("external data file: %q\n", q.DataFile)
		}
		if len(q.Extensions) > 0 {
			names := make([]string, len(q.Extensions))
			for i, e := range q.Extensions {
				names[i] = fmt.Sprintf("%s (%s, %d bytes)", e.Type, e.Name, e.Length)
			}
			if more := q.ExtensionCount - len(q.Extensions); more > 0 {
				names = append(names, fmt.Sprintf("and %d more", more))
			}
			w("header extensions: %s\n", strings.Join(names, ", "))
		}
	}
	if rep.Verdict == "accepted" {
		w("verdict: accepted\n")
		return
	}
	w("verdict: refused, %d violation(s):\n", len(rep.Violations))
	for _, v := range rep.Violations {
		w("  - [%s] %s\n", v.Code, strings.ToValidUTF8(v.Message, "\uFFFD"))
	}
}
