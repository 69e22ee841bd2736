package dbusapi

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/dbusapi/dbustest"
	"github.com/volagent/volagent/internal/testutil"
)

// allowEveryone is an Authorizer that lets every caller change state, to
// show that CheckDomain's root-only rule does not depend on it (the
// volagent group and polkit pass the Authorizer, not CheckDomain).
type allowEveryone struct{}

func (allowEveryone) Authorize(context.Context, *dbus.Conn, string, bool) (backend.Caller, *dbus.Error) {
	return backend.Caller{UID: 12345}, nil
}

func checkDomainXML(name, disk string) string {
	return fmt.Sprintf("<domain type='kvm'><name>%s</name><devices>%s</devices></domain>", name, disk)
}

func TestCheckDomainOverTheBus(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	image := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(image, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	good := checkDomainXML("good", fmt.Sprintf("<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='%s'/><target dev='vda'/></disk>", image))
	bad := checkDomainXML("bad", fmt.Sprintf("<disk type='file' device='disk'><driver name='qemu'/><source file='%s'/><target dev='vda'/></disk>", image))

	t.Run("root", func(t *testing.T) {
		h := startServer(t, false)
		var allowed bool
		var reportJSON string
		if err := h.call(ManagerPath, ManagerIface+".CheckDomain", good, noOptions()).Store(&allowed, &reportJSON); err != nil {
			t.Fatal(err)
		}
		var rep backend.DomainReport
		if err := json.Unmarshal([]byte(reportJSON), &rep); err != nil {
			t.Fatalf("report is not JSON: %v\n%s", err, reportJSON)
		}
		if !allowed || rep.Domain != "good" || len(rep.Disks) != 1 || rep.Disks[0].Target != "vda" || len(rep.Violations) != 0 {
			t.Fatalf("good domain: allowed %v, report %s", allowed, reportJSON)
		}
		if err := h.call(ManagerPath, ManagerIface+".CheckDomain", bad, noOptions()).Store(&allowed, &reportJSON); err != nil {
			t.Fatal(err)
		}
		if allowed || !strings.Contains(reportJSON, backend.CodeDriverTypeMissing) {
			t.Fatalf("bad domain: allowed %v, report %s", allowed, reportJSON)
		}
		// The hook tells unreadable XML from an unreachable daemon by
		// this error name.
		wantError(t, h.call(ManagerPath, ManagerIface+".CheckDomain", "<domain", noOptions()).Err, ErrorInvalidArgument, "domain")
		wantError(t, h.call(ManagerPath, ManagerIface+".CheckDomain", good, map[string]dbus.Variant{"force": dbus.MakeVariant(true)}).Err, ErrorInvalidArgument, `unknown option "force"`)
		wantError(t, h.call(ManagerPath, ManagerIface+".CheckDomain", strings.Repeat(" ", maxDomainXML+1), noOptions()).Err, ErrorInvalidArgument, "domain_xml")
		wantError(t, h.call(ManagerPath, ManagerIface+".CheckDomain", good).Err, "org.freedesktop.DBus.Error.InvalidArgs", "(sa{sv})")
	})

	t.Run("the bus policy keeps others out", func(t *testing.T) {
		h := startServer(t, false)
		_, errOut, err := h.bus.Busctl(t, dbustest.NobodyUID, "call", BusName, string(ManagerPath), ManagerIface, "CheckDomain", "sa{sv}", good, "0")
		if err == nil || !strings.Contains(errOut, "Access denied") {
			t.Errorf("CheckDomain as nobody: %v %s", err, errOut)
		}
		if n := h.fake.mutatingCalls(); n != 0 {
			t.Errorf("%d calls reached the backend", n)
		}
	})

	t.Run("the daemon refuses every UID but 0", func(t *testing.T) {
		// An open bus and an Authorizer that allows everyone (as the
		// volagent group or polkit would): CheckDomain still refuses.
		bus := dbustest.Start(t, dbustest.Options{Policies: []string{policyFile}, AllowAll: true})
		fake := newFakeBackend()
		srv := NewServer(fake, Options{Authorizer: allowEveryone{}, JobRetention: time.Minute, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		conn, err := dbus.Connect(bus.Address, dbus.WithHandler(srv))
		if err != nil {
			t.Fatal(err)
		}
		srv.Start(conn)
		t.Cleanup(func() { srv.Stop(); conn.Close() })
		if reply, err := conn.RequestName(BusName, dbus.NameFlagDoNotQueue); err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
			t.Fatalf("RequestName: %v %v", reply, err)
		}
		_, errOut, err := bus.Busctl(t, dbustest.NobodyUID, "call", BusName, string(ManagerPath), ManagerIface, "CheckDomain", "sa{sv}", good, "0")
		if err == nil || !strings.Contains(errOut, "only root may") {
			t.Errorf("CheckDomain as nobody on an open bus: %v %s", err, errOut)
		}
		if n := fake.mutatingCalls(); n != 0 {
			t.Errorf("%d refused calls reached the backend", n)
		}
		out, errOut, err := bus.Busctl(t, 0, "call", BusName, string(ManagerPath), ManagerIface, "CheckDomain", "sa{sv}", good, "0")
		if err != nil || !strings.HasPrefix(out, "bs true") {
			t.Errorf("CheckDomain as root: %v %s %s", err, out, errOut)
		}
	})
}
