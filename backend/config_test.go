package backend

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseConfigGood(t *testing.T) {
	data := `
[[pool]]
name = "fast"
type = "lvm"
volume_group = "vg0"
activation = "loop"
backing_roots = ["/var/lib/images/", "/srv/images"]
initial_size = "1G"
chunk_size = 268435456
policy = "audit"

[[pool]]
name = "files"
type = "loop"
directory = "/var/lib/volagent/pool/"
`
	cfg, err := ParseConfig([]byte(data), "volagent.toml")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Pools) != 2 {
		t.Fatalf("got %d pools", len(cfg.Pools))
	}
	fast, files := cfg.Pools[0], cfg.Pools[1]
	want := PoolConfig{Name: "fast", Type: PoolLVM, VolumeGroup: "vg0", Activation: "loop",
		BackingRoots: []string{"/var/lib/images", "/srv/images"}, InitialSize: 1 << 30, ChunkSize: 256 << 20, Policy: PolicyAudit}
	if !equalPool(fast, want) {
		t.Errorf("pool 0 = %+v, want %+v", fast, want)
	}
	// Defaults.
	wantFiles := PoolConfig{Name: "files", Type: PoolLoop, Directory: "/var/lib/volagent/pool",
		InitialSize: DefaultInitialSize, ChunkSize: DefaultChunkSize, Policy: PolicyEnforce}
	if !equalPool(files, wantFiles) {
		t.Errorf("pool 1 = %+v, want %+v", files, wantFiles)
	}

	// LoadConfig reads the same from a file; an empty file has no pools.
	path := filepath.Join(t.TempDir(), "volagent.toml")
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if cfg, err := LoadConfig(path); err != nil || len(cfg.Pools) != 2 {
		t.Fatalf("LoadConfig: %v, %+v", err, cfg)
	}
	if cfg, err := ParseConfig(nil, "empty.toml"); err != nil || len(cfg.Pools) != 0 {
		t.Fatalf("empty config: %v, %+v", err, cfg)
	}
	if _, err := LoadConfig(filepath.Join(t.TempDir(), "missing.toml")); err == nil {
		t.Fatal("LoadConfig of a missing file succeeded")
	}
}

func equalPool(a, b PoolConfig) bool {
	if len(a.BackingRoots) != len(b.BackingRoots) {
		return false
	}
	for i := range a.BackingRoots {
		if a.BackingRoots[i] != b.BackingRoots[i] {
			return false
		}
	}
	a.BackingRoots, b.BackingRoots = nil, nil
	return a.Name == b.Name && a.Type == b.Type && a.VolumeGroup == b.VolumeGroup && a.Activation == b.Activation &&
		a.Directory == b.Directory && a.InitialSize == b.InitialSize && a.ChunkSize == b.ChunkSize && a.Policy == b.Policy
}

func TestParseConfigLibvirt(t *testing.T) {
	cfg, err := ParseConfig([]byte("[libvirt]\nuri = \"qemu:///system\"\n"), "volagent.toml")
	if err != nil {
		t.Fatal(err)
	}
	want := LibvirtConfig{URI: "qemu:///system", RequestDir: DefaultRequestDir, ReconcileInterval: DefaultReconcileInterval, OnViolation: ViolationPause}
	if cfg.Libvirt != want {
		t.Errorf("defaults: %+v; want %+v", cfg.Libvirt, want)
	}
	cfg, err = ParseConfig([]byte("[libvirt]\nuri = \"qemu:///session\"\nrequest_dir = \"/srv/requests\"\nreconcile_interval = \"2m\"\non_violation = \"log\"\n"), "volagent.toml")
	if err != nil {
		t.Fatal(err)
	}
	want = LibvirtConfig{URI: "qemu:///session", RequestDir: "/srv/requests", ReconcileInterval: 2 * time.Minute, OnViolation: ViolationLog}
	if cfg.Libvirt != want {
		t.Errorf("explicit: %+v; want %+v", cfg.Libvirt, want)
	}
	cfg, err = ParseConfig(nil, "volagent.toml")
	if err != nil || cfg.Libvirt != (LibvirtConfig{}) {
		t.Errorf("no table: %+v, %v; want no libvirt", cfg, err)
	}
}

func TestParseConfigBad(t *testing.T) {
	const lvmPool = "[[pool]]\nname = \"ok\"\ntype = \"lvm\"\nvolume_group = \"vg0\"\nactivation = \"loop\"\n"
	cases := []struct {
		name, data string
		want       []string // substrings of the error
	}{
		{"chunk size", lvmPool + "[[pool]]\nname = \"fast\"\ntype = \"loop\"\ndirectory = \"/p\"\nchunk_size = \"12Q\"\n",
			[]string{`volagent.toml: pool[1] ("fast").chunk_size: "12Q" is not a size`}},
		{"initial size not aligned", "[[pool]]\nname = \"a\"\ntype = \"loop\"\ndirectory = \"/p\"\ninitial_size = 1000\n", []string{`pool[0] ("a").initial_size: 1000`}},
		{"initial size negative", "[[pool]]\nname = \"a\"\ntype = \"loop\"\ndirectory = \"/p\"\ninitial_size = -4096\n", []string{`initial_size: -4096`}},
		{"size wrong type", "[[pool]]\nname = \"a\"\ntype = \"loop\"\ndirectory = \"/p\"\nchunk_size = 1.5\n", []string{`chunk_size: 1.5`}},
		{"name", "[[pool]]\nname = \"bad name\"\ntype = \"loop\"\ndirectory = \"/p\"\n", []string{`pool[0] ("bad name").name: "bad name"`}},
		{"name missing", "[[pool]]\ntype = \"loop\"\ndirectory = \"/p\"\n", []string{`pool[0].name: ""`}},
		{"name too long", "[[pool]]\nname = \"" + strings.Repeat("a", 33) + "\"\ntype = \"loop\"\ndirectory = \"/p\"\n", []string{`.name:`}},
		{"duplicate", lvmPool + lvmPool, []string{`pool[1] ("ok").name: "ok" is already the name of pool[0]`}},
		{"one volume group", lvmPool + strings.Replace(lvmPool, `"ok"`, `"two"`, 1),
			[]string{`pool[1] ("two").volume_group: "vg0" is already the volume group of pool[0] ("ok")`}},
		{"one directory", "[[pool]]\nname = \"a\"\ntype = \"loop\"\ndirectory = \"/p\"\n[[pool]]\nname = \"b\"\ntype = \"loop\"\ndirectory = \"/p/\"\n",
			[]string{`pool[1] ("b").directory: "/p" is already the directory of pool[0] ("a", "/p")`}},
		{"type", "[[pool]]\nname = \"a\"\ntype = \"zfs\"\n", []string{`("a").type: "zfs"`}},
		{"type missing", "[[pool]]\nname = \"a\"\n", []string{`("a").type: missing`}},
		{"vg", "[[pool]]\nname = \"a\"\ntype = \"lvm\"\nvolume_group = \"-vg\"\nactivation = \"loop\"\n", []string{`("a").volume_group: "-vg"`}},
		{"vg missing", "[[pool]]\nname = \"a\"\ntype = \"lvm\"\nactivation = \"loop\"\n", []string{`("a").volume_group: ""`}},
		{"activation missing", "[[pool]]\nname = \"a\"\ntype = \"lvm\"\nvolume_group = \"vg\"\n", []string{`("a").activation: missing`}},
		{"activation", "[[pool]]\nname = \"a\"\ntype = \"lvm\"\nvolume_group = \"vg\"\nactivation = \"auto\"\n", []string{`("a").activation: "auto"`}},
		{"directory on lvm", lvmPool + "directory = \"/x\"\n", []string{`("ok").directory: "/x"`}},
		{"directory relative", "[[pool]]\nname = \"a\"\ntype = \"loop\"\ndirectory = \"pool\"\n", []string{`("a").directory: "pool"`}},
		{"vg on loop", "[[pool]]\nname = \"a\"\ntype = \"loop\"\ndirectory = \"/p\"\nvolume_group = \"vg\"\n", []string{`("a").volume_group: "vg"`}},
		{"activation on loop", "[[pool]]\nname = \"a\"\ntype = \"loop\"\ndirectory = \"/p\"\nactivation = \"loop\"\n", []string{`("a").activation: "loop"`}},
		{"backing root relative", lvmPool + "backing_roots = [\"/ok\", \"images\"]\n", []string{`("ok").backing_roots[1]: "images"`}},
		{"policy", lvmPool + "policy = \"warn\"\n", []string{`("ok").policy: "warn"`}},
		{"unknown key", lvmPool + "chunksize = 5\n", []string{`volagent.toml: line 6: unknown key pool.chunksize`}},
		{"unknown table", "[daemon]\nfoo = 1\n", []string{`unknown key daemon`}},
		{"libvirt uri missing", "[libvirt]\nrequest_dir = \"/r\"\n", []string{`volagent.toml: libvirt.uri: required`}},
		{"libvirt request dir relative", "[libvirt]\nuri = \"qemu:///system\"\nrequest_dir = \"requests\"\n", []string{`libvirt.request_dir: "requests"`}},
		{"libvirt interval", "[libvirt]\nuri = \"qemu:///system\"\nreconcile_interval = \"soon\"\n", []string{`libvirt.reconcile_interval: "soon"`}},
		{"libvirt interval too short", "[libvirt]\nuri = \"qemu:///system\"\nreconcile_interval = \"10ms\"\n", []string{`libvirt.reconcile_interval: "10ms"`}},
		{"libvirt on_violation", "[libvirt]\nuri = \"qemu:///system\"\non_violation = \"stop\"\n", []string{`libvirt.on_violation: "stop"`}},
		{"libvirt unknown key", "[libvirt]\nuri = \"qemu:///system\"\nurl = \"x\"\n", []string{`unknown key libvirt.url`}},
		{"syntax", "[[pool]\n", []string{`volagent.toml: line 1`}},
		{"wrong type", "[[pool]]\nname = 5\n", []string{`volagent.toml: line 2`, `name`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.data), "volagent.toml")
			if err == nil {
				t.Fatal("accepted")
			}
			mustErrIs(t, err, ErrInvalidArgument)
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestVolumeNames(t *testing.T) {
	for _, ok := range []string{"a", "vm1-disk0", "base.raw", "A_b+c", strings.Repeat("x", 64)} {
		if err := ValidateVolumeName(ok); err != nil {
			t.Errorf("%q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "../etc", "a/b", "-a", "_a", ".hidden", "a b", strings.Repeat("x", 65),
		"snapshot", "snapshot1", "pvmove0", "a_mlog", "x_rimage_0", "vm_tmeta", "é"} {
		err := ValidateVolumeName(bad)
		if err == nil {
			t.Errorf("%q accepted", bad)
			continue
		}
		mustErrIs(t, err, ErrInvalidArgument)
	}
	for _, ok := range []string{"a", "fast", "pool_1-B", strings.Repeat("p", MaxPoolNameLength)} {
		if err := ValidatePoolName(ok); err != nil {
			t.Errorf("pool name %q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "a.b", "a+b", "a b", "a/b", "..", strings.Repeat("p", MaxPoolNameLength+1)} {
		err := ValidatePoolName(bad)
		if err == nil {
			t.Errorf("pool name %q accepted", bad)
			continue
		}
		mustErrIs(t, err, ErrInvalidArgument)
	}
	id := VolumeID("pool", "name")
	if id != VolumeID("pool", "name") || id == VolumeID("poo", "lname") || !isVolumeID(id) {
		t.Errorf("VolumeID not stable or not distinct: %s", id)
	}
	for _, c := range id {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			t.Fatalf("VolumeID %q is not a D-Bus path element", id)
		}
	}
}

func TestNewManagerRefusesMixedActivation(t *testing.T) {
	cfg := &Config{Pools: []PoolConfig{
		{Name: "a", Type: PoolLVM, VolumeGroup: "vg0", Activation: "loop", InitialSize: 4096, ChunkSize: 4096},
		{Name: "b", Type: PoolLVM, VolumeGroup: "vg1", Activation: "device-mapper", InitialSize: 4096, ChunkSize: 4096},
	}}
	_, err := NewManager(cfg, ManagerOptions{})
	mustErrIs(t, err, ErrInvalidArgument)
}

// TestSubscribeSlowSubscriber: a subscriber that does not read neither
// blocks the Manager nor loses events; cancel closes its channel.
func TestSubscribeSlowSubscriber(t *testing.T) {
	m, err := NewManager(&Config{}, ManagerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	events, cancel := m.Subscribe()
	fast, cancelFast := m.Subscribe()
	defer cancelFast()
	for i := 0; i < subscriberBuffer+50; i++ {
		m.emit(Event{Kind: EventVolumeRemoved, VolumeID: "x"})
		if i < 10 {
			<-fast
		}
	}
	// Nothing is dropped for the slow subscriber (emit never blocked).
	for i := 0; i < subscriberBuffer+50; i++ {
		select {
		case <-events:
		case <-time.After(30 * time.Second):
			t.Fatalf("slow subscriber: event %d of %d never came", i, subscriberBuffer+50)
		}
	}
	cancel()
	cancel()           // idempotent
	for range events { // closed after cancel
	}
	m.Close()
	if _, ok := <-fast; ok {
		for range fast {
		}
	}
	if late, _ := m.Subscribe(); late != nil {
		if _, ok := <-late; ok {
			t.Fatal("a subscription after Close is open")
		}
	}
}

// TestJobHistory: finished jobs stay listed for the last keepFinishedJobs.
func TestJobHistory(t *testing.T) {
	m, err := NewManager(&Config{}, ManagerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var last uint64
	for i := 0; i < keepFinishedJobs+5; i++ {
		j, _ := m.startJob("import", "v", Caller{UID: 7}, 10)
		m.progress(j, 5)
		m.finishJob(j, JobSucceeded, "")
		last = j.info.ID
	}
	running, _ := m.startJob("import", "w", Caller{UID: 7}, 10)
	jobs := m.Jobs()
	if len(jobs) != keepFinishedJobs+1 || jobs[0].ID != 6 || jobs[len(jobs)-1].ID != running.info.ID {
		t.Fatalf("Jobs(): %d jobs, first %d", len(jobs), jobs[0].ID)
	}
	if _, err := m.Job(1); err == nil {
		t.Fatal("job 1 is still kept")
	}
	if info, err := m.Job(last); err != nil || info.State != JobSucceeded || info.Progress != 1 || info.Cancelable {
		t.Fatalf("Job(%d) = %+v, %v", last, info, err)
	}
	mustErrIs(t, m.CancelJob(Caller{UID: 8}, running.info.ID), ErrNotAuthorized)
	if err := m.CancelJob(Caller{UID: 0}, running.info.ID); err != nil {
		t.Fatal(err)
	}
	m.finishJob(running, JobCancelled, "cancelled")
	mustErrIs(t, m.CancelJob(Caller{UID: 0}, 99999), ErrNotFound)
}

// TestParseConfigOneDirectoryTwoNames: two names of one directory (a
// symlink) are one directory.
func TestParseConfigOneDirectoryTwoNames(t *testing.T) {
	dir := t.TempDir()
	real, link := filepath.Join(dir, "pool"), filepath.Join(dir, "alias")
	if err := os.Mkdir(real, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	data := fmt.Sprintf("[[pool]]\nname = \"a\"\ntype = \"loop\"\ndirectory = %q\n[[pool]]\nname = \"b\"\ntype = \"loop\"\ndirectory = %q\n", real, link)
	_, err := ParseConfig([]byte(data), "volagent.toml")
	if err == nil || !strings.Contains(err.Error(), `pool[1] ("b").directory`) || !strings.Contains(err.Error(), `pool[0] ("a"`) {
		t.Fatalf("two names of one directory: %v", err)
	}
	// Different directories, and one VG name per LVM pool, are fine.
	data = fmt.Sprintf("[[pool]]\nname = \"a\"\ntype = \"loop\"\ndirectory = %q\n[[pool]]\nname = \"b\"\ntype = \"loop\"\ndirectory = %q\n", real, dir)
	if _, err := ParseConfig([]byte(data), "volagent.toml"); err != nil {
		t.Fatal(err)
	}
}
