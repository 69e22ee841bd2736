package main

import (
	"bytes"
	"debug/elf"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// builtBinary is a binary built once per test run.
type builtBinary struct {
	once sync.Once
	path string
	err  error
}

var (
	// The volagent command, built as it ships: static, without cgo.
	volagentBinary builtBinary
	// The daemon, which links libvirt.
	daemonBinary builtBinary
	builtDir     string
)

// TestMain removes the binaries built for the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if builtDir != "" {
		os.RemoveAll(builtDir)
	}
	os.Exit(code)
}

var builtDirOnce sync.Once

func (b *builtBinary) build(t testing.TB, name, pkg string, cgo bool) string {
	t.Helper()
	b.once.Do(func() {
		builtDirOnce.Do(func() { builtDir, b.err = os.MkdirTemp("", "volagent-bin-") })
		if b.err != nil {
			return
		}
		b.path = filepath.Join(builtDir, name)
		cmd := exec.Command("go", "build", "-o", b.path, pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if cgo {
			cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = errors.New(string(out))
		}
	})
	if b.err != nil {
		t.Fatalf("building %s: %v", name, b.err)
	}
	return b.path
}

// binaryUnderTest builds the volagent binary once per test run, as it
// ships (CGO_ENABLED=0), so the tests exercise the real command line,
// exit status and process boundary.
func binaryUnderTest(t testing.TB) string {
	t.Helper()
	return volagentBinary.build(t, "volagent", ".", false)
}

// daemonUnderTest builds the volagentd daemon once per test run.
func daemonUnderTest(t testing.TB) string {
	t.Helper()
	return daemonBinary.build(t, "volagentd", "../volagentd", true)
}

// runVolagent runs the volagent binary and returns stdout, stderr and the
// exit status.
func runVolagent(t testing.TB, args ...string) (string, string, int) {
	t.Helper()
	return runBinary(t, binaryUnderTest(t), args...)
}

// runDaemon runs the volagentd binary the same way.
func runDaemon(t testing.TB, args ...string) (string, string, int) {
	t.Helper()
	return runBinary(t, daemonUnderTest(t), args...)
}

func runBinary(t testing.TB, path string, args ...string) (string, string, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return stdout.String(), stderr.String(), 0
	case errors.As(err, &exit):
		return stdout.String(), stderr.String(), exit.ExitCode()
	}
	t.Fatalf("running %s %q: %v", filepath.Base(path), args, err)
	return "", "", -1
}

// TestVolagentIsStaticWithoutLibvirt: the volagent command (the hook runs
// it at every domain start) links no libvirt package and no shared library
// at all, so it starts without loading libvirt and its ~57 libraries.
func TestVolagentIsStaticWithoutLibvirt(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "libvirt") {
			t.Errorf("volagent depends on %s", dep)
		}
	}
	f, err := elf.Open(binaryUnderTest(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("volagent has a %v program header: it is not statically linked", p.Type)
		}
	}
	if libs, err := f.ImportedLibraries(); err == nil && len(libs) > 0 {
		t.Errorf("volagent needs shared libraries %q", libs)
	}
}

// TestDaemonLinksLibvirt: the libvirt integration lives in volagentd.
func TestDaemonLinksLibvirt(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "../volagentd").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	if !strings.Contains(string(out), "libvirt.org/go/libvirt\n") {
		t.Errorf("volagentd does not link libvirt.org/go/libvirt")
	}
}
