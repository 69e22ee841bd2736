package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/volagent/volagent/internal/hostile"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

func TestInspectAcceptsGoodImage(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	img := filepath.Join(dir, "overlay.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "raw", base, "8M")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", img)

	stdout, stderr, code := runVolagent(t, "inspect", "--json", "--allow-backing", dir, img)
	if code != exitOK {
		t.Fatalf("exit %d; want 0\nstdout: %s\nstderr: %s", code, stdout, stderr)
	}
	var rep inspectReport
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("--json output is not JSON: %v\n%s", err, stdout)
	}
	if rep.Verdict != "accepted" || rep.Qcow2 == nil || rep.Qcow2.BackingFile != base ||
		rep.Qcow2.BackingFormat != "raw" || rep.Qcow2.VirtualSize != 8<<20 || rep.Qcow2.BackingResolved != base {
		t.Errorf("report %+v %+v; want accepted, backing %q raw, 8 MiB", rep, rep.Qcow2, base)
	}

	// A backing outside the allowed roots is a policy refusal.
	_, _, code = runVolagent(t, "inspect", "--allow-backing", "/nonexistent-root", img)
	if code != exitRefused {
		t.Errorf("backing outside --allow-backing: exit %d; want %d", code, exitRefused)
	}
	// Text output names the facts.
	stdout, _, _ = runVolagent(t, "inspect", img)
	for _, want := range []string{`backing file: "` + base + `"`, `backing format: "raw"`, "verdict: accepted"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("text output lacks %q:\n%s", want, stdout)
		}
	}
}

func TestInspectRefusesHostileImages(t *testing.T) {
	bases := hostile.MakeBases(t, t.TempDir())
	for _, c := range hostile.Write(t, bases) {
		t.Run(c.Name, func(t *testing.T) {
			stdout, stderr, code := runVolagent(t, "inspect", "--json", c.Path)
			if code != exitRefused {
				t.Fatalf("exit %d; want %d\nstdout: %s\nstderr: %s", code, exitRefused, stdout, stderr)
			}
			if strings.Contains(stderr, "internal error") || strings.Contains(stderr, "panic") {
				t.Fatalf("inspect crashed: %s", stderr)
			}
			var rep inspectReport
			if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
				t.Fatalf("--json output is not JSON: %v\n%s", err, stdout)
			}
			wantCode := (&qcow2.FieldError{Err: c.Want}).Code()
			found := false
			for _, v := range rep.Violations {
				found = found || v.Code == wantCode
			}
			if rep.Verdict != "refused" || !found {
				t.Errorf("verdict %q with violations %+v; want refused with code %q", rep.Verdict, rep.Violations, wantCode)
			}
		})
	}
}

func TestInspectRawHeaderAttack(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	clean := filepath.Join(dir, "clean.raw")
	attacked := filepath.Join(dir, "attacked.raw")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "raw", clean, "4M")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "raw", attacked, "4M")
	// What a guest can do to its own raw disk: write a qcow2 header naming a host file.
	hdr := filepath.Join(dir, "fake.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", hdr, "4M")
	fake, err := os.ReadFile(hdr)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(attacked, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(fake[:4096], 0); err != nil {
		t.Fatal(err)
	}
	f.Close()

	if _, stderr, code := runVolagent(t, "inspect", "--format", "raw", clean); code != exitOK {
		t.Errorf("clean raw disk: exit %d; want 0 (%s)", code, stderr)
	}
	stdout, _, code := runVolagent(t, "inspect", "--format", "raw", "--json", attacked)
	if code != exitRefused {
		t.Fatalf("raw disk with a qcow2 header: exit %d; want %d\n%s", code, exitRefused, stdout)
	}
	var rep inspectReport
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.DetectedHeader != "qcow2" {
		t.Errorf("detected header %q; want qcow2", rep.DetectedHeader)
	}
}

func TestInspectUsageErrors(t *testing.T) {
	dir := t.TempDir()
	cases := [][]string{
		{"inspect", filepath.Join(dir, "missing.qcow2")},
		{"inspect", "--format", "vmdk", filepath.Join(dir, "x")},
		{"inspect"},
		{"inspect", dir}, // a directory is neither a file nor a device
		{"inspect", "/dev/null"},
	}
	for _, args := range cases {
		if _, stderr, code := runVolagent(t, args...); code != exitFailure || stderr == "" {
			t.Errorf("volagent %q: exit %d, stderr %q; want %d with a message", args, code, stderr, exitFailure)
		}
	}
}

// TestInspectOpensNothingElse proves under strace that inspecting an image
// never opens, reads or follows a file the image names (it may lstat and
// readlink the name, which is how it resolves it as the kernel would): hostile images whose backing name
// or data file point at an existing decoy, and accepted overlays whose
// backing is the decoy, by absolute and by relative name.
func TestInspectOpensNothingElse(t *testing.T) {
	testutil.RequireTool(t, "strace", "qemu-img")
	bases := hostile.MakeBases(t, t.TempDir())
	cases := hostile.Write(t, bases)
	decoy := hostile.Decoy(bases)
	for _, name := range []string{decoy, "decoy"} {
		p := filepath.Join(bases.Dir, "good-"+filepath.Base(name)+".qcow2")
		testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", p, "1M")
		cases = append(cases, hostile.Case{Name: "accepted-" + filepath.Base(name), Path: p})
	}
	logDir := t.TempDir()
	for _, c := range cases {
		log := filepath.Join(logDir, c.Name+".strace")
		cmd := exec.Command("strace", "-f", "-qq", "-e", "trace=%file", "-o", log,
			binaryUnderTest(t), "inspect", "--allow-backing", bases.Dir, c.Path)
		out, _ := cmd.CombinedOutput()
		trace, err := os.ReadFile(log)
		if err != nil {
			t.Fatalf("%s: strace wrote no log: %v\n%s", c.Name, err, out)
		}
		// The trace must show the image being opened, or it proves nothing.
		if !strings.Contains(string(trace), c.Path) {
			t.Fatalf("%s: strace log does not show %s being opened; tracing failed\n%s", c.Name, c.Path, trace)
		}
		// Any system call on the decoy, by absolute or relative name, but
		// the lstat and readlink that resolve a backing name as the kernel
		// would walk it: they read the directory entry, never the file.
		for _, line := range strings.Split(string(trace), "\n") {
			if decoyCall.MatchString(line) && !walkCall.MatchString(line) {
				t.Errorf("%s: inspect touched the decoy: %s", c.Name, line)
			}
		}
		if strings.Contains(string(out), "decoy: must never be opened") {
			t.Errorf("%s: inspect printed the decoy's content", c.Name)
		}
	}
}

var decoyCall = regexp.MustCompile(`(/|")decoy"`)

// walkCall is a system call that looks at a name without opening or
// following it.
var walkCall = regexp.MustCompile(`^\d+\s+(lstat|readlink|readlinkat)\(|^\d+\s+(newfstatat|fstatat64|statx)\(.*AT_SYMLINK_NOFOLLOW`)
