package dbusapi

import (
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// TestPolicyViolationCodes: a caller refused for a policy reason gets the
// violations' codes at the end of the message, as godbus, busctl and gdbus
// clients see it, and ViolationCodes reads them.
func TestPolicyViolationCodes(t *testing.T) {
	testutil.RequireTool(t, "busctl", "gdbus")
	h := startServer(t, false)
	refusal := &qcow2.ValidationError{Violations: []*qcow2.FieldError{
		{Field: "data_file", Value: "/dev/sda", Reason: "refused", Err: qcow2.ErrDataFile},
		{Field: "backing_file", Value: "nbd://x", Reason: "a protocol", Err: qcow2.ErrBackingName},
		{Field: "backing_file", Value: "json:{}", Reason: "json:", Err: qcow2.ErrBackingName},
	}}
	h.fake.mu.Lock()
	h.fake.failWith = fmt.Errorf("%w: pool %q (policy enforce): backing %q: %w", backend.ErrPolicyViolation, "fast", "/b.qcow2", refusal)
	h.fake.mu.Unlock()
	want := []string{"data-file", "backing-name"}

	err := h.call(ManagerPath, ManagerIface+".Rescan", noOptions()).Err
	wantError(t, err, ErrorPolicyViolation, "external data file refused")
	var de dbus.Error
	if !errors.As(err, &de) {
		t.Fatalf("%T %v is not a dbus.Error", err, err)
	}
	// One string, as GDBus and sd-bus require of an error body.
	if len(de.Body) != 1 {
		t.Fatalf("error body %#v, want (s)", de.Body)
	}
	if msg, _ := de.Body[0].(string); !strings.HasSuffix(msg, " [codes: data-file,backing-name]") {
		t.Fatalf("message %q does not end with the codes", msg)
	}
	if got := ViolationCodes(err); !slices.Equal(got, want) {
		t.Fatalf("ViolationCodes = %q, want %q", got, want)
	}

	// busctl and gdbus show the message; the codes are in it.
	_, errOut, berr := h.bus.Busctl(t, 0, "call", BusName, string(ManagerPath), ManagerIface, "Rescan", "a{sv}", "0")
	if berr == nil || !strings.Contains(errOut, "[codes: data-file,backing-name]") {
		t.Fatalf("busctl: %v, stderr %q", berr, errOut)
	}
	out, gerr := exec.Command("gdbus", "call", "--address", h.bus.Address, "--dest", BusName,
		"--object-path", string(ManagerPath), "--method", ManagerIface+".Rescan", "@a{sv} {}").CombinedOutput()
	if gerr == nil || !strings.Contains(string(out), ErrorPolicyViolation) || !strings.Contains(string(out), "[codes: data-file,backing-name]") {
		t.Fatalf("gdbus: %v, output %q", gerr, out)
	}

	// A policy refusal with no image violation: no suffix.
	h.fake.mu.Lock()
	h.fake.failWith = fmt.Errorf("%w: volume %q is used by a running domain", backend.ErrPolicyViolation, "v")
	h.fake.mu.Unlock()
	err = h.call(ManagerPath, ManagerIface+".Rescan", noOptions()).Err
	wantError(t, err, ErrorPolicyViolation, "running domain")
	if strings.Contains(err.Error(), "[codes:") || ViolationCodes(err) != nil {
		t.Fatalf("error %q names codes", err)
	}

	// Other kinds keep their one-string body, even over a refusal cause.
	h.fake.mu.Lock()
	h.fake.failWith = fmt.Errorf("%w: volume %q: %w", backend.ErrFailed, "v", refusal)
	h.fake.mu.Unlock()
	err = h.call(ManagerPath, ManagerIface+".Rescan", noOptions()).Err
	wantError(t, err, ErrorFailed, "external data file refused")
	if ViolationCodes(err) != nil {
		t.Fatalf("ViolationCodes of a Failed = %q", ViolationCodes(err))
	}
}
