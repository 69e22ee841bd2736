package main

// `volagentd --libvirt-uri` against a real libvirtd, on a private bus:
// the qemu hook asking the daemon, vol-create/vol-delete on request pools of
// a loop and an LVM pool, thin growth under a running KVM domain, and
// restarts of either side; and a guest's own writes growing a thin overlay.

import (
	"context"
	"encoding/json"
	"errors"
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

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/dbusapi/dbustest"
	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testguest"
	"github.com/volagent/volagent/internal/testutil"
)

const (
	libvirtLoopPool = testutil.TestDomainPrefix + "loop"
	libvirtLVMPool  = testutil.TestDomainPrefix + "lvm"
)

// libvirtEnv is a volagent configuration with a loop and an LVM pool, a
// private bus, a libvirtd with the hook asking the daemon on that bus.
type libvirtEnv struct {
	t          *testing.T
	dir        string
	images     string // the backing root
	outside    string // outside every root
	base       string // raw, under images
	vg, pv     string // the LVM pool's volume group and its one PV
	requestDir string
	config     string
	bus        *dbustest.Bus
	libvirtd   *testutil.Libvirtd
	daemon     *libvirtDaemon
}

func newLibvirtEnv(t *testing.T) *libvirtEnv {
	t.Helper()
	return newLibvirtEnvWith(t, testutil.LibvirtdOptions{})
}

// newLibvirtEnvWith is newLibvirtEnv with libvirtd options (its Hooks are
// the env's own).
func newLibvirtEnvWith(t *testing.T, opts testutil.LibvirtdOptions) *libvirtEnv {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "dbus-daemon", "qemu-img", "lvm", "virsh")
	bin := binaryUnderTest(t)
	e := &libvirtEnv{t: t, dir: looptest.Dir(t, "volagent-libvirt-")}
	e.images, e.outside, e.requestDir = filepath.Join(e.dir, "images"), filepath.Join(e.dir, "outside"), filepath.Join(e.dir, "requests")
	for _, d := range []string{e.images, e.outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	e.base = filepath.Join(e.images, "base.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", e.base, "512M")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", filepath.Join(e.outside, "x.raw"), "32M")
	vg, pv := libvirtTestVG(t, e.dir)
	e.vg, e.pv = vg, pv
	e.config = filepath.Join(e.dir, "volagent.toml")
	cfg := fmt.Sprintf(`[[pool]]
name = %q
type = "loop"
directory = %q
backing_roots = [%q]
initial_size = "64M"
chunk_size = "64M"

[[pool]]
name = %q
type = "lvm"
volume_group = %q
activation = "loop"
backing_roots = [%q]
initial_size = "8M"
chunk_size = "8M"
`, libvirtLoopPool, filepath.Join(e.dir, "pool"), e.images, libvirtLVMPool, vg, e.images)
	if err := os.WriteFile(e.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	e.bus = dbustest.Start(t, dbustest.Options{Policies: []string{busPolicyFile}})
	// The hook asks the daemon on the private bus; without an answer it
	// refuses everything, so a pass proves the daemon judged.
	hook := fmt.Sprintf("#!/bin/sh\nexec %s hook qemu --bus-address %s --config /nonexistent/volagent.toml --when-unreachable refuse-all \"$@\"\n", bin, e.bus.Address)
	opts.Hooks = map[string]string{"volagent-test": hook}
	e.libvirtd = testutil.StartLibvirtd(t, opts)
	t.Cleanup(func() {
		for _, pool := range []string{libvirtLoopPool, libvirtLVMPool} {
			_, _, _ = testutil.Virsh("pool-destroy", pool)
			_, _, _ = testutil.Virsh("pool-undefine", pool)
		}
	})
	return e
}

// libvirtTestVG makes a volume group on a loop device over a file in dir,
// removed at cleanup (with the loop devices of its LVs).
func libvirtTestVG(t *testing.T, dir string) (vg, pv string) {
	t.Helper()
	file := filepath.Join(dir, "pv.img")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, 1<<30); err != nil {
		t.Fatal(err)
	}
	loop, err := hostblk.AttachLoop(file, hostblk.LoopOptions{SectorSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	vg = fmt.Sprintf("vlt%d", os.Getpid())
	lvm := &hostblk.LVM{NoDeviceMapper: true, Devices: []string{loop.Path}}
	t.Cleanup(func() {
		loops, _ := hostblk.LoopDevices()
		for _, l := range loops {
			if l.BackingFile == loop.Path {
				_ = hostblk.DetachLoop(l.Path)
			}
		}
		_, _ = lvm.Run(context.Background(), "vgremove", "-ff", "-y", vg)
		_, _ = lvm.Run(context.Background(), "pvremove", "-ff", "-y", loop.Path)
		_ = hostblk.DetachLoop(loop.Path)
	})
	if _, err := lvm.Run(context.Background(), "pvcreate", "-y", loop.Path); err != nil {
		t.Fatalf("pvcreate: %v", err)
	}
	if _, err := lvm.Run(context.Background(), "vgcreate", "-y", "-s", "4m", vg, loop.Path); err != nil {
		t.Fatalf("vgcreate: %v", err)
	}
	return vg, loop.Path
}

// libvirtDaemon is one `volagentd --libvirt-uri` process.
type libvirtDaemon struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
	exited chan struct{}
}

// startDaemon starts volagentd and waits until it owns its bus name
// and libvirt has both request pools running.
func (e *libvirtEnv) startDaemon() *libvirtDaemon {
	t := e.t
	t.Helper()
	d := &libvirtDaemon{stderr: &syncBuffer{}, exited: make(chan struct{})}
	d.cmd = exec.Command(daemonUnderTest(t), "--config", e.config, "--bus-address", e.bus.Address,
		"--libvirt-uri", testutil.LibvirtURI, "--request-dir", e.requestDir, "--reconcile-interval", "2s", "--debug")
	d.cmd.Stderr = d.stderr
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = d.cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			_ = d.cmd.Process.Kill()
			<-d.exited
		}
		if t.Failed() {
			t.Logf("volagentd stderr:\n%s", d.stderr.String())
		}
	})
	e.daemon = d
	// The pools may be running from an earlier daemon: the bus name says
	// this one is up.
	bus, err := dbus.Connect(e.bus.Address)
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	e.waitFor("the daemon's bus name", func() bool {
		var owned bool
		err := bus.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, dbusapi.BusName).Store(&owned)
		return err == nil && owned
	})
	e.waitFor("the daemon's request pools in libvirt", func() bool {
		for _, pool := range []string{libvirtLoopPool, libvirtLVMPool} {
			out, _, err := testutil.Virsh("pool-info", pool)
			if err != nil || !strings.Contains(out, "running") {
				return false
			}
		}
		return true
	})
	return d
}

func (e *libvirtEnv) stopDaemon() {
	e.t.Helper()
	d := e.daemon
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(60 * time.Second):
		e.t.Fatalf("volagentd did not stop within 60 s of SIGTERM:\n%s", d.stderr.String())
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		e.t.Fatalf("volagentd exited %d after SIGTERM:\n%s", code, d.stderr.String())
	}
}

// blockThreshold is the block threshold libvirt reports for the domain's
// disk target (virsh domstats block.N.threshold), 0 when none is set.
func blockThreshold(t *testing.T, domain, target string) uint64 {
	t.Helper()
	stats := map[string]string{}
	for _, line := range strings.Split(testutil.MustVirsh(t, "domstats", "--block", domain), "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok {
			stats[k] = v
		}
	}
	for i := 0; ; i++ {
		name, ok := stats[fmt.Sprintf("block.%d.name", i)]
		if !ok {
			return 0
		}
		if name == target {
			n, _ := strconv.ParseUint(stats[fmt.Sprintf("block.%d.threshold", i)], 10, 64)
			return n
		}
	}
}

// waitFor polls cond for up to 60 s.
func (e *libvirtEnv) waitFor(what string, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			stderr := ""
			if e.daemon != nil {
				stderr = e.daemon.stderr.String()
			}
			e.t.Fatalf("timed out waiting for %s; volagentd stderr:\n%s", what, stderr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// volCreate asks libvirt for an overlay in a request pool.
func (e *libvirtEnv) volCreate(pool, name, backing, capacity string) string {
	e.t.Helper()
	xml := fmt.Sprintf("<volume><name>%s.qcow2</name><capacity unit='bytes'>%s</capacity><target><format type='qcow2'/></target>"+
		"<backingStore><path>%s</path><format type='raw'/></backingStore></volume>", name, capacity, backing)
	path := filepath.Join(e.t.TempDir(), name+".xml")
	if err := os.WriteFile(path, []byte(xml), 0o644); err != nil {
		e.t.Fatal(err)
	}
	testutil.MustVirsh(e.t, "vol-create", pool, path)
	return filepath.Join(e.requestDir, pool, name+".qcow2")
}

// waitMaterialized waits until the request at path is a link to a block
// device, and returns the device.
func (e *libvirtEnv) waitMaterialized(path string) string {
	e.t.Helper()
	var dev string
	e.waitFor("request "+path+" to become a link to a volume", func() bool {
		fi, err := os.Lstat(path)
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			return false
		}
		dev, _ = os.Readlink(path)
		st, err := os.Stat(path)
		return err == nil && st.Mode()&os.ModeDevice != 0
	})
	return dev
}

func (e *libvirtEnv) waitRefused(path string) string {
	e.t.Helper()
	e.waitFor("request "+path+" to be refused", func() bool {
		_, err := os.Stat(path + ".refused.reason")
		return err == nil
	})
	if _, err := os.Lstat(path); err == nil {
		e.t.Fatalf("refused request %s is still in place", path)
	}
	if _, err := os.Stat(path + ".refused"); err != nil {
		e.t.Fatalf("refused request not renamed: %v", err)
	}
	reason, _ := os.ReadFile(path + ".refused.reason")
	return string(reason)
}

// volumeCount is the number of volumes the daemon serves.
func (e *libvirtEnv) volumeCount(conn *dbus.Conn) int {
	e.t.Helper()
	var objects map[dbus.ObjectPath]map[string]map[string]dbus.Variant
	if err := conn.Object(dbusapi.BusName, dbusapi.ManagerPath).Call("org.freedesktop.DBus.ObjectManager.GetManagedObjects", 0).Store(&objects); err != nil {
		e.t.Fatal(err)
	}
	n := 0
	for _, o := range objects {
		if _, ok := o[dbusapi.VolumeIface]; ok {
			n++
		}
	}
	return n
}

// startLibvirtDomain starts a transient domain (destroyed at cleanup) and
// returns virsh's stderr and error.
func startLibvirtDomain(t *testing.T, name string, disks ...string) (string, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), name+".xml")
	if err := os.WriteFile(path, []byte(testutil.DomainXML(name, disks...)), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _, _ = testutil.Virsh("destroy", name) })
	_, stderr, err := testutil.Virsh("create", path)
	return stderr, err
}

func hmp(t *testing.T, domain, command string) string {
	t.Helper()
	return testutil.MustVirsh(t, "qemu-monitor-command", "--hmp", domain, command)
}

func TestServeLibvirt(t *testing.T) {
	e := newLibvirtEnv(t)
	e.startDaemon()
	client := e.bus.Connect(t)
	violations := watchViolations(t, client)

	t.Run("hook asks the daemon", func(t *testing.T) {
		overlay := filepath.Join(e.images, "hook-overlay.qcow2")
		testutil.MakeQcow2(t, overlay, "", "", e.base, "raw")
		good := testutil.TestDomainPrefix + "serve-good"
		if stderr, err := startLibvirtDomain(t, good, fmt.Sprintf("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='vda' bus='virtio'/></disk>", overlay)); err != nil {
			t.Fatalf("good domain refused: %v\n%s", err, stderr)
		}
		testutil.MustVirsh(t, "destroy", good)
		bad := testutil.TestDomainPrefix + "serve-bad"
		stderr, err := startLibvirtDomain(t, bad, fmt.Sprintf("<disk type='file' device='disk'><driver name='qemu'/><source file='%s'/><target dev='vda' bus='virtio'/></disk>", overlay))
		// libvirt turns the missing <driver type> into raw before the hook
		// runs: the daemon sees a raw disk with a qcow2 header.
		if err == nil || !strings.Contains(stderr, "header-in-raw") || !strings.Contains(stderr, "daemon verdict") {
			t.Fatalf("bad domain: %v\n%s", err, stderr)
		}
		violations.wait("domain "+bad+" disk vda", "header-in-raw")
	})

	for _, pool := range []string{libvirtLoopPool, libvirtLVMPool} {
		t.Run("vol-create on "+pool, func(t *testing.T) {
			good := e.volCreate(pool, "vm1", e.base, "268435456")
			dev := e.waitMaterialized(good)
			out := testutil.MustVirsh(t, "vol-list", pool)
			if !strings.Contains(out, "vm1.qcow2") || strings.Contains(out, ".volagent-") {
				t.Fatalf("vol-list %s:\n%s", pool, out)
			}
			if got := strings.TrimSpace(testutil.MustVirsh(t, "vol-path", "--pool", pool, "vm1.qcow2")); got != good {
				t.Fatalf("vol-path %q, want %q", got, good)
			}
			if xml := testutil.MustVirsh(t, "vol-dumpxml", "--pool", pool, "vm1.qcow2"); !strings.Contains(xml, e.base) || !strings.Contains(xml, "<capacity unit='bytes'>268435456</capacity>") {
				t.Fatalf("vol-dumpxml:\n%s", xml)
			}
			var info struct {
				Format          string `json:"format"`
				VirtualSize     int64  `json:"virtual-size"`
				BackingFilename string `json:"backing-filename"`
				BackingFormat   string `json:"backing-filename-format"`
			}
			if err := json.Unmarshal(testutil.QemuImg(t, "info", "-f", "qcow2", "-U", "--output=json", dev), &info); err != nil {
				t.Fatal(err)
			}
			if info.Format != "qcow2" || info.BackingFilename != e.base || info.BackingFormat != "raw" || info.VirtualSize != 256<<20 {
				t.Fatalf("qemu-img info %s: %+v", dev, info)
			}

			bad := e.volCreate(pool, "vm2", filepath.Join(e.outside, "x.raw"), "33554432")
			if reason := e.waitRefused(bad); !strings.Contains(reason, "x.raw") {
				t.Fatalf("reason %q does not name the backing", reason)
			}
			violations.wait("request "+pool+"/vm2.qcow2", "")

			// A shut-off domain that names the volume only by its request
			// link (which vol-delete unlinks first) blocks the deletion too.
			holder := testutil.TestDomainPrefix + "link-holder-" + pool
			holderXML := filepath.Join(t.TempDir(), holder+".xml")
			disk := fmt.Sprintf("<disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='%s'/><target dev='vda' bus='virtio'/></disk>", good)
			if err := os.WriteFile(holderXML, []byte(testutil.DomainXML(holder, disk)), 0o644); err != nil {
				t.Fatal(err)
			}
			testutil.MustVirsh(t, "define", holderXML)
			t.Cleanup(func() { _, _, _ = testutil.Virsh("undefine", holder) })
			testutil.MustVirsh(t, "vol-delete", "--pool", pool, "vm1.qcow2")
			violations.wait("volume "+pool+"/vm1", "delete-refused")
			if got := e.waitMaterialized(good); got != dev {
				t.Fatalf("the restored link points to %q, want %q", got, dev)
			}
			testutil.MustVirsh(t, "undefine", holder)

			// vol-delete removes the volume's device.
			before := e.volumeCount(client)
			testutil.MustVirsh(t, "vol-delete", "--pool", pool, "vm1.qcow2")
			e.waitFor("the volume's deletion", func() bool { return e.volumeCount(client) == before-1 })
			// The watcher puts the link back while the backend decides, and
			// removes it once the volume is gone.
			e.waitFor("the deleted volume's link to go", func() bool {
				_, err := os.Lstat(good)
				return errors.Is(err, os.ErrNotExist)
			})
		})
	}

	t.Run("thin growth under a running domain", func(t *testing.T) {
		link := e.volCreate(libvirtLoopPool, "thin", e.base, "536870912")
		dev := e.waitMaterialized(link)
		initial, err := hostblk.Inspect(dev)
		if err != nil {
			t.Fatal(err)
		}
		if initial.Size != 64<<20 {
			t.Fatalf("new overlay's device is %d bytes, want the initial 64 MiB", initial.Size)
		}
		domain := testutil.TestDomainPrefix + "thin"
		if stderr, err := startLibvirtDomain(t, domain, fmt.Sprintf("<disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='%s'/><target dev='hda' bus='ide'/></disk>", dev)); err != nil {
			t.Fatalf("domain on the overlay refused: %v\n%s", err, stderr)
		}
		// A domain uses it: vol-delete is refused and the link restored.
		testutil.MustVirsh(t, "vol-delete", "--pool", libvirtLoopPool, "thin.qcow2")
		violations.wait("volume "+libvirtLoopPool+"/thin", "delete-refused")
		e.waitMaterialized(link)

		// 300 MiB in 4 MiB writes, as a guest's stream of writes: each
		// HMP qemu-io write must succeed (qemu-io bypasses the guest
		// device's ENOSPC pause, so a write past the device's end would
		// fail here, not wait).
		// The daemon sets the threshold on the STARTED event: wait until
		// libvirt reports it on hda, so the writes below go through it.
		e.waitFor("the block threshold on hda", func() bool { return blockThreshold(t, domain, "hda") > 0 })
		// qemu-io -d writes through the guest device's own block backend
		// (what the guest writes through); an IDE disk carries it on the
		// device libvirt names (virtio-blk-pci keeps it on an inner device
		// without an id, and a second backend on the node is refused for
		// want of the write permission the guest device holds).
		node := "-d ide0-0-0"
		for off := 0; off < 300<<20; off += 4 << 20 {
			out := hmp(t, domain, fmt.Sprintf(`qemu-io %s "write -P 0xab %d 4M"`, node, off))
			// qemu-io prints its results on qemu's stdout, not the
			// monitor: the monitor shows only errors of the command itself.
			// A failed write shows up in the read-back below.
			if strings.TrimSpace(out) != "" {
				t.Fatalf("write at %d: %s", off, out)
			}
		}
		grown, err := hostblk.Inspect(dev)
		if err != nil {
			t.Fatal(err)
		}
		if grown.Size <= 300<<20 {
			t.Fatalf("device is %d bytes after 300 MiB of writes", grown.Size)
		}
		if state := strings.TrimSpace(testutil.MustVirsh(t, "domstate", domain)); state != "running" {
			t.Fatalf("domain is %q", state)
		}
		testutil.MustVirsh(t, "destroy", domain)
		// Every byte written reads back (a write lost to ENOSPC would read
		// as the backing's zeros), and the image is consistent.
		out, err := exec.Command("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0xab 0 300M", dev).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "read 314572800/314572800 bytes") || strings.Contains(string(out), "fail") {
			t.Fatalf("reading back what the domain wrote: %v\n%s", err, out)
		}
		out, err = exec.Command("qemu-img", "check", "-f", "qcow2", dev).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "No errors") {
			t.Fatalf("qemu-img check after growth: %v\n%s", err, out)
		}
	})

	t.Run("requests made while volagent was stopped or libvirtd restarted", func(t *testing.T) {
		e.stopDaemon()
		offline := e.volCreate(libvirtLoopPool, "offline", e.base, "33554432")
		e.startDaemon()
		e.waitMaterialized(offline)

		e.libvirtd.Restart()
		e.waitFor("the request pools after the libvirtd restart", func() bool {
			out, _, err := testutil.Virsh("pool-info", libvirtLVMPool)
			return err == nil && strings.Contains(out, "running")
		})
		after := e.volCreate(libvirtLVMPool, "after-restart", e.base, "33554432")
		e.waitMaterialized(after)
		e.waitFor("the volume in vol-list", func() bool {
			out, _, _ := testutil.Virsh("vol-list", libvirtLVMPool)
			return strings.Contains(out, "after-restart.qcow2")
		})
		e.stopDaemon()
	})
}

// TestServeLibvirtThinGuest runs a guest's own writes (a boot sector that
// writes 200 MiB through int 13h: requests that obey the disk's error
// policy, unlike qemu-io's) on an overlay made by vol-create, its device
// starting at 64 MiB: the daemon's block thresholds grow it ahead of the
// guest, which never pauses, and every sector reads back.
func TestServeLibvirtThinGuest(t *testing.T) {
	e := newLibvirtEnv(t)
	e.startDaemon()
	guest := testguest.Writer{Sectors: 200 << 20 / testguest.SectorSize, DoneLBA: 201 << 20 / testguest.SectorSize, PerCall: 127}
	bootDir := filepath.Join(e.images, "guest")
	if err := os.Mkdir(bootDir, 0o755); err != nil {
		t.Fatal(err)
	}
	boot := guest.BootDisk(t, bootDir)
	link := e.volCreate(libvirtLoopPool, "guest", e.base, "268435456")
	dev := e.waitMaterialized(link)

	// The boot disk gets boot order 1 and the overlay 2, so SeaBIOS makes
	// them drives 0x80 and 0x81 (under libvirt's -boot strict=on a disk
	// without a boot index gets no BIOS number). virtio-blk: SeaBIOS writes
	// IDE a sector per request, too slow for 200 MiB under nested KVM.
	domain := testutil.TestDomainPrefix + "thin-guest"
	serial := filepath.Join(t.TempDir(), "serial.log")
	if stderr, err := startLibvirtDomain(t, domain,
		fmt.Sprintf("<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='%s'/><target dev='vda' bus='virtio'/><boot order='1'/></disk>", boot),
		fmt.Sprintf("<disk type='block' device='disk'><driver name='qemu' type='qcow2' error_policy='stop'/><source dev='%s'/><target dev='vdb' bus='virtio'/><boot order='2'/></disk>", link),
		fmt.Sprintf("<serial type='file'><source path='%s'/><target port='0'/></serial>", serial)); err != nil {
		t.Fatalf("guest domain refused: %v\n%s", err, stderr)
	}
	deadline := time.Now().Add(5 * time.Minute)
	for {
		out, _ := os.ReadFile(serial)
		if strings.Contains(string(out), testguest.SerialDone) {
			break
		}
		if strings.Contains(string(out), testguest.SerialError) || strings.Contains(string(out), testguest.SerialNoExt) || time.Now().After(deadline) {
			state, _, _ := testutil.Virsh("domstate", "--reason", domain)
			t.Fatalf("the guest did not finish: serial %q, domain %s\nvolagentd stderr:\n%s", out, strings.TrimSpace(state), e.daemon.stderr.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	// "running (booted)": a pause and resume would make it "(unpaused)".
	if state := strings.TrimSpace(testutil.MustVirsh(t, "domstate", "--reason", domain)); state != "running (booted)" {
		t.Fatalf("domain is %q after the guest finished", state)
	}
	if log := e.daemon.stderr.String(); !strings.Contains(log, "volume grown at its block threshold") || strings.Contains(log, "domain resumed after its volume grew") {
		t.Fatalf("want growth at block thresholds and no ENOSPC pause; volagentd stderr:\n%s", log)
	}
	grown, err := hostblk.Inspect(dev)
	if err != nil {
		t.Fatal(err)
	}
	// Past what the guest wrote, by at most the chunk a threshold half a
	// chunk before the end adds (and 1 MiB of qcow2 metadata).
	const chunk = 64 << 20
	if written := int64(guest.DoneLBA+1) * testguest.SectorSize; grown.Size < written || grown.Size > written+chunk+chunk/2+1<<20 {
		t.Fatalf("device is %d bytes after the guest wrote %d: want more, by at most 1.5 chunks of %d", grown.Size, written, chunk)
	}
	// A graceful stop: qemu flushes its qcow2 metadata caches on the way out.
	testutil.MustVirsh(t, "destroy", "--graceful", domain)
	image := filepath.Join(t.TempDir(), "guest.raw")
	testutil.QemuImg(t, "convert", "-f", "qcow2", "-O", "raw", dev, image)
	f, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := guest.Verify(f); err != nil {
		t.Fatalf("what the guest wrote does not read back: %v", err)
	}
	if out, err := exec.Command("qemu-img", "check", "-f", "qcow2", dev).CombinedOutput(); err != nil || !strings.Contains(string(out), "No errors") {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
}

// TestServeLibvirtQemuUser: qemu runs as Debian's libvirt runs it (as
// libvirt-qemu, libvirt changing the owner of the device only), and a
// domain whose disk is the README's <disk> on a request-pool link made by
// `virsh vol-create` with the README's volume XML starts, its qemu
// running as libvirt-qemu. Requests volagent must refuse (a name another
// request's volume has, a raw backing that is a qcow2 image) are refused.
func TestServeLibvirtQemuUser(t *testing.T) {
	e := newLibvirtEnvWith(t, testutil.LibvirtdOptions{QemuAsLibvirtQemu: true})
	// Where the request directory lives must be crossable, as /var/lib is.
	if err := os.Chmod(e.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.startDaemon()
	qemuUser, err := user.Lookup("libvirt-qemu")
	if err != nil {
		t.Fatal(err)
	}

	volXML := filepath.Join(t.TempDir(), "vm1.xml")
	if err := os.WriteFile(volXML, []byte(fmt.Sprintf(`<volume>
  <name>vm1</name>
  <capacity unit='G'>1</capacity>
  <target><format type='qcow2'/></target>
  <backingStore>
    <path>%s</path>
    <format type='raw'/>
  </backingStore>
</volume>
`, e.base)), 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.MustVirsh(t, "vol-create", libvirtLoopPool, volXML)
	link := filepath.Join(e.requestDir, libvirtLoopPool, "vm1")
	e.waitMaterialized(link)

	domain := testutil.TestDomainPrefix + "qemu-user"
	disk := fmt.Sprintf(`<disk type='block' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native'/>
      <source dev='%s'/>
      <target dev='vda' bus='virtio'/>
    </disk>`, link)
	domXML := filepath.Join(t.TempDir(), domain+".xml")
	if err := os.WriteFile(domXML, []byte(testutil.TCGDomainXML(domain, disk)), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _, _ = testutil.Virsh("destroy", domain) })
	if _, stderr, err := testutil.Virsh("create", domXML); err != nil {
		t.Fatalf("a domain on the request-pool overlay does not start with qemu as libvirt-qemu: %v\n%s", err, stderr)
	}
	pidText, err := os.ReadFile(filepath.Join("/run/libvirt/qemu", domain+".pid"))
	if err != nil {
		t.Fatal(err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%s/status", strings.TrimSpace(string(pidText))))
	if err != nil {
		t.Fatal(err)
	}
	var uid string
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[0] == "Uid:" {
			uid = f[1]
		}
	}
	if uid != qemuUser.Uid {
		t.Fatalf("qemu runs as uid %q, want libvirt-qemu (%s)", uid, qemuUser.Uid)
	}
	if state := strings.TrimSpace(testutil.MustVirsh(t, "domstate", domain)); state != "running" {
		t.Fatalf("domain is %q", state)
	}
	testutil.MustVirsh(t, "destroy", domain)

	// "vm1.qcow2" is volume name vm1 too: refused, not linked to vm1's
	// volume.
	taken := e.volCreate(libvirtLoopPool, "vm1", e.base, "33554432")
	if reason := e.waitRefused(taken); !strings.Contains(reason, "did not make") {
		t.Fatalf("vm1.qcow2 refused for %q", reason)
	}
	// A qcow2 image named as a raw backing: refused when the overlay is
	// made, not first at the domain's start.
	disguised := filepath.Join(e.images, "disguised.raw")
	testutil.MakeQcow2(t, disguised, "", "32M", "", "")
	bad := e.volCreate(libvirtLoopPool, "disguised", disguised, "33554432")
	if reason := e.waitRefused(bad); !strings.Contains(reason, "qcow2 header") {
		t.Fatalf("disguised raw backing refused for %q", reason)
	}
}
