package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volagent/volagent/backend"
)

// TestHookRefusesMigrationOfSharedVolumes: "migrate begin" of a domain with
// a disk on a shared pool is refused, in audit mode too, with the reason;
// the same domain's start is judged by the policy alone.
func TestHookRefusesMigrationOfSharedVolumes(t *testing.T) {
	conf := filepath.Join(t.TempDir(), "volagent.toml")
	if err := os.WriteFile(conf, []byte(`
[[pool]]
name = "san"
type = "lvm"
volume_group = "vgsanhooktest"
activation = "device-mapper"
shared = true
`), 0o600); err != nil {
		t.Fatal(err)
	}
	opts := defaultHookOptions()
	opts.config, opts.offline, opts.mode = conf, true, "audit"
	xml := "<domain type='kvm'><name>vm</name><devices><disk type='block' device='disk'><driver name='qemu' type='qcow2'/>" +
		"<source dev='/dev/vgsanhooktest/vm'/><target dev='vda' bus='virtio'/></disk></devices></domain>"

	var stderr bytes.Buffer
	err := runHookQemu(context.Background(), opts, []string{"vm", "migrate", "begin", "-"}, strings.NewReader(xml), &stderr)
	if hookExitCode(err) != exitHookRefused {
		t.Fatalf("migrate: exit status %d (%v), want %d\n%s", hookExitCode(err), err, exitHookRefused, stderr.String())
	}
	if !strings.Contains(stderr.String(), backend.CodeSharedMigration) || !strings.Contains(stderr.String(), `shared pool "san"`) ||
		!strings.Contains(err.Error(), "live migration refused") {
		t.Fatalf("migrate: %v\n%s: want the disk, the pool and why", err, stderr.String())
	}

	stderr.Reset()
	if err := runHookQemu(context.Background(), opts, []string{"vm", "prepare", "begin", "-"}, strings.NewReader(xml), &stderr); err != nil {
		t.Fatalf("prepare (audit mode): %v\n%s", err, stderr.String())
	}
	if strings.Contains(stderr.String(), backend.CodeSharedMigration) {
		t.Fatalf("prepare: %s", stderr.String())
	}
}
