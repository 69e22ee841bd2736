package main

// The daemon never changes a disk under a domain, as libvirt sees it:
// Delete, Write and Resize against real domains naming a volume under
// another name of its device; Resize of a running domain's disk through
// libvirt; shut-off domains. And the hook and the auditor cover every
// disk: pool volumes, cdroms, network disks, hot-plugged disks.

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/internal/testutil"
)

// violationWatch collects the daemon's PolicyViolation signals.
type violationWatch struct {
	t  *testing.T
	ch chan *dbus.Signal
}

func watchViolations(t *testing.T, conn *dbus.Conn) *violationWatch {
	t.Helper()
	if err := conn.AddMatchSignal(dbus.WithMatchSender(dbusapi.BusName), dbus.WithMatchMember("PolicyViolation")); err != nil {
		t.Fatal(err)
	}
	w := &violationWatch{t: t, ch: make(chan *dbus.Signal, 200)}
	conn.Signal(w.ch)
	return w
}

// wait waits up to 60 s for a PolicyViolation with subject and code
// ("" for any code), and returns its message.
func (w *violationWatch) wait(subject, code string) string {
	w.t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case s := <-w.ch:
			if s.Name == dbusapi.ManagerIface+".PolicyViolation" && s.Body[0] == subject && (code == "" || s.Body[1] == code) {
				return s.Body[2].(string)
			}
		case <-deadline:
			w.t.Fatalf("no PolicyViolation for %q (%s)", subject, code)
		}
	}
}

func deviceHash(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func blockDiskXML(target, format, dev string) string {
	return fmt.Sprintf("<disk type='block' device='disk'><driver name='qemu' type='%s' cache='none'/><source dev='%s'/><target dev='%s' bus='virtio'/></disk>", format, dev, target)
}

// defineDomain defines (does not start) a domain, undefined at cleanup.
func defineDomain(t *testing.T, name string, disks ...string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), name+".xml")
	if err := os.WriteFile(path, []byte(testutil.DomainXML(name, disks...)), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _, _ = testutil.Virsh("destroy", name); _, _, _ = testutil.Virsh("undefine", name) })
	testutil.MustVirsh(t, "define", path)
}

// domState polls virsh domstate until it says want, for up to 60 s.
func waitDomState(t *testing.T, domain, want string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, _, err := testutil.Virsh("domstate", domain)
		if err == nil && strings.TrimSpace(out) == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("domain %s is %q, want %q", domain, strings.TrimSpace(out), want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func domState(t *testing.T, domain string) string {
	t.Helper()
	return strings.TrimSpace(testutil.MustVirsh(t, "domstate", domain))
}

type volumeCalls struct {
	t    *testing.T
	conn *dbus.Conn
	obj  dbus.BusObject
}

func (e *libvirtEnv) volumeObject(conn *dbus.Conn, pool, name string) *volumeCalls {
	return &volumeCalls{t: e.t, conn: conn, obj: conn.Object(dbusapi.BusName, dbusapi.VolumePath(backend.VolumeID(pool, name)))}
}

func (v *volumeCalls) delete(opts map[string]dbus.Variant) error {
	if opts == nil {
		opts = map[string]dbus.Variant{}
	}
	return v.obj.Call(dbusapi.VolumeIface+".Delete", 0, opts).Err
}

func (v *volumeCalls) write(offset uint64, data []byte) error {
	return v.obj.Call(dbusapi.VolumeIface+".Write", 0, offset, data, map[string]dbus.Variant{}).Err
}

func (v *volumeCalls) resize(size uint64) error {
	return v.obj.Call(dbusapi.VolumeIface+".Resize", 0, size, map[string]dbus.Variant{}).Err
}

// wantBusy fails unless err is Error.Busy naming the domain in state.
func wantBusy(t *testing.T, what string, err error, domain, state string) {
	t.Helper()
	var de dbus.Error
	if err == nil {
		t.Fatalf("%s: succeeded, want Busy (in use by domain %s)", what, domain)
	}
	if !asDBusError(err, &de) || de.Name != dbusapi.ErrorPrefix+"Busy" || !strings.Contains(de.Error(), fmt.Sprintf("in use by domain %s (%s)", domain, state)) {
		t.Fatalf("%s: %v, want Busy naming domain %s (%s)", what, err, domain, state)
	}
}

func asDBusError(err error, de *dbus.Error) bool {
	switch e := err.(type) {
	case dbus.Error:
		*de = e
		return true
	case *dbus.Error:
		*de = *e
		return true
	}
	return false
}

func qemuImgVirtualSize(t *testing.T, dev string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(testutil.QemuImg(t, "info", "-f", "qcow2", "-U", "--output=json", dev), &info); err != nil {
		t.Fatal(err)
	}
	return info.VirtualSize
}

func qemuImgCheckClean(t *testing.T, dev string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "-f", "qcow2", dev).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "No errors") {
		t.Fatalf("qemu-img check %s: %v\n%s", dev, err, out)
	}
}

func TestServeLibvirtDomainsInUse(t *testing.T) {
	e := newLibvirtEnv(t)
	e.startDaemon()
	client := e.bus.Connect(t)

	t.Run("running domain under another name of the device", func(t *testing.T) {
		for _, pool := range []string{libvirtLoopPool, libvirtLVMPool} {
			// Domain 1 names the volume's device (/dev/loopN) while the
			// volume is known by its request link; domain 2 the other way
			// round would be the same comparison, so it names the link
			// while the daemon knows the device.
			for i, useLink := range []bool{false, true} {
				name := fmt.Sprintf("busy%d", i)
				link := e.volCreate(pool, name, e.base, "268435456")
				dev := e.waitMaterialized(link)
				source := dev
				if useLink {
					source = link
				}
				domain := fmt.Sprintf("%sbusy-%s-%d", testutil.TestDomainPrefix, pool[len(testutil.TestDomainPrefix):], i)
				if stderr, err := startLibvirtDomain(t, domain, blockDiskXML("vda", "qcow2", source)); err != nil {
					t.Fatalf("domain refused: %v\n%s", err, stderr)
				}
				before := deviceHash(t, dev)
				vol := e.volumeObject(client, pool, name)
				wantBusy(t, "Delete", vol.delete(nil), domain, "running")
				wantBusy(t, "Delete with force", vol.delete(map[string]dbus.Variant{"force": dbus.MakeVariant(true)}), domain, "running")
				wantBusy(t, "Write", vol.write(0, []byte("overwritten by volagent")), domain, "running")
				testutil.MustVirsh(t, "suspend", domain)
				wantBusy(t, "Delete of a paused domain's disk", vol.delete(nil), domain, "paused")
				wantBusy(t, "Write of a paused domain's disk", vol.write(4096, []byte("x")), domain, "paused")
				testutil.MustVirsh(t, "destroy", domain)
				if after := deviceHash(t, dev); after != before {
					t.Fatalf("%s changed while a domain used it", dev)
				}
				if err := vol.delete(nil); err != nil {
					t.Fatalf("Delete after the domain stopped: %v", err)
				}
			}
		}
	})

	t.Run("backing image of a running domain's disk", func(t *testing.T) {
		link := e.volCreate(libvirtLoopPool, "backs", e.base, "268435456")
		dev := e.waitMaterialized(link)
		top := filepath.Join(e.images, "over-volume.qcow2")
		testutil.MakeQcow2(t, top, "", "", dev, "qcow2")
		domain := testutil.TestDomainPrefix + "backs"
		if stderr, err := startLibvirtDomain(t, domain, testutil.FileDiskXML("vda", "qcow2", top)); err != nil {
			t.Fatalf("domain refused: %v\n%s", err, stderr)
		}
		before := deviceHash(t, dev)
		vol := e.volumeObject(client, libvirtLoopPool, "backs")
		wantBusy(t, "Resize of a backing", vol.resize(512<<20), domain, "running")
		wantBusy(t, "Write of a backing", vol.write(0, []byte("x")), domain, "running")
		testutil.MustVirsh(t, "destroy", domain)
		if deviceHash(t, dev) != before {
			t.Fatalf("%s changed while a domain used it as backing", dev)
		}
		if got := qemuImgVirtualSize(t, dev); got != 256<<20 {
			t.Fatalf("virtual size %d after a refused resize", got)
		}
	})

	t.Run("resize of a running domain's disk goes through libvirt", func(t *testing.T) {
		link := e.volCreate(libvirtLoopPool, "grow", e.base, "268435456")
		dev := e.waitMaterialized(link)
		domain := testutil.TestDomainPrefix + "grow"
		if stderr, err := startLibvirtDomain(t, domain, blockDiskXML("vda", "qcow2", link)); err != nil {
			t.Fatalf("domain refused: %v\n%s", err, stderr)
		}
		capacity := func() string {
			out := testutil.MustVirsh(t, "domblkinfo", domain, "vda")
			for _, line := range strings.Split(out, "\n") {
				if f := strings.Fields(line); len(f) == 2 && f[0] == "Capacity:" {
					return f[1]
				}
			}
			t.Fatalf("domblkinfo without capacity:\n%s", out)
			return ""
		}
		if got := capacity(); got != "268435456" {
			t.Fatalf("capacity before: %s", got)
		}
		// 64 GiB needs more L1 entries than the overlay has: qemu
		// writes a new L1 table past what it wrote.
		const newSize = 64 << 30
		if err := e.volumeObject(client, libvirtLoopPool, "grow").resize(newSize); err != nil {
			t.Fatalf("Resize: %v", err)
		}
		if got := capacity(); got != fmt.Sprint(newSize) {
			t.Fatalf("domblkinfo capacity %s after Resize, want %d", got, newSize)
		}
		if state := domState(t, domain); state != "running" {
			t.Fatalf("domain is %q after the resize", state)
		}
		testutil.MustVirsh(t, "destroy", "--graceful", domain)
		qemuImgCheckClean(t, dev)
		if got := qemuImgVirtualSize(t, dev); got != newSize {
			t.Fatalf("qemu-img info: virtual size %d, want %d", got, newSize)
		}
	})

	t.Run("shut-off domain", func(t *testing.T) {
		link := e.volCreate(libvirtLVMPool, "idle", e.base, "268435456")
		dev := e.waitMaterialized(link)
		domain := testutil.TestDomainPrefix + "idle"
		defineDomain(t, domain, blockDiskXML("vda", "qcow2", dev))
		vol := e.volumeObject(client, libvirtLVMPool, "idle")
		// Resize and Write are offline edits: allowed.
		if err := vol.resize(512 << 20); err != nil {
			t.Fatalf("Resize of a shut-off domain's disk: %v", err)
		}
		if got := qemuImgVirtualSize(t, dev); got != 512<<20 {
			t.Fatalf("virtual size %d after Resize", got)
		}
		if err := vol.write(0, []byte("offline edit")); err != nil {
			t.Fatalf("Write of a shut-off domain's disk: %v", err)
		}
		// Delete would leave the definition naming a missing disk.
		wantBusy(t, "Delete", vol.delete(nil), domain, "shut off")
		if _, err := os.Stat(dev); err != nil {
			t.Fatalf("the device is gone after a refused Delete: %v", err)
		}
		if err := vol.delete(map[string]dbus.Variant{"force": dbus.MakeVariant(true)}); err != nil {
			t.Fatalf("Delete with force: %v", err)
		}
	})
}

// startNBD exports image (as its raw bytes) over NBD on a unix socket with
// qemu-storage-daemon, stopped at cleanup; it returns the socket.
func startNBD(t *testing.T, image, export string) string {
	t.Helper()
	testutil.RequireTool(t, "qemu-storage-daemon")
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	cmd := exec.Command("qemu-storage-daemon",
		"--blockdev", "driver=file,node-name=file0,filename="+image,
		"--nbd-server", "addr.type=unix,addr.path="+sock,
		"--export", "type=nbd,id=exp0,node-name=file0,name="+export+",writable=on")
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		select {
		case <-exited:
			t.Fatalf("qemu-storage-daemon exited: %s", stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-storage-daemon made no socket in 30 s: %s", stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func networkDiskXML(format, sock, export, backingStore string) string {
	driver := "<driver name='qemu'/>"
	if format != "" {
		driver = fmt.Sprintf("<driver name='qemu' type='%s'/>", format)
	}
	return fmt.Sprintf("<disk type='network' device='disk'>%s<source protocol='nbd' name='%s'><host transport='unix' socket='%s'/></source>%s<target dev='vda' bus='virtio'/></disk>",
		driver, export, sock, backingStore)
}

func TestServeLibvirtDomainHooks(t *testing.T) {
	e := newLibvirtEnv(t)
	e.startDaemon()
	client := e.bus.Connect(t)
	violations := watchViolations(t, client)

	overlay := filepath.Join(e.images, "good.qcow2")
	testutil.MakeQcow2(t, overlay, "", "", e.base, "raw")
	noFormat := filepath.Join(e.images, "noformat.qcow2")
	testutil.MakeQcow2(t, noFormat, "", "", e.base, "raw")
	hookPatchBackingFormat(t, noFormat)

	mustStart := func(t *testing.T, domain string, disks ...string) {
		t.Helper()
		if stderr, err := startLibvirtDomain(t, domain, disks...); err != nil {
			t.Fatalf("domain %s refused: %v\n%s", domain, err, stderr)
		}
		testutil.MustVirsh(t, "destroy", domain)
	}
	mustRefuse := func(t *testing.T, domain, code string, disks ...string) {
		t.Helper()
		stderr, err := startLibvirtDomain(t, domain, disks...)
		if err == nil || !strings.Contains(stderr, code) || !strings.Contains(stderr, "daemon verdict") {
			t.Fatalf("domain %s: %v, want the daemon's refusal with %s\n%s", domain, err, code, stderr)
		}
	}

	t.Run("volume disks are resolved through libvirt", func(t *testing.T) {
		pool := testutil.TestDomainPrefix + "images"
		testutil.MustVirsh(t, "pool-create-as", pool, "dir", "--target", e.images)
		t.Cleanup(func() { _, _, _ = testutil.Virsh("pool-destroy", pool) })
		volume := func(name, format string) string {
			return fmt.Sprintf("<disk type='volume' device='disk'><driver name='qemu' type='%s'/><source pool='%s' volume='%s'/><target dev='vda' bus='virtio'/></disk>", format, pool, name)
		}
		mustStart(t, testutil.TestDomainPrefix+"vol-good", volume("good.qcow2", "qcow2"))
		mustRefuse(t, testutil.TestDomainPrefix+"vol-bad", "backing-format-missing", volume("noformat.qcow2", "qcow2"))
		mustRefuse(t, testutil.TestDomainPrefix+"vol-missing", backend.CodeVolumeUnresolved, volume("nothing-here.qcow2", "qcow2"))
	})

	t.Run("cdrom and floppy", func(t *testing.T) {
		cdrom := func(source string) string {
			return fmt.Sprintf("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='%s'/><target dev='hdc' bus='ide'/><readonly/></disk>", source)
		}
		mustStart(t, testutil.TestDomainPrefix+"cdrom-good", cdrom(e.base))
		// A qcow2 used as a raw cdrom: its header would be misread.
		mustRefuse(t, testutil.TestDomainPrefix+"cdrom-bad", backend.CodeHeaderInRaw, cdrom(overlay))
		floppy := fmt.Sprintf("<disk type='file' device='floppy'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='fda' bus='fdc'/></disk>", noFormat)
		mustRefuse(t, testutil.TestDomainPrefix+"floppy-bad", "backing-format-missing", floppy)
	})

	t.Run("network disks", func(t *testing.T) {
		netImage := filepath.Join(e.images, "net.qcow2")
		testutil.MakeQcow2(t, netImage, "", "", e.base, "raw")
		sock := startNBD(t, netImage, "net")
		full := fmt.Sprintf("<backingStore type='file'><format type='raw'/><source file='%s'/><backingStore/></backingStore>", e.base)
		// (A <backingStore> level without <format> libvirt refuses itself.)
		mustRefuse(t, testutil.TestDomainPrefix+"net-nochain", backend.CodeNetworkChain, networkDiskXML("qcow2", sock, "net", ""))
		// A qcow2 level whose own backing the XML leaves to detection.
		open := fmt.Sprintf("<backingStore type='file'><format type='qcow2'/><source file='%s'/></backingStore>", overlay)
		mustRefuse(t, testutil.TestDomainPrefix+"net-open", backend.CodeNetworkChain, networkDiskXML("qcow2", sock, "net", open))
		mustStart(t, testutil.TestDomainPrefix+"net-full", networkDiskXML("qcow2", sock, "net", full))
	})

	t.Run("hot-plugged disk pauses the domain", func(t *testing.T) {
		domain := testutil.TestDomainPrefix + "hotplug"
		if stderr, err := startLibvirtDomain(t, domain); err != nil {
			t.Fatalf("domain refused: %v\n%s", err, stderr)
		}
		disk := filepath.Join(t.TempDir(), "disk.xml")
		// A qcow2 attached as raw: the hook never sees it.
		if err := os.WriteFile(disk, []byte(testutil.FileDiskXML("vdb", "raw", overlay)), 0o644); err != nil {
			t.Fatal(err)
		}
		testutil.MustVirsh(t, "attach-device", domain, disk, "--live")
		waitDomState(t, domain, "paused")
		violations.wait("domain "+domain, "domain-paused")
	})

	t.Run("media change pauses the domain", func(t *testing.T) {
		domain := testutil.TestDomainPrefix + "media"
		if stderr, err := startLibvirtDomain(t, domain, fmt.Sprintf("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='%s'/><target dev='hdc' bus='ide'/><readonly/></disk>", e.base)); err != nil {
			t.Fatalf("domain refused: %v\n%s", err, stderr)
		}
		testutil.MustVirsh(t, "change-media", domain, "hdc", overlay, "--live", "--update")
		waitDomState(t, domain, "paused")
		violations.wait("domain "+domain, "domain-paused")
	})

	t.Run("log mode does not pause", func(t *testing.T) {
		e.stopDaemon()
		f, err := os.OpenFile(e.config, os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(f, "\n[libvirt]\nuri = %q\non_violation = \"log\"\n", testutil.LibvirtURI)
		f.Close()
		e.startDaemon()
		domain := testutil.TestDomainPrefix + "hotplug-log"
		if stderr, err := startLibvirtDomain(t, domain); err != nil {
			t.Fatalf("domain refused: %v\n%s", err, stderr)
		}
		// Two images: qemu would refuse one twice (its own write lock).
		for target, image := range map[string]string{"vdb": overlay, "vdc": noFormat} {
			disk := filepath.Join(t.TempDir(), target+".xml")
			if err := os.WriteFile(disk, []byte(testutil.FileDiskXML(target, "raw", image)), 0o644); err != nil {
				t.Fatal(err)
			}
			testutil.MustVirsh(t, "attach-device", domain, disk, "--live")
			// The auditor handles events one at a time: the second
			// violation is signalled after the first event was handled.
			violations.wait("domain "+domain+" disk "+target, backend.CodeHeaderInRaw)
		}
		if state := domState(t, domain); state != "running" {
			t.Fatalf("domain is %q in log mode, want running", state)
		}
	})
}
