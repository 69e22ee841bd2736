// Package dbustest starts private D-Bus system buses for tests: a
// dbus-daemon with the standard system bus rules and the project's real
// bus policy file, so that tests see what a host would enforce.
package dbustest

import (
	"bufio"
	"bytes"
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
)

// Options say which policies the bus enforces.
type Options struct {
	// Policies are bus policy files, copied unmodified into the bus's
	// system.d directory (e.g. packaging/dbus/org.volagent.VolAgent1.conf).
	Policies []string
	// AllowAll adds a mandatory policy that lets everyone own and call
	// org.volagent.VolAgent1, so that a test can reach the daemon's own
	// authorization check past the bus policy.
	AllowAll bool
}

// Bus is a running private bus.
type Bus struct {
	Address string // unix:path=...
	Dir     string // world-readable, holds the socket and configuration
}

// busConfigTemplate is the private bus's configuration, shared with the
// shell scripts; @SOCKET@ and @POLICY_DIR@ are filled in by Start.
//
//go:embed system-bus.conf.in
var busConfigTemplate string

const allowAllPolicy = `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy context="mandatory">
    <allow own="org.volagent.VolAgent1"/>
    <allow send_destination="org.volagent.VolAgent1"/>
  </policy>
</busconfig>
`

// Start starts a dbus-daemon and stops it (and removes its directory) in
// t.Cleanup, also when the test fails.
func Start(t testing.TB, opts Options) *Bus {
	t.Helper()
	if _, err := exec.LookPath("dbus-daemon"); err != nil {
		t.Fatalf("this test needs dbus-daemon on PATH (apt-get install dbus-daemon)")
	}
	dir, err := os.MkdirTemp("", "volagent-bus-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// Non-root test callers (setpriv) must reach the socket.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	policyDir := filepath.Join(dir, "system.d")
	if err := os.Mkdir(policyDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range opts.Policies {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatalf("bus policy: %v", err)
		}
		if err := os.WriteFile(filepath.Join(policyDir, filepath.Base(p)), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if opts.AllowAll {
		if err := os.WriteFile(filepath.Join(policyDir, "zz-test-allow-all.conf"), []byte(allowAllPolicy), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	socket := filepath.Join(dir, "bus")
	config := filepath.Join(dir, "bus.conf")
	busConfig := strings.NewReplacer("@SOCKET@", socket, "@POLICY_DIR@", policyDir).Replace(busConfigTemplate)
	if err := os.WriteFile(config, []byte(busConfig), 0o644); err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command("dbus-daemon", "--config-file="+config, "--nofork", "--nopidfile", "--nosyslog", "--print-address=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting dbus-daemon: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	select {
	case addr := <-line:
		if addr == "" {
			<-exited
			t.Fatalf("dbus-daemon did not start: %s", stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("dbus-daemon did not print its address in 10s: %s", stderr.String())
	}
	return &Bus{Address: "unix:path=" + socket, Dir: dir}
}

// NobodyUID is the unprivileged user tests call as.
const NobodyUID = 65534

// Busctl runs busctl on the bus as uid (0 or another, through setpriv) and
// returns its standard output and error, and its error.
func (b *Bus) Busctl(t testing.TB, uid int, args ...string) (string, string, error) {
	t.Helper()
	argv := append([]string{"busctl", "--address=" + b.Address}, args...)
	if uid != 0 {
		if _, err := exec.LookPath("setpriv"); err != nil {
			t.Fatalf("this test needs setpriv on PATH (util-linux)")
		}
		argv = append([]string{"setpriv", fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", uid), "--clear-groups"}, argv...)
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// MustBusctl is Busctl as root, failing the test on an error.
func (b *Bus) MustBusctl(t testing.TB, args ...string) string {
	t.Helper()
	out, errOut, err := b.Busctl(t, 0, args...)
	if err != nil {
		t.Fatalf("busctl %q: %v\n%s", args, err, errOut)
	}
	return out
}

// Connect connects to the bus as the test's user (root in the tests that
// start a daemon); the connection is closed when the test ends.
func (b *Bus) Connect(t testing.TB) *dbus.Conn {
	t.Helper()
	conn, err := dbus.Connect(b.Address)
	if err != nil {
		t.Fatalf("connecting to the private bus %s: %v", b.Address, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}
