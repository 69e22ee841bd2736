package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/volagent/volagent/qcow2"
)

type checkFlags struct {
	json       bool
	forceShare bool
}

func init() {
	var fl checkFlags
	cmd := &cobra.Command{
		GroupID: groupLocal,
		Use:     "check [--json] [--force-share] IMAGE",
		Short:   "Check a qcow2 image's refcounts for leaks and corruption (a read-only qemu-img check)",
		Long: `Check reads the qcow2 image IMAGE, a file or a block device, rebuilds the
reference count of every host cluster from the image's tables (header, L1
and L2 tables, data and compressed clusters, snapshots, refcount table and
blocks, persistent bitmaps) and compares it with the refcounts the image
stores, as qemu-img check does without -r. It also checks the COPIED flags
of the active tables. Findings are counted as qemu counts them:

  corruptions   a cluster has more references than its refcount, a table
                entry is invalid or points outside the image, or a COPIED
                flag is wrong; further writes may destroy data
  leaks         a cluster's refcount exceeds its references; wasted space
  check errors  something could not be examined

IMAGE is held with qemu-img check's reader locks: an image another process
writes (a running guest) is refused, since its refcounts change under the
check; --force-share (-U, as qemu-img's) checks it anyway, with a warning
that the result may be inconsistent.

IMAGE is opened read-only and nothing is ever written. Nothing else is
opened: a backing file the image names is neither opened nor checked. The
header is validated first, as by inspect; an image it refuses is not
walked. The first 100 problems are listed, each with its host offset.

Exit status: 0 no problems found, 3 only leaks found (or the header is
refused, as with inspect), 2 corruptions or check errors found, or a usage
or I/O error. With --json, "verdict" tells the cases apart: clean, leaks,
corrupt or refused.`,
		Example: `  volagent check /dev/vg0/vm1-overlay
  volagent check --json overlay.qcow2
  volagent check overlay.qcow2 || echo "status $?: 3 leaks or refused, 2 corrupt"`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runCheck(cmd.OutOrStdout(), cmd.ErrOrStderr(), args[0], fl)
		},
	}
	cmd.Flags().BoolVar(&fl.json, "json", false, "print the result as JSON")
	cmd.Flags().BoolVarP(&fl.forceShare, "force-share", "U", false, "check IMAGE even while another process writes it (the result may be inconsistent)")
	rootCmd.AddCommand(cmd)
}

// checkReport is what check prints; the JSON field names are stable and
// follow qemu-img check --output=json where it has the same field.
type checkReport struct {
	Path              string         `json:"path"`
	Verdict           string         `json:"verdict"` // clean, leaks, corrupt, refused
	Corruptions       int            `json:"corruptions"`
	Leaks             int            `json:"leaks"`
	CheckErrors       int            `json:"check-errors"`
	ImageEndOffset    int64          `json:"image-end-offset"`
	AllocatedClusters int64          `json:"allocated-clusters"`
	TotalClusters     int64          `json:"total-clusters"`
	Problems          []checkProblem `json:"problems"`
	ProblemsOmitted   int            `json:"problems-omitted"`
	Violations        []violation    `json:"violations,omitempty"` // header refusal only
}

type checkProblem struct {
	Kind       string `json:"kind"` // corruption, leak, check-error
	HostOffset int64  `json:"host-offset"`
	Cluster    int64  `json:"cluster"`
	Message    string `json:"message"`
}

func runCheck(out, warn io.Writer, path string, fl checkFlags) error {
	f, size, err := openImageReadOnly(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := lockForReading(f, path, fl.forceShare, warn); err != nil {
		return err
	}

	rep := &checkReport{Path: path, Problems: []checkProblem{}}
	res, err := qcow2.Check(f, size)
	switch {
	case err != nil && !qcow2.IsRefusal(err):
		return fmt.Errorf("%s: %w", path, err) // I/O error: no verdict
	case err != nil:
		rep.Verdict = "refused"
		for _, v := range qcow2.Violations(err) {
			rep.Violations = append(rep.Violations, violation{Code: v.Code(), Field: v.Field, Value: fmt.Sprint(v.Value), Message: v.Error()})
		}
	default:
		rep.Corruptions, rep.Leaks, rep.CheckErrors = res.Corruptions, res.Leaks, res.CheckErrors
		rep.ImageEndOffset, rep.AllocatedClusters, rep.TotalClusters = res.ImageEndOffset, res.AllocatedClusters, res.TotalClusters
		rep.ProblemsOmitted = res.ProblemsOmitted
		for _, p := range res.Problems {
			rep.Problems = append(rep.Problems, checkProblem{Kind: string(p.Kind), HostOffset: p.HostOffset, Cluster: p.Cluster, Message: p.Message})
		}
		switch {
		case res.Corruptions > 0 || res.CheckErrors > 0:
			rep.Verdict = "corrupt"
		case res.Leaks > 0:
			rep.Verdict = "leaks"
		default:
			rep.Verdict = "clean"
		}
	}

	if fl.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		printCheckText(out, rep)
	}

	switch rep.Verdict {
	case "refused":
		return refused(fmt.Errorf("%s: refused with %d violation(s); the tables were not checked", path, len(rep.Violations)))
	case "corrupt":
		return &exitError{code: exitFailure, err: fmt.Errorf("%s: %d corruption(s), %d check error(s), %d leak(s)", path, rep.Corruptions, rep.CheckErrors, rep.Leaks)}
	case "leaks":
		return &exitError{code: exitRefused, err: fmt.Errorf("%s: %d leaked cluster(s)", path, rep.Leaks)}
	}
	return nil
}

// printCheckText prints the result in qemu-img check's words. Problem
// messages hold numbers and %q-quoted names only, so an image cannot
// inject terminal escapes.
func printCheckText(out io.Writer, rep *checkReport) {
	w := func(format string, args ...any) { fmt.Fprintf(out, format, args...) }
	if rep.Verdict == "refused" {
		w("image: %q\n", rep.Path)
		w("verdict: refused, %d violation(s); the tables were not checked:\n", len(rep.Violations))
		for _, v := range rep.Violations {
			w("  - [%s] %s\n", v.Code, strings.ToValidUTF8(v.Message, "\uFFFD"))
		}
		return
	}
	for _, p := range rep.Problems {
		label := map[string]string{"corruption": "ERROR", "leak": "Leaked", "check-error": "CHECK ERROR"}[p.Kind]
		w("%s: %s\n", label, strings.ToValidUTF8(p.Message, "\uFFFD"))
	}
	if rep.ProblemsOmitted > 0 {
		w("... and %d more problem(s) not listed\n", rep.ProblemsOmitted)
	}
	if len(rep.Problems) > 0 {
		w("\n")
	}
	if rep.Corruptions == 0 && rep.Leaks == 0 && rep.CheckErrors == 0 {
		w("No errors were found on the image.\n")
	}
	if rep.Corruptions > 0 {
		w("%d errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", rep.Corruptions)
	}
	if rep.Leaks > 0 {
		if rep.Corruptions > 0 {
			w("\n")
		}
		w("%d leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", rep.Leaks)
	}
	if rep.CheckErrors > 0 {
		w("\n%d internal errors have occurred during the check.\n", rep.CheckErrors)
	}
	if rep.TotalClusters > 0 {
		w("%d/%d = %.2f%% allocated clusters\n", rep.AllocatedClusters, rep.TotalClusters,
			100*float64(rep.AllocatedClusters)/float64(rep.TotalClusters))
	}
	w("Image end offset: %d\n", rep.ImageEndOffset)
}
