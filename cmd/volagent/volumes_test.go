package main

import (
	"encoding/json"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/dbusapi/dbustest"
	"github.com/volagent/volagent/internal/testutil"
)

// listOnlyBackend serves a fixed set of volumes; `volagent volumes` only
// reads, so every other method of dbusapi.Backend is left nil (a call
// would panic and fail the test).
type listOnlyBackend struct {
	dbusapi.Backend
	pools   []backend.PoolInfo
	volumes []backend.VolumeInfo
}

func (b *listOnlyBackend) Pools() []backend.PoolInfo     { return b.pools }
func (b *listOnlyBackend) Volumes() []backend.VolumeInfo { return b.volumes }
func (b *listOnlyBackend) Jobs() []backend.JobInfo       { return nil }
func (b *listOnlyBackend) Subscribe() (<-chan backend.Event, func()) {
	return make(chan backend.Event), func() {}
}

// `volagent volumes` shows why the daemon will not use a volume: a PROBLEM
// column in the table ("-" for a usable one, control characters from a
// hostile header escaped) and "problem" in --json. Real dbus-daemon, the
// real adapter, the real binary.
func TestVolumesShowProblem(t *testing.T) {
	testutil.RequireRoot(t) // the bus policy lets only root own the name
	bus := dbustest.Start(t, dbustest.Options{Policies: []string{busPolicyFile}})
	const problem = "its qcow2 header is refused: unsafe backing file name: backing_file = \"\x1b]0;owned\a\""
	b := &listOnlyBackend{
		pools: []backend.PoolInfo{{Name: "fast", Type: backend.PoolLoop, Policy: backend.PolicyEnforce}},
		volumes: []backend.VolumeInfo{
			{ID: backend.VolumeID("fast", "good"), Name: "good", Pool: "fast", Format: "qcow2", Role: backend.RoleBase, VirtualSize: 1 << 30, DevicePath: "/dev/loop8", ActiveOn: "hostb"},
			{ID: backend.VolumeID("fast", "bad"), Name: "bad", Pool: "fast", Format: "qcow2", Role: backend.RoleOverlay, DevicePath: "/dev/loop9", Problem: problem},
		},
	}
	srv := dbusapi.NewServer(b, dbusapi.Options{Version: "test", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	conn, err := dbus.Connect(bus.Address, dbus.WithHandler(srv))
	if err != nil {
		t.Fatal(err)
	}
	srv.Start(conn)
	t.Cleanup(func() { srv.Stop(); conn.Close() })
	if reply, err := conn.RequestName(dbusapi.BusName, dbus.NameFlagDoNotQueue); err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("RequestName: %v %v", reply, err)
	}

	out, errOut, code := runVolagent(t, "volumes", "--bus-address", bus.Address)
	if code != 0 {
		t.Fatalf("volagent volumes: exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasSuffix(strings.TrimSpace(lines[0]), "BACKING  ACTIVE  PROBLEM") {
		t.Fatalf("volagent volumes: want a header ending in ACTIVE PROBLEM and two rows:\n%s", out)
	}
	for _, l := range lines[1:] {
		fields := strings.Fields(l)
		switch fields[0] {
		case "good":
			if fields[len(fields)-1] != "-" {
				t.Errorf("usable volume: PROBLEM is not \"-\": %q", l)
			}
			if fields[len(fields)-2] != "hostb" {
				t.Errorf("volume active on another host: ACTIVE is not \"hostb\": %q", l)
			}
		case "bad":
			if !strings.Contains(l, `"its qcow2 header is refused: unsafe backing file name: backing_file = \"\x1b]0;owned\a\""`) {
				t.Errorf("volume with a problem: PROBLEM missing or not escaped: %q", l)
			}
		default:
			t.Errorf("unexpected row %q", l)
		}
	}
	if strings.ContainsAny(out, "\x1b\a") {
		t.Errorf("volagent volumes printed raw control characters from a problem text:\n%q", out)
	}

	out, errOut, code = runVolagent(t, "volumes", "--json", "--bus-address", bus.Address)
	if code != 0 {
		t.Fatalf("volagent volumes --json: exit %d: %s", code, errOut)
	}
	var vols []map[string]any
	if err := json.Unmarshal([]byte(out), &vols); err != nil {
		t.Fatalf("volumes --json: %v\n%s", err, out)
	}
	got := map[string]any{}
	for _, v := range vols {
		p, ok := v["problem"]
		if !ok {
			t.Errorf("volumes --json: %v has no \"problem\" field", v["name"])
		}
		got[v["name"].(string)] = p
	}
	if got["good"] != "" || got["bad"] != problem {
		t.Errorf("volumes --json problems = %q, want good \"\" and bad %q", got, problem)
	}
}
