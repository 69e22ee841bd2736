package virt

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
)

// requestPoolEnv is a watcher over one request pool with a fake backend,
// driven by direct scans (no goroutine, no libvirt), so each step is
// finished when the call returns.
type requestPoolEnv struct {
	w       *RequestWatcher
	fake    *fakeVolumes
	pool    string
	dir     string // the pool's request directory
	base    string // a raw backing under the roots
	outside string // a raw file outside the roots
}

func newRequestPoolEnv(t *testing.T) *requestPoolEnv {
	t.Helper()
	testutil.RequireRoot(t)
	dir := looptest.Dir(t, "volagent-requestpool-")
	if err := os.Chmod(dir, 0o755); err != nil { // as /var/lib is
		t.Fatal(err)
	}
	roots := filepath.Join(dir, "images")
	if err := os.Mkdir(roots, 0o755); err != nil {
		t.Fatal(err)
	}
	e := &requestPoolEnv{pool: testutil.TestDomainPrefix + "rp", base: filepath.Join(roots, "base.raw"), outside: filepath.Join(dir, "outside.raw")}
	testutil.QemuImg(t, "create", "-q", "-f", "raw", e.base, "16M")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", e.outside, "16M")
	e.fake = &fakeVolumes{roots: []string{roots}, volumes: map[string]backend.VolumeInfo{}}
	e.w = NewRequestWatcher(e.fake, RequestWatcherOptions{Pools: []string{e.pool}, BaseDir: filepath.Join(dir, "var", "requests"), Logger: testLogger(t)})
	if err := e.w.prepare(); err != nil {
		t.Fatal(err)
	}
	e.dir = e.w.Dir(e.pool)
	return e
}

// request writes what `virsh vol-create` writes: a qcow2 over backing.
func (e *requestPoolEnv) request(t *testing.T, name, backing string) string {
	t.Helper()
	path := filepath.Join(e.dir, name)
	testutil.MakeQcow2(t, path, "", "16M", backing, "raw")
	return path
}

func (e *requestPoolEnv) scan() { e.w.scan(context.Background(), e.pool) }

func isLinkTo(path, target string) bool {
	fi, err := os.Lstat(path)
	return err == nil && fi.Mode()&os.ModeSymlink != 0 && linkTarget(path) == target
}

// TestRequestOwnVolume: a request makes its own volume or is refused. "vm1"
// after "vm1.qcow2" (one volume name), and a request named after a volume
// a D-Bus client made, are refused and linked to nothing; the volumes
// stay as they were.
func TestRequestOwnVolume(t *testing.T) {
	e := newRequestPoolEnv(t)
	first := e.request(t, "vm1.qcow2", e.base)
	e.scan()
	if !isLinkTo(first, "/dev/fake-vm1") {
		t.Fatalf("vm1.qcow2 not linked to its new volume: %q", linkTarget(first))
	}
	other := backend.VolumeInfo{ID: backend.VolumeID(e.pool, "dbus"), Name: "dbus", Pool: e.pool, Format: "qcow2", DevicePath: "/dev/fake-dbus", BackingName: e.base, BackingFormat: "raw"}
	e.fake.volumes[other.ID] = other
	second := e.request(t, "vm1", e.base)
	third := e.request(t, "dbus.qcow2", e.base)
	e.scan()
	for _, path := range []string{second, third} {
		if _, err := os.Lstat(path); err == nil {
			t.Errorf("%s is still in place (target %q): neither made nor refused", path, linkTarget(path))
		}
		reason, err := os.ReadFile(path + ReasonSuffix)
		if err != nil || !strings.Contains(string(reason), "did not make") {
			t.Errorf("%s: reason %q, %v", path, reason, err)
		}
		if _, err := os.Stat(path + RefusedSuffix); err != nil {
			t.Errorf("%s not renamed to %s: %v", path, RefusedSuffix, err)
		}
	}
	if creates, _, violations := e.fake.counts(); creates != 1 || len(violations) != 2 {
		t.Fatalf("creates %d, violations %q; want 1 and 2", creates, violations)
	}
	if !isLinkTo(first, "/dev/fake-vm1") {
		t.Fatalf("vm1.qcow2 is no longer the link to its volume: %q", linkTarget(first))
	}
}

// TestRequestLongName: a request whose name leaves no room for
// ".refused.reason" is refused once, under a short name, with a reason
// that names it in full; later scans neither find it again nor signal
// it again.
func TestRequestLongName(t *testing.T) {
	e := newRequestPoolEnv(t)
	name := strings.Repeat("é", 120) + "-vm.qcow2" // 249 bytes
	path := e.request(t, name, e.outside)
	e.scan()
	e.scan()
	e.scan()
	if _, err := os.Lstat(path); err == nil {
		t.Fatal("the request is still in place")
	}
	entries, err := os.ReadDir(e.dir)
	if err != nil {
		t.Fatal(err)
	}
	var refused, reasons []string
	for _, ent := range entries {
		switch n := ent.Name(); {
		case strings.HasSuffix(n, ReasonSuffix):
			reasons = append(reasons, n)
		case strings.HasSuffix(n, RefusedSuffix):
			refused = append(refused, n)
		default:
			t.Errorf("unexpected entry %q", n)
		}
	}
	if len(refused) != 1 || len(reasons) != 1 || strings.TrimSuffix(reasons[0], ReasonSuffix) != strings.TrimSuffix(refused[0], RefusedSuffix) {
		t.Fatalf("refused %q, reasons %q", refused, reasons)
	}
	reason, _ := os.ReadFile(filepath.Join(e.dir, reasons[0]))
	if !strings.Contains(string(reason), name) || !strings.Contains(string(reason), e.outside) {
		t.Fatalf("reason %q does not name the request and the backing", reason)
	}
	if _, _, violations := e.fake.counts(); len(violations) != 1 {
		t.Fatalf("violations %q: want the refusal signalled once", violations)
	}
}

// TestRequestDirsTraversable: with volagent's umask (0077), the request
// directories and the parents the watcher made are 0711: another user
// (qemu's) reaches a file in a pool's directory by its name, and lists
// nothing.
func TestRequestDirsTraversable(t *testing.T) {
	testutil.RequireTool(t, "setpriv")
	old := syscall.Umask(0o077)
	e := newRequestPoolEnv(t)
	syscall.Umask(old)
	base := e.w.opts.BaseDir
	for _, d := range []string{filepath.Dir(base), base, e.dir} {
		fi, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != RequestDirMode {
			t.Errorf("%s: mode %#o, want %#o", d, fi.Mode().Perm(), RequestDirMode)
		}
	}
	target := filepath.Join(e.dir, "disk")
	if err := os.WriteFile(target, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	asNobody := func(args ...string) error {
		return exec.Command("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups"}, args...)...).Run()
	}
	if err := asNobody("cat", target); err != nil {
		t.Fatalf("another user cannot open %s: %v", target, err)
	}
	if err := asNobody("ls", e.dir); err == nil {
		t.Fatalf("another user can list %s", e.dir)
	}
	// A directory an older volagent made 0700 is fixed at the next start.
	if err := os.Chmod(e.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := e.w.prepare(); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(e.dir); fi.Mode().Perm() != RequestDirMode {
		t.Fatalf("%s stays %#o", e.dir, fi.Mode().Perm())
	}
}
