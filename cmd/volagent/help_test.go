package main

import (
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// TestHelpGroups: volagent --help lists each command under what it needs:
// the local image tools, the daemon's clients, or the libvirt hook.
func TestHelpGroups(t *testing.T) {
	stdout, stderr, code := runVolagent(t, "--help")
	if code != exitOK {
		t.Fatalf("--help: exit %d: %s", code, stderr)
	}
	want := map[string]string{
		"check": "Image tools (local, no daemon):", "create": "Image tools (local, no daemon):",
		"export": "Image tools (local, no daemon):", "import": "Image tools (local, no daemon):",
		"inspect": "Image tools (local, no daemon):",
		"volumes": "Daemon clients (D-Bus, to volagentd):", "overlay": "Daemon clients (D-Bus, to volagentd):",
		"jobs": "Daemon clients (D-Bus, to volagentd):", "pools": "Daemon clients (D-Bus, to volagentd):",
		"hook": "Integration:",
	}
	got := map[string]string{}
	heading := ""
	for _, line := range strings.Split(stdout, "\n") {
		switch {
		case strings.HasSuffix(line, ":") && !strings.HasPrefix(line, " "):
			heading = line
		case strings.HasPrefix(line, "  ") && heading != "":
			if f := strings.Fields(line); len(f) > 0 {
				got[f[0]] = heading
			}
		}
	}
	for name, h := range want {
		if got[name] != h {
			t.Errorf("%s is under %q, want %q:\n%s", name, got[name], h, stdout)
		}
	}
}

// TestJSONEverywhere: every command that prints data has --json. The
// exceptions print no report: export writes the image's bytes, the hook
// answers libvirt with its exit status, and overlay and hook only group.
func TestJSONEverywhere(t *testing.T) {
	noData := map[string]bool{
		"volagent export": true, "volagent hook": true, "volagent hook qemu": true, "volagent overlay": true,
		"volagent help": true, "volagent completion": true,
	}
	var walk func(c *cobra.Command)
	n := 0
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			path := sub.CommandPath()
			if !noData[path] && !strings.HasPrefix(path, "volagent completion ") {
				n++
				if sub.Flags().Lookup("json") == nil {
					t.Errorf("%s prints data but has no --json", path)
				}
			}
			walk(sub)
		}
	}
	walk(rootCmd)
	if n < 8 { // check create import inspect volumes, volumes import, overlay create, jobs
		t.Errorf("only %d commands were checked; the walk missed some", n)
	}
}
