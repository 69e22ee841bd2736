package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// TestGateAgreesWithQemu records each name of the escape table as the
// backing of an overlay and lets qemu judge: for every name, export,
// inspect and CheckDomain refuse it, or export reads exactly what
// `qemu-img convert -O raw` reads through the same image. Names whose
// file lies outside the root must be refused by all three; the controls
// inside must be accepted by all three.
func TestGateAgreesWithQemu(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	l := testutil.GateEscapes(t)
	for _, c := range l.Cases {
		t.Run(c.Name, func(t *testing.T) {
			os.Remove(l.Image)
			testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-b", c.Backing, "-F", "raw", l.Image, "64K")

			out := filepath.Join(t.TempDir(), "export.raw")
			var stdout, warn bytes.Buffer
			exportErr := runExport(exportOptions{allowBacking: c.Roots, format: "qcow2"}, l.Image, out, &stdout, &warn)
			qemuOut := filepath.Join(t.TempDir(), "qemu.raw")
			qemuErr := exec.Command("qemu-img", "convert", "-f", "qcow2", "-O", "raw", l.Image, qemuOut).Run()

			var rep bytes.Buffer
			inspectErr := runInspect(&rep, l.Image, inspectFlags{json: true, format: "qcow2", allowBacking: c.Roots})
			var report qcow2.Report
			if err := json.Unmarshal(rep.Bytes(), &report); err != nil {
				t.Fatalf("inspect report: %v (%v)\n%s", err, inspectErr, rep.String())
			}

			dom, err := backend.CheckDomain([]byte(testutil.DomainXML("gatecase", testutil.FileDiskXML("vda", "qcow2", l.Image))),
				backend.DomainPolicyOptions{AllowedRoots: c.Roots})
			if err != nil {
				t.Fatal(err)
			}

			if c.Escapes {
				if exportErr == nil {
					t.Errorf("export approved %q; qemu reads %q, outside %q", c.Backing, c.Want, c.Roots)
				} else if !qcow2.IsRefusal(exportErr) {
					t.Errorf("export of %q failed without a refusal: %v", c.Backing, exportErr)
				}
				if report.Verdict != "refused" {
					t.Errorf("inspect: verdict %q, backing resolves to %q; qemu reads %q", report.Verdict, report.Qcow2.BackingResolved, c.Want)
				}
				if len(dom.Violations) == 0 {
					t.Errorf("CheckDomain found no violation for backing %q", c.Backing)
				}
				return
			}
			if exportErr != nil || qemuErr != nil {
				t.Fatalf("control %q: export: %v; qemu-img convert: %v", c.Backing, exportErr, qemuErr)
			}
			got, _ := os.ReadFile(out)
			want, _ := os.ReadFile(qemuOut)
			if !bytes.Equal(got, want) || len(want) == 0 || want[0] != l.Files[c.Want] {
				t.Errorf("control %q: export and qemu-img convert differ, or qemu did not read %q", c.Backing, c.Want)
			}
			if report.Verdict != "accepted" || report.Qcow2.BackingResolved != c.Want {
				t.Errorf("inspect: verdict %q, backing resolves to %q; want accepted, %q: %v", report.Verdict, report.Qcow2.BackingResolved, c.Want, report.Violations)
			}
			if len(dom.Violations) != 0 {
				t.Errorf("CheckDomain: %v", dom.Lines())
			}
		})
	}
}
