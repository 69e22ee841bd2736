package testutil

// A libvirt daemon for tests. Debian 12's libvirt-daemon package ships no
// configuration and this machine has no systemd as PID 1, so the harness
// brings what libvirtd needs: the libvirt-qemu user and group the QEMU
// driver was built for (it refuses to start without them, whatever
// qemu.conf says), a qemu.conf that runs qemu as root:root without
// cgroups, virtlogd or a security driver, and the hook scripts, which
// libvirtd reads only when it starts.
//
// One libvirtd serves the whole host (/run/libvirt/libvirt-sock), and the
// test binaries of several packages run at once, so every user takes an
// exclusive lock (flock on libvirtdLockPath) for as long as it uses the
// daemon; the lock dies with the process, and a daemon a killed test run
// left behind (known by its pid file) is stopped by the next one.

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// LibvirtURI is the connection URI of the daemon the harness starts.
	LibvirtURI = "qemu:///system"

	libvirtdLockPath = "/run/volagent-test-libvirtd.lock"
	libvirtdPIDPath  = "/run/volagent-test-libvirtd.pid"
	libvirtQemuConf  = "/etc/libvirt/qemu.conf"
	libvirtHooksDir  = "/etc/libvirt/hooks"
	// QemuHooksDir is where libvirt looks for qemu hook scripts.
	QemuHooksDir = libvirtHooksDir + "/qemu.d"
	// TestDomainPrefix names every domain tests define, so the harness can
	// destroy what a failed test left before it stops the daemon.
	TestDomainPrefix = "volagent-test-"
)

// testQemuConf runs qemu as root (test images live in root-owned temporary
// directories) without the pieces this host lacks: cgroup delegation,
// virtlogd, AppArmor/SELinux.
const testQemuConf = `# Written by volagent's test harness (internal/testutil/libvirtd.go); the
# previous content is restored when the tests stop libvirtd.
user = "root"
group = "root"
dynamic_ownership = 0
cgroup_controllers = [ ]
security_driver = "none"
stdio_handler = "file"
`

// debianQemuConf runs qemu as Debian's libvirt does: as libvirt-qemu, with
// libvirt changing the owner of each disk's file or device to it while the
// domain runs (dynamic ownership), and never of the directories on the
// way.
const debianQemuConf = `# Written by volagent's test harness (internal/testutil/libvirtd.go); the
# previous content is restored when the tests stop libvirtd.
user = "libvirt-qemu"
group = "libvirt-qemu"
dynamic_ownership = 1
cgroup_controllers = [ ]
security_driver = "none"
stdio_handler = "file"
`

// LibvirtdOptions say what the daemon starts with.
type LibvirtdOptions struct {
	// QemuAsLibvirtQemu runs qemu as Debian does (user and group
	// libvirt-qemu, dynamic_ownership = 1) instead of as root. /dev/kvm
	// is root's here: such domains use TCG (TCGDomainXML).
	QemuAsLibvirtQemu bool
	// Hooks are qemu hook scripts to install, by file name, in
	// /etc/libvirt/hooks/qemu.d before the daemon starts; they are removed
	// when it stops.
	Hooks map[string]string
}

// Libvirtd is a libvirt daemon started by the tests.
type Libvirtd struct {
	t       testing.TB
	opts    LibvirtdOptions
	dir     string // logs and configuration
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{}
	lock    *os.File
	undo    []func() // restores the host, last first
}

// StartLibvirtd takes the host's libvirtd lock, installs opts.Hooks and the
// test configuration, starts libvirtd and waits until it answers. Everything
// is undone in t.Cleanup, also when the test fails: test domains are
// destroyed, the daemon stopped, the hooks removed, qemu.conf restored, the
// lock released. It fails the test if a libvirtd the harness did not start
// is running (the tests must restart it to load their hooks).
func StartLibvirtd(t testing.TB, opts LibvirtdOptions) *Libvirtd {
	t.Helper()
	RequireRoot(t)
	RequireTool(t, "libvirtd", "virsh", "qemu-system-x86_64")
	d := &Libvirtd{t: t, opts: opts, dir: t.TempDir()}
	d.logPath = filepath.Join(d.dir, "libvirtd.log")
	t.Cleanup(d.cleanup)
	d.takeLock()
	d.stopLeftover()
	if pids := pidsOf("libvirtd"); len(pids) > 0 {
		t.Fatalf("a libvirtd not started by the tests is running (pid %v); stop it first: the tests restart libvirtd to load their hooks", pids)
	}
	if err := ensureLibvirtQemuUser(); err != nil {
		t.Fatal(err)
	}
	d.installQemuConf()
	d.installHooks()
	d.start()
	return d
}

// Log returns the daemon's log so far, for failure messages.
func (d *Libvirtd) Log() string {
	b, _ := os.ReadFile(d.logPath)
	return string(b)
}

// Restart stops the daemon (running domains keep running) and starts it
// again with the same hooks and configuration.
func (d *Libvirtd) Restart() {
	d.t.Helper()
	d.stop()
	d.start()
}

// Stop stops the daemon; Start starts it again.
func (d *Libvirtd) Stop() { d.t.Helper(); d.stop() }

// Start starts a stopped daemon.
func (d *Libvirtd) Start() { d.t.Helper(); d.start() }

// Virsh runs virsh on the test daemon and returns stdout, stderr and
// the error.
func Virsh(args ...string) (string, string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("virsh", append([]string{"-c", LibvirtURI}, args...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// MustVirsh runs virsh and fails the test if it fails.
func MustVirsh(t testing.TB, args ...string) string {
	t.Helper()
	out, errOut, err := Virsh(args...)
	if err != nil {
		t.Fatalf("virsh %q: %v\n%s", args, err, errOut)
	}
	return out
}

func (d *Libvirtd) takeLock() {
	f, err := os.OpenFile(libvirtdLockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		d.t.Fatalf("libvirtd lock: %v", err)
	}
	deadline := time.Now().Add(5 * time.Minute)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if err != unix.EWOULDBLOCK || time.Now().After(deadline) {
			f.Close()
			d.t.Fatalf("libvirtd lock %s: %v (another test binary uses libvirtd)", libvirtdLockPath, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	d.lock = f
}

// stopLeftover stops a daemon that a killed test run started.
func (d *Libvirtd) stopLeftover() {
	b, err := os.ReadFile(libvirtdPIDPath)
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err == nil && pid > 1 && processName(pid) == "libvirtd" {
		d.t.Logf("stopping libvirtd %d left by an earlier test run", pid)
		_ = syscall.Kill(pid, syscall.SIGTERM)
		waitGone(pid, 15*time.Second)
	}
	os.Remove(libvirtdPIDPath)
}

// ensureLibvirtQemuUser creates the libvirt-qemu user and group (what
// Debian's libvirt-daemon-system would) if they are missing: the QEMU
// driver looks them up at start-up even when qemu.conf names another user.
func ensureLibvirtQemuUser() error {
	if _, err := user.LookupGroup("libvirt-qemu"); err != nil {
		if out, err := exec.Command("groupadd", "--system", "libvirt-qemu").CombinedOutput(); err != nil {
			return fmt.Errorf("groupadd libvirt-qemu: %v: %s", err, out)
		}
	}
	if _, err := user.Lookup("libvirt-qemu"); err != nil {
		out, err := exec.Command("useradd", "--system", "--no-create-home", "--home-dir", "/var/lib/libvirt",
			"--shell", "/usr/sbin/nologin", "--gid", "libvirt-qemu", "libvirt-qemu").CombinedOutput()
		if err != nil {
			return fmt.Errorf("useradd libvirt-qemu: %v: %s", err, out)
		}
	}
	return os.MkdirAll("/var/log/libvirt/qemu", 0o755)
}

func (d *Libvirtd) installQemuConf() {
	old, err := os.ReadFile(libvirtQemuConf)
	existed := err == nil
	if err != nil && !os.IsNotExist(err) {
		d.t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(libvirtQemuConf), 0o755); err != nil {
		d.t.Fatal(err)
	}
	conf := testQemuConf
	if d.opts.QemuAsLibvirtQemu {
		conf = debianQemuConf
	}
	if err := os.WriteFile(libvirtQemuConf, []byte(conf), 0o644); err != nil {
		d.t.Fatal(err)
	}
	d.undo = append(d.undo, func() {
		if existed && !bytes.Equal(old, []byte(testQemuConf)) && !bytes.Equal(old, []byte(debianQemuConf)) {
			_ = os.WriteFile(libvirtQemuConf, old, 0o644)
		} else if !existed {
			_ = os.Remove(libvirtQemuConf)
		}
	})
}

func (d *Libvirtd) installHooks() {
	if len(d.opts.Hooks) == 0 {
		return
	}
	for _, dir := range []string{libvirtHooksDir, QemuHooksDir} {
		if _, err := os.Stat(dir); os.IsNotExist(err) {
			if err := os.Mkdir(dir, 0o755); err != nil {
				d.t.Fatal(err)
			}
			d.undo = append(d.undo, func() { _ = os.Remove(dir) }) // only if empty
		}
	}
	for name, script := range d.opts.Hooks {
		path := filepath.Join(QemuHooksDir, name)
		if _, err := os.Lstat(path); err == nil {
			d.t.Fatalf("hook %s exists already; the tests will not overwrite it", path)
		}
		if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
			d.t.Fatal(err)
		}
		d.undo = append(d.undo, func() { _ = os.Remove(path) })
	}
}

func (d *Libvirtd) start() {
	d.t.Helper()
	conf := filepath.Join(d.dir, "libvirtd.conf")
	// Level 3 (warnings and errors) keeps the log readable; the hook's
	// output shows up in the errors.
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("log_outputs = \"3:file:%s\"\n", d.logPath)), 0o644); err != nil {
		d.t.Fatal(err)
	}
	out, err := os.OpenFile(filepath.Join(d.dir, "libvirtd.out"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		d.t.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command("libvirtd", "--config", conf, "--pid-file", libvirtdPIDPath)
	cmd.Stdout, cmd.Stderr = out, out
	// Its own process group, so a ^C of the test does not reach it first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		d.t.Fatalf("starting libvirtd: %v", err)
	}
	d.cmd = cmd
	d.exited = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { _ = c.Wait(); close(done) }(cmd, d.exited)

	deadline := time.Now().Add(30 * time.Second)
	for {
		_, errOut, err := Virsh("version")
		if err == nil {
			return
		}
		select {
		case <-d.exited:
			d.t.Fatalf("libvirtd exited at start-up: %s\nlog:\n%s", errOut, d.Log())
		default:
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("libvirtd does not answer after 30 s: %s\nlog:\n%s", errOut, d.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (d *Libvirtd) stop() {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(20 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
	d.cmd = nil
	os.Remove(libvirtdPIDPath)
}

// destroyTestDomains removes the domains tests left (their cleanups
// normally do it first).
func (d *Libvirtd) destroyTestDomains() {
	out, _, err := Virsh("list", "--all", "--name")
	if err != nil {
		return
	}
	for _, name := range strings.Fields(out) {
		if strings.HasPrefix(name, TestDomainPrefix) {
			d.t.Logf("removing domain %s a test left behind", name)
			_, _, _ = Virsh("destroy", name)
			_, _, _ = Virsh("undefine", name)
		}
	}
}

func (d *Libvirtd) cleanup() {
	if d.cmd != nil {
		d.destroyTestDomains()
		if d.t.Failed() {
			d.t.Logf("libvirtd log:\n%s", d.Log())
		}
		d.stop()
	}
	for i := len(d.undo) - 1; i >= 0; i-- {
		d.undo[i]()
	}
	if d.lock != nil {
		d.lock.Close()
	}
}

// pidsOf lists the processes whose name (comm) is name.
func pidsOf(name string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err == nil && processName(pid) == name && !isZombie(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func processName(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z'
}

func waitGone(pid int, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if syscall.Kill(pid, 0) != nil || isZombie(pid) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
}

// DomainXML is a minimal KVM domain for tests: SeaBIOS spins without a boot
// disk, which is all they need; ACPI lets disks be hot-plugged.
func DomainXML(name string, disks ...string) string {
	return domainXML("kvm", name, disks...)
}

// TCGDomainXML is DomainXML emulated by TCG (type 'qemu'), for qemu
// processes that cannot open /dev/kvm.
func TCGDomainXML(name string, disks ...string) string {
	return domainXML("qemu", name, disks...)
}

func domainXML(domainType, name string, disks ...string) string {
	return fmt.Sprintf(`<domain type='%s'>
  <name>%s</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    %s
    <memballoon model='none'/>
  </devices>
</domain>
`, domainType, name, strings.Join(disks, "\n    "))
}

// FileDiskXML is a virtio file disk; driverType "" leaves <driver type>
// out (libvirt then guesses, which is what some tests need).
func FileDiskXML(target, driverType, source string) string {
	driver := "<driver name='qemu'/>"
	if driverType != "" {
		driver = fmt.Sprintf("<driver name='qemu' type='%s'/>", driverType)
	}
	return fmt.Sprintf("<disk type='file' device='disk'>%s<source file='%s'/><target dev='%s' bus='virtio'/></disk>", driver, source, target)
}
