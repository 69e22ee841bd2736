package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
)

// qcow2OnLoop writes a 16 MiB qcow2 image with qemu-img onto a new 32 MiB
// loop device.
func qcow2OnLoop(t *testing.T) string {
	t.Helper()
	dev := looptest.Device(t, 32<<20, 512)
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", dev, "16M")
	return dev
}

// qcow2InFile makes a 16 MiB qcow2 image with some data in a directory
// that supports O_DIRECT (cache=none needs it).
func qcow2InFile(t *testing.T) string {
	t.Helper()
	path := filepath.Join(looptest.Dir(t, "volagent-inuse-"), "disk.qcow2")
	testutil.MakeQcow2(t, path, "", "16M", "", "")
	testutil.QemuIO(t, "qcow2", path, "write -P 0x3c 1M 64k")
	return path
}

func sha(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func holderText(h *testutil.QemuHolder) string {
	return "in use by " + h.String()
}

// TestWritersRefusedWhileQemuHolds: import and create onto an image a
// qemu-storage-daemon or a guest holds exit 2 naming the holder, and the
// image's bytes are unchanged.
func TestWritersRefusedWhileQemuHolds(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tc := range []struct {
		name  string
		image func(*testing.T) string
		hold  func(testing.TB, string) *testutil.QemuHolder
	}{
		{"storage-daemon/file", qcow2InFile, testutil.HoldImageWithStorageDaemon},
		{"storage-daemon/loop", qcow2OnLoop, testutil.HoldImageWithStorageDaemon},
		{"guest/loop", qcow2OnLoop, testutil.HoldImageWithGuest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			image := tc.image(t)
			source := filepath.Join(t.TempDir(), "source.raw")
			importSource(t, source, 8<<20, 7)
			h := tc.hold(t, image)
			before := sha(t, image)
			runs := [][]string{{"import", source, image}}
			if strings.HasPrefix(image, "/dev/") {
				runs = append(runs, []string{"create", "--no-backing", "--size", "1M", image})
			}
			for _, args := range runs {
				_, stderr, code := runVolagent(t, args...)
				if code != exitFailure || !strings.Contains(stderr, holderText(h)) {
					t.Errorf("volagent %s while %s holds the image: exit %d, %s; want exit 2 naming %q", args[0], h.Name, code, stderr, holderText(h))
				}
			}
			if sha(t, image) != before {
				t.Fatal("the image's bytes changed while qemu held it")
			}
			h.Stop(t)
			if _, stderr, code := runVolagent(t, "import", source, image); code != 0 {
				t.Fatalf("import after qemu stopped: exit %d, %s", code, stderr)
			}
		})
	}
}

// TestReadersRefuseImageInUse: export and check refuse an image a qemu
// writes (exit 2, holder named, --force-share suggested); with
// --force-share or -U they read it and warn that the result may be
// inconsistent.
func TestReadersRefuseImageInUse(t *testing.T) {
	testutil.RequireRoot(t)
	image := qcow2InFile(t)
	want := testutil.QemuGuestBytes(t, "qcow2", image)
	h := testutil.HoldImageWithStorageDaemon(t, image)
	dir := t.TempDir()
	for _, args := range [][]string{{"export", image, filepath.Join(dir, "refused.raw")}, {"check", image}} {
		_, stderr, code := runVolagent(t, args...)
		if code != exitFailure || !strings.Contains(stderr, holderText(h)) || !strings.Contains(stderr, "--force-share") {
			t.Errorf("volagent %s of an image in use: exit %d, %s", args[0], code, stderr)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "refused.raw")); !os.IsNotExist(err) {
		t.Errorf("a refused export left its output: %v", err)
	}
	for _, flag := range []string{"--force-share", "-U"} {
		out := filepath.Join(dir, "shared"+flag+".raw")
		for _, args := range [][]string{{"export", flag, image, out}, {"check", flag, image}} {
			_, stderr, code := runVolagent(t, args...)
			if code != 0 || !strings.Contains(stderr, "may be inconsistent") || !strings.Contains(stderr, holderText(h)) {
				t.Errorf("volagent %q of an image in use: exit %d, %s; want 0 and a warning", args, code, stderr)
			}
		}
		if got, err := os.ReadFile(out); err != nil || !bytes.Equal(got, want) {
			t.Errorf("export %s: %v, or not the guest's bytes", flag, err)
		}
	}
	h.Stop(t)
	for _, args := range [][]string{{"export", image, filepath.Join(dir, "after.raw")}, {"check", image}} {
		if _, stderr, code := runVolagent(t, args...); code != 0 || stderr != "" {
			t.Errorf("volagent %s after qemu stopped: exit %d, %s", args[0], code, stderr)
		}
	}
}

// TestInspectReportsInUse: inspect takes no lock (it works while a guest
// holds the image) and says the image is in use and by whom, in text and
// JSON.
func TestInspectReportsInUse(t *testing.T) {
	testutil.RequireRoot(t)
	image := qcow2OnLoop(t)
	h := testutil.HoldImageWithGuest(t, image)
	stdout, stderr, code := runVolagent(t, "inspect", image)
	if code != 0 || !strings.Contains(stdout, fmt.Sprintf("in use: yes, by %q", h.String())) ||
		!strings.Contains(stdout, "held: consistent read, write, resize") {
		t.Errorf("inspect of an image a guest holds: exit %d\n%s%s", code, stdout, stderr)
	}
	stdout, stderr, code = runVolagent(t, "inspect", "--json", image)
	var rep struct {
		Verdict string `json:"verdict"`
		InUse   struct {
			InUse   bool     `json:"in-use"`
			Held    []string `json:"held"`
			Holders []struct {
				PID     int    `json:"pid"`
				Command string `json:"command"`
			} `json:"holders"`
		} `json:"in-use"`
	}
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil || code != 0 {
		t.Fatalf("inspect --json: exit %d, %v\n%s%s", code, err, stdout, stderr)
	}
	if rep.Verdict != "accepted" || !rep.InUse.InUse || len(rep.InUse.Holders) != 1 ||
		rep.InUse.Holders[0].PID != h.PID || rep.InUse.Holders[0].Command != h.Name || !strings.Contains(strings.Join(rep.InUse.Held, ","), "write") {
		t.Errorf("inspect --json of an image a guest holds: %s", stdout)
	}
	h.Stop(t)
	if stdout, _, _ := runVolagent(t, "inspect", image); !strings.Contains(stdout, "in use: no\n") {
		t.Errorf("inspect after the guest stopped:\n%s", stdout)
	}
}
