// Package testutil holds helpers shared by volagent's tests: checks for the
// privileges and tools a test needs (which fail loudly instead of skipping),
// and runners for the qemu tools that judge volagent's images.
package testutil

import (
	"bytes"
	"os"
	"os/exec"
	"testing"
)

// RequireRoot fails the test unless it runs as root. Tests that touch loop
// devices or LVM need it; a skip would hide untested behaviour in CI.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("this test needs root (loop devices, LVM); run it as root, as `make test` does in CI")
	}
}

// RequireTool fails the test unless every named command is on PATH.
func RequireTool(t testing.TB, names ...string) {
	t.Helper()
	for _, name := range names {
		if _, err := exec.LookPath(name); err != nil {
			t.Fatalf("this test needs %q on PATH; run scripts/install-deps.sh (make test does)", name)
		}
	}
}

// Run runs a command and fails the test if it exits non-zero; it returns stdout.
func Run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %q: %v\nstderr: %s", name, args, err, stderr.String())
	}
	return stdout.Bytes()
}
