package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
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
	"github.com/volagent/volagent/dbusapi/dbustest"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// hookImages are real images made by qemu-img for the hook tests.
type hookImages struct {
	root, outside string
	base          string // raw, under root
	overlay       string // qcow2 over base, backing format recorded
	noFormat      string // qcow2 over base, no backing format recorded
	dataFile      string // qcow2 with an external data file, no backing
	probedData    string // qcow2 over dataFile, no backing format recorded
	dataFileRaw   string // the external data file (a "host file")
}

func makeHookImages(t *testing.T) *hookImages {
	t.Helper()
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	im := &hookImages{root: filepath.Join(dir, "images"), outside: filepath.Join(dir, "outside")}
	for _, d := range []string{im.root, im.outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	im.base = filepath.Join(im.root, "base.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", im.base, "64M")
	im.overlay = filepath.Join(im.root, "overlay.qcow2")
	testutil.MakeQcow2(t, im.overlay, "", "", im.base, "raw")
	im.noFormat = filepath.Join(im.root, "noformat.qcow2")
	testutil.MakeQcow2(t, im.noFormat, "", "", im.base, "raw")
	hookPatchBackingFormat(t, im.noFormat)
	im.dataFileRaw = filepath.Join(im.outside, "host-file.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", im.dataFileRaw, "64M")
	im.dataFile = filepath.Join(im.root, "datafile.qcow2")
	testutil.MakeQcow2(t, im.dataFile, "data_file="+im.dataFileRaw+",data_file_raw=on", "64M", "", "")
	im.probedData = filepath.Join(im.root, "probed-datafile.qcow2")
	testutil.MakeQcow2(t, im.probedData, "", "", im.dataFile, "qcow2")
	hookPatchBackingFormat(t, im.probedData)
	return im
}

// hookPatchBackingFormat turns a qemu-made overlay's backing-format
// extension into an unknown one, so it records a backing file but no
// format, as images made by old tools do.
func hookPatchBackingFormat(t *testing.T, path string) {
	t.Helper()
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
	if out := testutil.QemuImg(t, "info", "-f", "qcow2", "-U", "--output=json", path); bytes.Contains(out, []byte("backing-filename-format")) {
		t.Fatalf("%s still records a backing format: %s", path, out)
	}
}

// failingReader fails the test if the hook reads stdin.
type failingReader struct{ t *testing.T }

func (r failingReader) Read([]byte) (int, error) {
	r.t.Error("the hook read stdin for an operation it does not check")
	return 0, errors.New("unexpected read")
}

func hookExitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return exitFailure
}

func defaultHookOptions() hookOptions {
	return hookOptions{config: "/nonexistent/volagent.toml", mode: "enforce", unreachable: unreachableRefuseManaged, timeout: 10 * time.Second}
}

func TestHookQemuSkipsOtherOperations(t *testing.T) {
	for _, args := range [][]string{
		{"vm", "start", "begin", "-"}, {"vm", "started", "begin", "-"}, {"vm", "stopped", "end", "-"},
		{"vm", "release", "end", "-"}, {"vm", "prepare", "end", "-"}, {"vm", "reconnect", "begin", "-"},
		{"vm", "attach", "begin", "-"}, {"vm", "migrate", "end", "-"},
	} {
		var stderr bytes.Buffer
		if err := runHookQemu(context.Background(), defaultHookOptions(), args, failingReader{t}, &stderr); err != nil || stderr.Len() > 0 {
			t.Errorf("hook %q: %v, stderr %q", args, err, stderr.String())
		}
	}
}

func TestHookQemuLocal(t *testing.T) {
	im := makeHookImages(t)
	opts := defaultHookOptions()
	opts.offline = true
	opts.allowBacking = []string{im.root}
	cases := []struct {
		name string
		xml  string
		want string // a violation code in stderr; "" for allowed
	}{
		{"good", testutil.DomainXML("vm", testutil.FileDiskXML("vda", "qcow2", im.overlay), testutil.FileDiskXML("vdb", "raw", im.base)), ""},
		{"no driver type", testutil.DomainXML("vm", testutil.FileDiskXML("vda", "", im.overlay)), backend.CodeDriverTypeMissing},
		{"no backing format", testutil.DomainXML("vm", testutil.FileDiskXML("vda", "qcow2", im.noFormat)), "backing-format-missing"},
		{"probed data file", testutil.DomainXML("vm", testutil.FileDiskXML("vda", "qcow2", im.probedData)), "backing-format-missing"},
		{"data file", testutil.DomainXML("vm", testutil.FileDiskXML("vda", "qcow2", im.dataFile)), "data-file"},
		{"not XML", "this is not a domain", "domain XML"},
	}
	for _, tc := range cases {
		for _, op := range []string{"prepare", "restore", "migrate"} {
			t.Run(tc.name+"/"+op, func(t *testing.T) {
				var stderr bytes.Buffer
				err := runHookQemu(context.Background(), opts, []string{"vm", op, "begin", "-"}, strings.NewReader(tc.xml), &stderr)
				if tc.want == "" {
					if err != nil {
						t.Fatalf("allowed domain refused: %v\n%s", err, stderr.String())
					}
					return
				}
				if hookExitCode(err) != exitHookRefused {
					t.Fatalf("exit status %d (%v), want %d", hookExitCode(err), err, exitHookRefused)
				}
				if !strings.Contains(stderr.String()+err.Error(), tc.want) {
					t.Fatalf("stderr %q, error %v: no %q", stderr.String(), err, tc.want)
				}
			})
		}
	}

	t.Run("audit mode allows", func(t *testing.T) {
		audit := opts
		audit.mode = "audit"
		var stderr bytes.Buffer
		err := runHookQemu(context.Background(), audit, []string{"vm", "prepare", "begin", "-"}, strings.NewReader(testutil.DomainXML("vm", testutil.FileDiskXML("vda", "", im.overlay))), &stderr)
		if err != nil || !strings.Contains(stderr.String(), backend.CodeDriverTypeMissing) {
			t.Fatalf("audit: %v, stderr %q", err, stderr.String())
		}
	})

	t.Run("binary", func(t *testing.T) {
		// The real process boundary: flags before libvirt's arguments, the
		// exit status, one line per violation on stderr.
		cmd := exec.Command(binaryUnderTest(t), "hook", "qemu", "--offline", "--config", "/nonexistent", "--allow-backing", im.root, "vm", "prepare", "begin", "-")
		cmd.Stdin = strings.NewReader(testutil.DomainXML("vm", testutil.FileDiskXML("vda", "", im.overlay), testutil.FileDiskXML("vdb", "qcow2", im.noFormat)))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != exitHookRefused {
			t.Fatalf("hook: %v, want exit status %d\n%s", err, exitHookRefused, stderr.String())
		}
		lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
		if len(lines) != 3 || !strings.Contains(lines[0], "vda") || !strings.Contains(lines[1], "vdb") {
			t.Fatalf("stderr lines %q", lines)
		}
	})
}

// fakeCheckDomainDaemon answers Manager.CheckDomain on a private bus with
// the real policy, as the daemon does.
type fakeCheckDomainDaemon struct {
	policy backend.DomainPolicyOptions
	calls  int
}

func (d *fakeCheckDomainDaemon) CheckDomain(domainXML string, options map[string]dbus.Variant) (bool, string, *dbus.Error) {
	d.calls++
	rep, err := backend.CheckDomain([]byte(domainXML), d.policy)
	if err != nil {
		return false, "", dbus.NewError(dbusapi.ErrorPrefix+"InvalidArgument", []any{err.Error()})
	}
	b, _ := json.Marshal(rep)
	return rep.Allowed(), string(b), nil
}

func TestHookQemuDaemon(t *testing.T) {
	testutil.RequireRoot(t)
	im := makeHookImages(t)
	bus := dbustest.Start(t, dbustest.Options{AllowAll: true})

	// A configuration whose loop pool holds one "volume".
	poolDir := filepath.Join(t.TempDir(), "pool")
	if err := os.Mkdir(poolDir, 0o755); err != nil {
		t.Fatal(err)
	}
	managedVol := filepath.Join(poolDir, "vm1.img")
	testutil.MakeQcow2(t, managedVol, "", "", im.base, "raw")
	config := filepath.Join(t.TempDir(), "volagent.toml")
	if err := os.WriteFile(config, []byte(fmt.Sprintf("[[pool]]\nname = \"files\"\ntype = \"loop\"\ndirectory = %q\nbacking_roots = [%q]\n", poolDir, im.root)), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := defaultHookOptions()
	opts.busAddress = bus.Address
	opts.config = config

	goodManaged := testutil.DomainXML("vm", testutil.FileDiskXML("vda", "qcow2", managedVol))
	badManaged := testutil.DomainXML("vm", testutil.FileDiskXML("vda", "", managedVol))
	goodOther := testutil.DomainXML("vm", testutil.FileDiskXML("vda", "qcow2", im.overlay))
	badOther := testutil.DomainXML("vm", testutil.FileDiskXML("vda", "qcow2", im.noFormat))
	hook := func(t *testing.T, opts hookOptions, xml string) (int, string) {
		t.Helper()
		var stderr bytes.Buffer
		err := runHookQemu(context.Background(), opts, []string{"vm", "prepare", "begin", "-"}, strings.NewReader(xml), &stderr)
		return hookExitCode(err), stderr.String()
	}

	t.Run("unreachable", func(t *testing.T) {
		// The bus runs but nothing owns org.volagent.VolAgent1.
		for _, tc := range []struct {
			mode, xml string
			want      int
		}{
			{unreachableRefuseManaged, goodManaged, exitHookRefused},
			{unreachableRefuseManaged, goodOther, 0},
			{unreachableRefuseManaged, badOther, 0},
			{unreachableRefuseAll, goodOther, exitHookRefused},
			{unreachableAllow, badManaged, 0},
			{unreachableCheckLocally, goodManaged, 0},
			{unreachableCheckLocally, badManaged, exitHookRefused},
			{unreachableCheckLocally, badOther, exitHookRefused},
		} {
			o := opts
			o.unreachable = tc.mode
			code, stderr := hook(t, o, tc.xml)
			if code != tc.want || !strings.Contains(stderr, "cannot ask the volagent daemon") {
				t.Errorf("--when-unreachable=%s: exit %d, want %d\n%s", tc.mode, code, tc.want, stderr)
			}
		}
		// No bus at all is unreachable too.
		o := opts
		o.busAddress = "unix:path=" + filepath.Join(t.TempDir(), "no-bus")
		if code, stderr := hook(t, o, goodManaged); code != exitHookRefused || !strings.Contains(stderr, "volagent volume") {
			t.Errorf("no bus: exit %d\n%s", code, stderr)
		}
		// Without a configuration, a loop pool's file is known by its metadata.
		o.config = "/nonexistent/volagent.toml"
		if code, _ := hook(t, o, goodManaged); code != 0 {
			t.Errorf("no configuration, file without volagent metadata: exit %d, want 0", code)
		}
	})

	t.Run("daemon verdict", func(t *testing.T) {
		conn, err := dbus.Connect(bus.Address)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		daemon := &fakeCheckDomainDaemon{policy: backend.DomainPolicyOptions{AllowedRoots: []string{im.root}, ManagedDevices: []string{managedVol}}}
		if err := conn.ExportMethodTable(map[string]any{"CheckDomain": daemon.CheckDomain}, dbusapi.ManagerPath, dbusapi.ManagerIface); err != nil {
			t.Fatal(err)
		}
		if reply, err := conn.RequestName(dbusapi.BusName, dbus.NameFlagDoNotQueue); err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
			t.Fatalf("RequestName: %v, %v", reply, err)
		}
		for _, tc := range []struct {
			name, xml string
			want      int
			line      string
		}{
			{"good managed", goodManaged, 0, ""},
			{"good other", goodOther, 0, ""},
			{"bad managed", badManaged, exitHookRefused, backend.CodeDriverTypeMissing},
			{"bad other", badOther, exitHookRefused, "backing-format-missing"},
			{"not XML", "<domain", exitHookRefused, "refused the domain XML"},
		} {
			code, stderr := hook(t, opts, tc.xml)
			if code != tc.want || strings.Contains(stderr, "cannot ask") {
				t.Errorf("%s: exit %d, want %d\n%s", tc.name, code, tc.want, stderr)
			}
			if tc.line != "" && code != 0 && !strings.Contains(stderr, tc.line) && !strings.Contains(fmt.Sprint(runHookErr(opts, tc.xml)), tc.line) {
				t.Errorf("%s: no %q in %q", tc.name, tc.line, stderr)
			}
		}
		if daemon.calls < 5 {
			t.Errorf("the daemon was called %d times, want at least 5", daemon.calls)
		}
	})
}

func runHookErr(opts hookOptions, xml string) error {
	return runHookQemu(context.Background(), opts, []string{"vm", "prepare", "begin", "-"}, strings.NewReader(xml), &bytes.Buffer{})
}

// blockNode is the part of query-named-block-nodes the test reads.
type blockNode struct {
	NodeName string `json:"node-name"`
	Drv      string `json:"drv"`
	File     string `json:"file"`
	Image    struct {
		Format                string `json:"format"`
		BackingFilenameFormat string `json:"backing-filename-format"`
		BackingFilename       string `json:"backing-filename"`
	} `json:"image"`
}

func queryNamedBlockNodes(t *testing.T, domain string) []blockNode {
	t.Helper()
	out := testutil.MustVirsh(t, "qemu-monitor-command", domain, `{"execute":"query-named-block-nodes"}`)
	var reply struct {
		Return []blockNode `json:"return"`
	}
	if err := json.Unmarshal([]byte(out), &reply); err != nil {
		t.Fatalf("query-named-block-nodes: %v: %s", err, out)
	}
	return reply.Return
}

// TestHookDomainStartsKVM starts real KVM domains through a real libvirtd
// with the hook installed: a domain on a good overlay starts with its chain
// opened by explicit formats; the hook refuses a disk without a driver
// type, an overlay that records no backing format, and an overlay over a
// qcow2 with an external data file that libvirt 9.0 would probe and start.
func TestHookDomainStartsKVM(t *testing.T) {
	testutil.RequireRoot(t)
	bin := binaryUnderTest(t)
	im := makeHookImages(t)
	modeFile := filepath.Join(t.TempDir(), "hook-mode")
	if err := os.WriteFile(modeFile, []byte("enforce"), 0o644); err != nil {
		t.Fatal(err)
	}
	// libvirt runs the script anew at every step, so the test can switch
	// it to audit mode to show what libvirt does without the hook.
	script := fmt.Sprintf("#!/bin/sh\nexec %s hook qemu --offline --config /nonexistent/volagent.toml --allow-backing %s --mode \"$(cat %s)\" \"$@\"\n", bin, im.root, modeFile)
	testutil.StartLibvirtd(t, testutil.LibvirtdOptions{Hooks: map[string]string{"volagent-test": script}})

	start := func(t *testing.T, name string, disks ...string) (string, error) {
		t.Helper()
		path := filepath.Join(t.TempDir(), name+".xml")
		if err := os.WriteFile(path, []byte(testutil.DomainXML(name, disks...)), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _, _ = testutil.Virsh("destroy", name) })
		_, stderr, err := testutil.Virsh("create", path)
		return stderr, err
	}

	t.Run("good overlay starts with explicit formats", func(t *testing.T) {
		name := testutil.TestDomainPrefix + "good"
		if stderr, err := start(t, name, testutil.FileDiskXML("vda", "qcow2", im.overlay)); err != nil {
			t.Fatalf("virsh create: %v\n%s", err, stderr)
		}
		if state := strings.TrimSpace(testutil.MustVirsh(t, "domstate", name)); state != "running" {
			t.Fatalf("domain state %q", state)
		}
		var top, bottom *blockNode
		nodes := queryNamedBlockNodes(t, name)
		for i, n := range nodes {
			switch {
			case n.Drv == "qcow2" && n.File == im.overlay:
				top = &nodes[i]
			case n.Drv == "raw" && n.File == im.base:
				bottom = &nodes[i]
			case n.Drv == "file" || n.Drv == "host_device":
			default:
				t.Errorf("unexpected node %+v", n)
			}
		}
		if top == nil || bottom == nil {
			t.Fatalf("no qcow2 node for %s over a raw node for %s: %+v", im.overlay, im.base, nodes)
		}
		if top.Image.BackingFilenameFormat != "raw" || top.Image.BackingFilename != im.base {
			t.Fatalf("overlay node records backing %q format %q", top.Image.BackingFilename, top.Image.BackingFilenameFormat)
		}
	})

	refusals := []struct {
		name, disk, code string
	}{
		// libvirt's QEMU driver fills in type='raw' before the hook runs, so
		// a qcow2 without <driver type> reaches it as a raw disk that
		// starts with a qcow2 header.
		{"no-driver-type", testutil.FileDiskXML("vda", "", im.overlay), backend.CodeHeaderInRaw},
		{"no-backing-format", testutil.FileDiskXML("vda", "qcow2", im.noFormat), "backing-format-missing"},
		{"probed-data-file", testutil.FileDiskXML("vda", "qcow2", im.probedData), "backing-format-missing"},
	}
	for _, tc := range refusals {
		t.Run("refuses "+tc.name, func(t *testing.T) {
			name := testutil.TestDomainPrefix + tc.name
			stderr, err := start(t, name, tc.disk)
			if err == nil {
				t.Fatalf("libvirt started %s; the hook should have refused it", name)
			}
			if !strings.Contains(stderr, "Hook script execution failed") || !strings.Contains(stderr, tc.code) {
				t.Fatalf("virsh create failed, but not by the hook with %q: %s", tc.code, stderr)
			}
			if _, _, err := testutil.Virsh("domstate", name); err == nil {
				t.Fatalf("domain %s exists after the refusal", name)
			}
		})
	}

	t.Run("without the hook libvirt opens the data file", func(t *testing.T) {
		// The reason for the hook: in audit mode it lets the start through,
		// and libvirt probes the backing and qemu opens the host file.
		if err := os.WriteFile(modeFile, []byte("audit"), 0o644); err != nil {
			t.Fatal(err)
		}
		defer os.WriteFile(modeFile, []byte("enforce"), 0o644)
		name := testutil.TestDomainPrefix + "probed-audit"
		if stderr, err := start(t, name, testutil.FileDiskXML("vda", "qcow2", im.probedData)); err != nil {
			t.Fatalf("virsh create in audit mode: %v\n%s", err, stderr)
		}
		opened := false
		for _, n := range queryNamedBlockNodes(t, name) {
			if n.File == im.dataFileRaw {
				opened = true
			}
		}
		if !opened {
			t.Fatalf("qemu did not open the external data file %s; the probing case did not reproduce", im.dataFileRaw)
		}
	})
}
