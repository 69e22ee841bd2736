package backend

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseConfigShared(t *testing.T) {
	data := `
[hosts]
1 = "alpha"
2 = "beta.example"

[[pool]]
name = "san"
type = "lvm"
volume_group = "vgsan"
activation = "device-mapper"
shared = true

[[pool]]
name = "local"
type = "lvm"
volume_group = "vg0"
activation = "device-mapper"
`
	cfg, err := ParseConfig([]byte(data), "volagent.toml")
	if err != nil {
		t.Fatal(err)
	}
	san, local := cfg.Pools[0], cfg.Pools[1]
	if !san.Shared || san.LockType != LockSanlock {
		t.Errorf("shared pool: Shared %v LockType %q, want true %q (the default)", san.Shared, san.LockType, LockSanlock)
	}
	if local.Shared || local.LockType != "" {
		t.Errorf("local pool: Shared %v LockType %q, want false \"\"", local.Shared, local.LockType)
	}
	if len(cfg.Hosts) != 2 || cfg.Hosts[1] != "alpha" || cfg.Hosts[2] != "beta.example" {
		t.Errorf("hosts = %v", cfg.Hosts)
	}
	m := &Manager{cfg: cfg}
	if got := m.hostName(2); got != "beta.example" {
		t.Errorf("hostName(2) = %q", got)
	}
	if got := m.hostName(7); got != "host_id 7" {
		t.Errorf("hostName(7) = %q, want the sanlock host id", got)
	}
}

func TestParseConfigSharedBad(t *testing.T) {
	const pool = "[[pool]]\nname = \"san\"\ntype = \"lvm\"\nvolume_group = \"vgsan\"\n"
	cases := []struct{ name, data, want string }{
		{"dlm", pool + "activation = \"device-mapper\"\nshared = true\nlock_type = \"dlm\"\n",
			`pool[0] ("san").lock_type: "dlm": volagent supports shared volume groups with "sanlock" only`},
		{"unknown lock type", pool + "activation = \"device-mapper\"\nshared = true\nlock_type = \"flock\"\n", `lock_type: "flock": want "sanlock"`},
		{"loop activation", pool + "activation = \"loop\"\nshared = true\n", `activation: "loop": a shared pool needs "device-mapper"`},
		{"lock type without shared", pool + "activation = \"device-mapper\"\nlock_type = \"sanlock\"\n", `lock_type: "sanlock": only a shared pool (shared = true)`},
		{"loop pool shared", "[[pool]]\nname = \"l\"\ntype = \"loop\"\ndirectory = \"/p\"\nshared = true\n", `shared: only lvm pools can be shared`},
		{"host id zero", "[hosts]\n0 = \"a\"\n", `hosts.0: want a sanlock host_id from 1 to 2000`},
		{"host id too large", "[hosts]\n2001 = \"a\"\n", `hosts.2001: want a sanlock host_id`},
		{"host id not a number", "[hosts]\nalpha = \"a\"\n", `hosts.alpha: want a sanlock host_id`},
		{"host id leading zero", "[hosts]\n01 = \"a\"\n", `hosts.01: want a sanlock host_id`},
		{"host name", "[hosts]\n1 = \"a b\"\n", `hosts.1: "a b": want 1 to 64 characters`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(c.data), "volagent.toml")
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q: want ErrInvalidArgument containing %q", err, c.want)
			}
		})
	}
}

func TestMigrationRefusal(t *testing.T) {
	cfg, err := ParseConfig([]byte(`
[[pool]]
name = "san"
type = "lvm"
volume_group = "vg-san"
activation = "device-mapper"
shared = true

[[pool]]
name = "local"
type = "lvm"
volume_group = "vg0"
activation = "device-mapper"
`), "volagent.toml")
	if err != nil {
		t.Fatal(err)
	}
	disk := func(target, src string) string {
		return "<disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='" + src + "'/><target dev='" + target + "'/></disk>"
	}
	domain := func(disks ...string) []byte {
		return []byte("<domain type='kvm'><name>vm1</name><devices>" + strings.Join(disks, "") + "</devices></domain>")
	}
	got := MigrationRefusal(cfg, domain(disk("vda", "/dev/vg-san/vm1"), disk("vdb", "/dev/vg0/data"), disk("vdc", "/dev/mapper/vg--san-scratch")), nil)
	if len(got) != 2 || got[0].Disk != "vda" || got[1].Disk != "vdc" {
		t.Fatalf("refusals %+v: want vda and vdc (the shared pool's), not vdb", got)
	}
	for _, v := range got {
		if v.Code != CodeSharedMigration || !strings.Contains(v.Message, `shared pool "san"`) || !strings.Contains(v.Message, "live migration is refused") {
			t.Errorf("refusal %+v: want code %s naming the pool and saying why", v, CodeSharedMigration)
		}
	}
	// A backing image on the shared pool counts too (the report's chain).
	rep := &DomainReport{Disks: []DiskReport{{Target: "vdb", Chain: []ChainLink{{Path: "/dev/vg0/data"}, {Path: "/dev/vg-san/base"}}}}}
	if got := MigrationRefusal(cfg, domain(disk("vdb", "/dev/vg0/data")), rep); len(got) != 1 || got[0].Image != "/dev/vg-san/base" {
		t.Fatalf("backing on the shared pool: %+v", got)
	}
	if got := MigrationRefusal(cfg, domain(disk("vdb", "/dev/vg0/data")), nil); len(got) != 0 {
		t.Fatalf("a domain without shared volumes refused: %+v", got)
	}
}

func TestSharedVolumeOf(t *testing.T) {
	cfg := &Config{Pools: []PoolConfig{
		{Name: "san", Type: PoolLVM, VolumeGroup: "vgsan", Shared: true},
		{Name: "local", Type: PoolLVM, VolumeGroup: "vg0"},
	}}
	// A request link to a volume that is not active here: the link
	// dangles, its name says the volume.
	dir := t.TempDir()
	link := filepath.Join(dir, "vm1")
	if err := os.Symlink("/dev/vgsan/vm1", link); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{"/dev/vgsan/vm1": "san/vm1", link: "san/vm1", "/dev/vg0/data": "", "/dev/vgsan": "", "/dev/vgsan/a/b": ""} {
		pool, name, ok := sharedVolumeOf(cfg, path)
		got := ""
		if ok {
			got = pool + "/" + name
		}
		if got != want {
			t.Errorf("sharedVolumeOf(%q) = %q, want %q", path, got, want)
		}
	}
}
