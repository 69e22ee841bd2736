package virt

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"libvirt.org/go/libvirt"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

type testLogWriter struct{ t testing.TB }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startDomain starts a transient domain, destroyed at cleanup.
func startDomain(t testing.TB, name string, disks ...string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), name+".xml")
	if err := os.WriteFile(path, []byte(testutil.DomainXML(name, disks...)), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _, _ = testutil.Virsh("destroy", name) })
	testutil.MustVirsh(t, "create", path)
}

// noBackingFormat makes a qcow2 over backing that records no backing
// format (its backing-format extension is renamed to an unknown one).
func noBackingFormat(t *testing.T, path, backing string) {
	t.Helper()
	testutil.MakeQcow2(t, path, "", "", backing, "raw")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var typ [4]byte
	binary.BigEndian.PutUint32(typ[:], qcow2.ExtBackingFormat)
	hdrLen := int(binary.BigEndian.Uint32(b[100:104]))
	i := bytes.Index(b[hdrLen:4096], typ[:])
	if i < 0 {
		t.Fatalf("%s has no backing format extension", path)
	}
	binary.BigEndian.PutUint32(b[hdrLen+i:], 0x12345678)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

type lifecycleEvent struct {
	domain string
	event  libvirt.DomainEventType
}

func waitFor[T any](t *testing.T, ch <-chan T, what string, match func(T) bool) T {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case v := <-ch:
			if match(v) {
				return v
			}
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestVirtReconnect restarts libvirtd under a Conn: it reconnects,
// resynchronises (Connected again) and its event callbacks work on the new
// connection.
func TestVirtReconnect(t *testing.T) {
	daemon := testutil.StartLibvirtd(t, testutil.LibvirtdOptions{})
	connected := make(chan uint64, 16)
	lifecycle := make(chan lifecycleEvent, 64)
	c, err := Dial(Options{URI: testutil.LibvirtURI, Logger: testLogger(t), KeepAliveInterval: time.Second, MaxBackoff: time.Second}, Handlers{
		Connected: func(conn *libvirt.Connect, gen uint64) {
			if _, err := conn.ListAllDomains(0); err != nil {
				t.Errorf("resync on connection %d: %v", gen, err)
			}
			connected <- gen
		},
		DomainLifecycle: func(domain string, event libvirt.DomainEventType, detail int) {
			lifecycle <- lifecycleEvent{domain, event}
		},
		PoolLifecycle: func(string, libvirt.StoragePoolEventLifecycleType) {},
		PoolRefresh:   func(string) {},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, connected, "the first connection", func(g uint64) bool { return g == 1 })

	base := filepath.Join(t.TempDir(), "base.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", base, "16M")
	name := testutil.TestDomainPrefix + "reconnect"
	startDomain(t, name, testutil.FileDiskXML("vda", "raw", base))
	waitFor(t, lifecycle, "STARTED before the restart", func(e lifecycleEvent) bool {
		return e.domain == name && e.event == libvirt.DOMAIN_EVENT_STARTED
	})

	daemon.Restart()
	waitFor(t, connected, "the reconnection", func(g uint64) bool { return g == 2 })
	if g := c.Generation(); g != 2 {
		t.Fatalf("Generation() = %d after one restart, want 2", g)
	}
	if err := c.Do(func(conn *libvirt.Connect) error {
		_, err := conn.LookupDomainByName(name)
		return err
	}); err != nil {
		t.Fatalf("the running domain is not visible after the reconnection: %v", err)
	}
	testutil.MustVirsh(t, "destroy", name)
	waitFor(t, lifecycle, "STOPPED after the restart", func(e lifecycleEvent) bool {
		return e.domain == name && e.event == libvirt.DOMAIN_EVENT_STOPPED
	})

	// While libvirtd is down, Do fails fast and the Conn keeps trying.
	daemon.Stop()
	deadline := time.Now().Add(30 * time.Second)
	for c.Do(func(*libvirt.Connect) error { return nil }) != ErrDisconnected {
		if time.Now().After(deadline) {
			t.Fatal("the Conn did not notice libvirtd stopping")
		}
		time.Sleep(100 * time.Millisecond)
	}
	daemon.Start()
	waitFor(t, connected, "the connection after an outage", func(g uint64) bool { return g == 3 })
}

// TestVirtDomainAudit audits running domains: at start, after a
// (re)connection, and when a disk is hot-plugged (no hook runs then).
func TestVirtDomainAudit(t *testing.T) {
	testutil.StartLibvirtd(t, testutil.LibvirtdOptions{})
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", base, "16M")
	overlay := filepath.Join(dir, "overlay.qcow2")
	testutil.MakeQcow2(t, overlay, "", "", base, "raw")
	noFormat := filepath.Join(dir, "noformat.qcow2")
	noBackingFormat(t, noFormat, base)

	type audited struct {
		domain string
		report *backend.DomainReport
	}
	reports := make(chan audited, 64)
	checker := CheckerFunc(func(ctx context.Context, xml []byte) (bool, *backend.DomainReport, error) {
		rep, err := backend.CheckDomain(xml, backend.DomainPolicyOptions{AllowedRoots: []string{dir}})
		if err != nil {
			return false, nil, err
		}
		return rep.Allowed(), rep, nil
	})
	auditor := NewAuditor(checker, testLogger(t), func(domain string, rep *backend.DomainReport) {
		reports <- audited{domain, rep}
	})
	c, err := Dial(Options{URI: testutil.LibvirtURI, Logger: testLogger(t)}, auditor.Handlers(Handlers{}))
	if err != nil {
		t.Fatal(err)
	}
	auditor.Bind(c)
	defer c.Close()

	good := testutil.TestDomainPrefix + "audit-good"
	startDomain(t, good, testutil.FileDiskXML("vda", "qcow2", overlay))
	r := waitFor(t, reports, "the report on the good domain", func(a audited) bool { return a.domain == good })
	if !r.report.Allowed() || len(r.report.Disks) != 1 || len(r.report.Disks[0].Chain) != 2 {
		t.Fatalf("good domain: %+v", r.report)
	}

	// A disk without <driver type> (libvirt makes it raw: the guest sees
	// the qcow2 header).
	bad := testutil.TestDomainPrefix + "audit-bad"
	overlay2 := filepath.Join(dir, "overlay2.qcow2")
	testutil.MakeQcow2(t, overlay2, "", "", base, "raw")
	startDomain(t, bad, testutil.FileDiskXML("vda", "", overlay2))
	r = waitFor(t, reports, "the report on the bad domain", func(a audited) bool { return a.domain == bad })
	if r.report.Allowed() || r.report.Violations[0].Code != backend.CodeHeaderInRaw {
		t.Fatalf("bad domain: %+v", r.report)
	}

	// Hot-plug an overlay that records no backing format: libvirt 9.0
	// probes its backing and attaches it; the audit catches it.
	diskXML := filepath.Join(dir, "hotplug.xml")
	if err := os.WriteFile(diskXML, []byte(testutil.FileDiskXML("vdb", "qcow2", noFormat)), 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.MustVirsh(t, "attach-device", good, diskXML, "--live")
	r = waitFor(t, reports, "the report after the hot-plug", func(a audited) bool { return a.domain == good && !a.report.Allowed() })
	found := false
	for _, v := range r.report.Violations {
		if v.Disk == "vdb" && v.Code == "backing-format-missing" {
			found = true
		}
	}
	if !found {
		t.Fatalf("hot-plugged disk not reported: %+v", r.report.Violations)
	}

	// AuditDomain on demand.
	rep, err := auditor.AuditDomain(bad)
	if err != nil || rep.Allowed() {
		t.Fatalf("AuditDomain(%s) = %+v, %v", bad, rep, err)
	}
}
