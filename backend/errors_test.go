package backend

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// TestKind: the kind of an error is its outermost one, even when its
// wrapped cause carries another kind one call down.
func TestKind(t *testing.T) {
	inner := fmt.Errorf("%w: volume %q: %w", ErrBusy, "v", context.Canceled)
	for _, c := range []struct {
		err  error
		want error
	}{
		{nil, nil},
		{errors.New("plain"), nil},
		{ErrNoSpace, ErrNoSpace},
		{inner, ErrBusy},
		{fmt.Errorf("%w: pool %q: %w", ErrFailed, "p", inner), ErrFailed},
		{fmt.Errorf("context: %w", fmt.Errorf("%w: %w", ErrPolicyViolation, inner)), ErrPolicyViolation},
		{errors.Join(errors.New("plain"), inner), ErrBusy},
	} {
		if got := Kind(c.err); got != c.want {
			t.Errorf("Kind(%v) = %v, want %v", c.err, got, c.want)
		}
	}
	if err := fmt.Errorf("%w: pool %q: %w", ErrFailed, "p", inner); !errors.Is(err, context.Canceled) || !errors.Is(err, ErrBusy) {
		t.Errorf("%v lost its cause", err)
	}
}

// TestRefusalKeepsViolation: a CreateOverlay refused by policy is a
// PolicyViolation that still carries the qcow2 violations, so a caller
// can match the sentinel and read the codes.
func TestRefusalKeepsViolation(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	e := newEnv(t, PoolLoop, PolicyEnforce)
	m := e.manager()
	data := filepath.Join(e.roots, "external.raw")
	writeFile(t, data, 1<<20, nil)
	withDataFile := filepath.Join(e.roots, "datafile.qcow2")
	testutil.MakeQcow2(t, withDataFile, "data_file="+data, "1M", "", "")

	_, err := m.CreateOverlay(context.Background(), Caller{}, OverlayRequest{Pool: "p", Name: "df", BackingPath: withDataFile, BackingFormat: "qcow2"})
	mustErrIs(t, err, ErrPolicyViolation)
	if !errors.Is(err, qcow2.ErrDataFile) {
		t.Fatalf("refusal %v does not match qcow2.ErrDataFile", err)
	}
	var codes []string
	for _, v := range qcow2.Violations(err) {
		codes = append(codes, v.Code())
	}
	if !slices.Contains(codes, "data-file") {
		t.Fatalf("violation codes of %v = %v, want data-file among them", err, codes)
	}
}
