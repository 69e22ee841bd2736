package backend

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// TestChainRefusalsAgree runs one table of chains against both users of
// qcow2.WalkChain, the reader (qcow2.OpenChain) and the domain policy
// (CheckDomain): each must refuse exactly the loops and the chains deeper
// than qcow2.MaxChainDepth, and accept a chain of exactly that depth.
func TestChainRefusalsAgree(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", base, "1M")

	// chainOf builds a chain of n images, top first, ending in base.raw:
	// n-1 qcow2 images over the raw one.
	chainOf := func(name string, n int) string {
		below, belowFmt := base, "raw"
		for i := n - 1; i >= 1; i-- {
			p := filepath.Join(dir, fmt.Sprintf("%s-%02d.qcow2", name, i))
			testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-b", below, "-F", belowFmt, p, "1M")
			below, belowFmt = p, "qcow2"
		}
		return below
	}
	self := filepath.Join(dir, "self.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", self, "1M")
	testutil.QemuImg(t, "rebase", "-q", "-f", "qcow2", "-u", "-b", "self.qcow2", "-F", "qcow2", self)
	loopA, loopB := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", loopA, "1M")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-b", loopA, "-F", "qcow2", loopB, "1M")
	testutil.QemuImg(t, "rebase", "-q", "-f", "qcow2", "-u", "-b", loopB, "-F", "qcow2", loopA)
	// A loop below a good start: top -> a -> b -> a.
	intoLoop := filepath.Join(dir, "into-loop.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-b", loopA, "-F", "qcow2", intoLoop, "1M")

	cases := []struct {
		name    string
		top     string
		refused bool
		why     string // in the refusal of both
	}{
		{"a chain of exactly the depth limit", chainOf("max", qcow2.MaxChainDepth), false, ""},
		{"one image deeper than the limit", chainOf("deep", qcow2.MaxChainDepth+1), true, fmt.Sprintf("at most %d images", qcow2.MaxChainDepth)},
		{"an image that is its own backing", self, true, "the chain loops"},
		{"two images backing each other", loopA, true, "the chain loops"},
		{"a loop below the top", intoLoop, true, "the chain loops"},
	}
	gate := &qcow2.Gate{AllowedRoots: []string{dir}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, err := qcow2.OpenChain(tc.top, "qcow2", gate)
			if err == nil {
				d.Close()
			}
			if got := errors.Is(err, qcow2.ErrChain); got != tc.refused || (!tc.refused && err != nil) {
				t.Errorf("OpenChain: %v; want a chain refusal: %v", err, tc.refused)
			}
			if tc.refused && err != nil && !strings.Contains(err.Error(), tc.why) {
				t.Errorf("OpenChain: %v; want it to say %q", err, tc.why)
			}

			rep, err := CheckDomain(domainXMLFor("chains", domainDisk{target: "vda", driverType: "qcow2", source: tc.top}), DomainPolicyOptions{AllowedRoots: []string{dir}})
			if err != nil {
				t.Fatal(err)
			}
			want := ""
			if tc.refused {
				want = CodeChain
			}
			if got := strings.Join(violationCodes(rep), ","); got != want {
				t.Errorf("CheckDomain violations %q, want %q: %+v", got, want, rep.Violations)
			}
			if tc.refused && len(rep.Violations) > 0 && !strings.Contains(rep.Violations[0].Message, tc.why) {
				t.Errorf("CheckDomain: %q; want it to say %q", rep.Violations[0].Message, tc.why)
			}
			if !tc.refused && len(rep.Disks[0].Chain) != qcow2.MaxChainDepth {
				t.Errorf("CheckDomain walked %d images, want %d", len(rep.Disks[0].Chain), qcow2.MaxChainDepth)
			}
		})
	}
}
