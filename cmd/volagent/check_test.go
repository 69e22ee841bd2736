package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volagent/volagent/internal/hostile"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// checkCLIImages makes a clean image and two patched copies: one whose
// only problem is a leaked cluster, one with a corruption.
func checkCLIImages(t *testing.T) (clean, leaky, corrupt string) {
	t.Helper()
	dir := t.TempDir()
	clean = filepath.Join(dir, "clean.qcow2")
	testutil.MakeQcow2(t, clean, "", "4M", "", "")
	testutil.QemuIO(t, "qcow2", clean, "write -P 1 0 256k", "write -P 2 1m 64k", "discard 64k 64k")
	img, err := os.ReadFile(clean)
	if err != nil {
		t.Fatal(err)
	}
	h, err := qcow2.ReadHeader(bytes.NewReader(img), int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	cs := h.ClusterSize()
	refblock := int64(be.Uint64(img[h.RefcountTableOffset:])) // 16-bit refcounts, one block covers the image
	l2 := int64(be.Uint64(img[h.L1TableOffset:]) & 0x00ff_ffff_ffff_fe00)

	// The discarded cluster is free inside the image: marking it used is
	// a leak and nothing else.
	leakyImg := append([]byte(nil), img...)
	free := int64(-1)
	for k := int64(1); k < int64(len(img))/cs; k++ {
		if be.Uint16(img[refblock+2*k:]) == 0 {
			free = k
			break
		}
	}
	if free < 0 {
		t.Fatal("no free cluster inside the image")
	}
	be.PutUint16(leakyImg[refblock+2*free:], 1)

	// Guest cluster 0 now points past the end of the image.
	corruptImg := append([]byte(nil), img...)
	be.PutUint64(corruptImg[l2:], 1<<63|uint64((int64(len(img))/cs+8)*cs))

	leaky, corrupt = filepath.Join(dir, "leaky.qcow2"), filepath.Join(dir, "corrupt.qcow2")
	for p, b := range map[string][]byte{leaky: leakyImg, corrupt: corruptImg} {
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return clean, leaky, corrupt
}

// qemuCheckCounts runs qemu-img check read-only and returns its counts.
func qemuCheckCounts(t *testing.T, path string) (corruptions, leaks, checkErrors int) {
	t.Helper()
	var stdout bytes.Buffer
	cmd := exec.Command("qemu-img", "check", "--output=json", "-f", "qcow2", path)
	cmd.Stdout = &stdout
	_ = cmd.Run() // exits 2 or 3 when it finds problems
	var v struct {
		Corruptions int `json:"corruptions"`
		Leaks       int `json:"leaks"`
		CheckErrors int `json:"check-errors"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &v); err != nil {
		t.Fatalf("qemu-img check %s: %v: %s", path, err, stdout.String())
	}
	return v.Corruptions, v.Leaks, v.CheckErrors
}

func TestCheckCLIExitStatusAndOutput(t *testing.T) {
	clean, leaky, corrupt := checkCLIImages(t)
	cases := []struct {
		name, path string
		wantExit   int
		wantText   string
		verdict    string
	}{
		{"clean", clean, exitOK, "No errors were found on the image.", "clean"},
		{"leak-only", leaky, exitRefused, "1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.", "leaks"},
		{"corrupt", corrupt, exitFailure, "errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.", "corrupt"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			stdout, stderr, code := runVolagent(t, "check", c.path)
			if code != c.wantExit || !strings.Contains(stdout, c.wantText) {
				t.Fatalf("exit %d (want %d)\nstdout:\n%s\nstderr:\n%s", code, c.wantExit, stdout, stderr)
			}
			if !strings.Contains(stdout, "Image end offset: ") {
				t.Errorf("no image end offset in:\n%s", stdout)
			}

			stdout, stderr, code = runVolagent(t, "check", "--json", c.path)
			if code != c.wantExit {
				t.Fatalf("--json: exit %d (want %d)\nstderr:\n%s", code, c.wantExit, stderr)
			}
			var rep map[string]any
			if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
				t.Fatalf("--json output is not JSON: %v\n%s", err, stdout)
			}
			for _, field := range []string{"corruptions", "leaks", "check-errors", "image-end-offset", "allocated-clusters", "problems", "verdict"} {
				if _, ok := rep[field]; !ok {
					t.Errorf("--json output lacks %q:\n%s", field, stdout)
				}
			}
			if rep["verdict"] != c.verdict {
				t.Errorf("verdict %v, want %s", rep["verdict"], c.verdict)
			}
			corruptions, leaks, checkErrors := qemuCheckCounts(t, c.path)
			if int(rep["corruptions"].(float64)) != corruptions || int(rep["leaks"].(float64)) != leaks || int(rep["check-errors"].(float64)) != checkErrors {
				t.Errorf("counts %v/%v/%v, qemu-img check says %d/%d/%d", rep["corruptions"], rep["leaks"], rep["check-errors"], corruptions, leaks, checkErrors)
			}
			problems, _ := rep["problems"].([]any)
			if (c.verdict == "clean") != (len(problems) == 0) {
				t.Errorf("%d problems listed for a %s image", len(problems), c.verdict)
			}
		})
	}
}

// TestCheckCLIRefusesHostileImages: every hostile header is refused with
// status 3 before any table is walked, and nothing panics.
func TestCheckCLIRefusesHostileImages(t *testing.T) {
	bases := hostile.MakeBases(t, t.TempDir())
	for _, c := range hostile.Write(t, bases) {
		t.Run(c.Name, func(t *testing.T) {
			stdout, stderr, code := runVolagent(t, "check", "--json", c.Path)
			if code != exitRefused || strings.Contains(stderr, "internal error") {
				t.Fatalf("exit %d (want %d)\nstdout:\n%s\nstderr:\n%s", code, exitRefused, stdout, stderr)
			}
			var rep struct {
				Verdict    string      `json:"verdict"`
				Violations []violation `json:"violations"`
			}
			if err := json.Unmarshal([]byte(stdout), &rep); err != nil || rep.Verdict != "refused" || len(rep.Violations) == 0 {
				t.Fatalf("want a refused report with violations (err %v):\n%s", err, stdout)
			}
		})
	}
}

func TestCheckCLIUsage(t *testing.T) {
	stdout, _, code := runVolagent(t, "check", "--help")
	if code != exitOK {
		t.Fatalf("--help exit %d", code)
	}
	for _, want := range []string{"volagent check --json", "Exit status: 0", "3 only leaks", "2 corruptions", "read-only"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("--help lacks %q:\n%s", want, stdout)
		}
	}
	if _, _, code := runVolagent(t, "check"); code != exitFailure {
		t.Errorf("no argument: exit %d, want %d", code, exitFailure)
	}
	if _, stderr, code := runVolagent(t, "check", filepath.Join(t.TempDir(), "missing.qcow2")); code != exitFailure || !strings.Contains(stderr, "no such file") {
		t.Errorf("missing image: exit %d, stderr %q; want %d", code, stderr, exitFailure)
	}
}
