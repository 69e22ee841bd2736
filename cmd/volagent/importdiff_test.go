package main

import (
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
)

// TestImportDifferential imports a seeded random sparse raw source (data
// runs, explicit zero runs, holes; 512-byte granular) with `volagent
// import` into qemu-made overlays over a random backing, of several
// geometries (512-byte clusters with 1-bit refcounts, 64 KiB, 2 MiB,
// extended L2 with 128 KiB clusters), in files and on a loop device with
// 4096-byte logical blocks. A twin of the same geometry gets the source
// through qemu-img convert -n. qemu must read the source from both
// (qemu-img compare), and qemu-img check must find neither errors nor
// leaks in either.
func TestImportDifferential(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "qemu-img")
	const size = 16 << 20
	r := rand.New(rand.NewPCG(testutil.DiffSeed(t), 2))
	dir := looptest.Dir(t, "volagent-importdiff-")
	base := filepath.Join(dir, "base.raw")
	importSource(t, base, size, r.Uint64())
	for _, opts := range []string{
		"cluster_size=512,refcount_bits=1",
		"cluster_size=512,refcount_bits=16", // issue 16's reproduction, on 4096-byte blocks
		"cluster_size=65536",
		"cluster_size=2097152",
		"cluster_size=131072,extended_l2=on",
	} {
		for _, sector := range []int{0, 4096} {
			t.Run(fmt.Sprintf("%s-sector-%d", opts, sector), func(t *testing.T) {
				sub := looptest.Dir(t, "volagent-importdiff-")
				source := filepath.Join(sub, "source.raw")
				testutil.WriteSparseSource(t, source, size, r)
				target, twin := filepath.Join(sub, "target.qcow2"), filepath.Join(sub, "twin.qcow2")
				if sector > 0 {
					target = looptest.Device(t, 64<<20, sector)
				}
				for _, image := range []string{target, twin} {
					testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-o", opts, "-b", base, "-F", "raw", image, fmt.Sprint(size))
				}
				if stdout, stderr, code := runVolagent(t, "import", "--allow-backing", dir, source, target); code != exitOK {
					t.Fatalf("import: exit %d\n%s%s", code, stdout, stderr)
				}
				testutil.QemuImg(t, "convert", "-n", "-f", "raw", "-O", "qcow2", source, twin)
				requireIdentical(t, source, target)
				if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", target, twin).CombinedOutput(); err != nil {
					t.Fatalf("qemu-img compare (volagent import, qemu-img convert twin): %v\n%s", err, out)
				}
				requireCleanBoth(t, target)
				if c, l := qemuCheckJSON(t, twin); c != 0 || l != 0 {
					t.Fatalf("qemu-img check of the twin: %d corruptions, %d leaks", c, l)
				}
			})
		}
	}
}
