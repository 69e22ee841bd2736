package backend

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volagent/volagent/internal/testutil"
)

// TestWriteDifferential applies a seeded random sequence of data writes
// (unaligned, sub-cluster and cross-cluster) through Manager.Write, the
// D-Bus Write method's path, to overlays of 64 KiB and 512-byte clusters
// in a loop pool, and the same writes through qemu-io to a twin qcow2 of
// the same cluster size and backing. After each batch qemu must read the
// same guest view from both (qemu-img compare) and qemu-img check must
// find neither errors nor leaks in either.
func TestWriteDifferential(t *testing.T) {
	e := newEnv(t, PoolLoop, PolicyEnforce)
	m := e.manager()
	ctx := context.Background()
	r := rand.New(rand.NewPCG(testutil.DiffSeed(t), 4))
	const size = 8 << 20
	base := filepath.Join(e.roots, "base.raw")
	writeFile(t, base, size, map[int64][]byte{0: randomBytes(t, size)})
	for _, cluster := range []int{64 << 10, 512} {
		t.Run(fmt.Sprint("cluster-", cluster), func(t *testing.T) {
			v, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: fmt.Sprint("diff", cluster), BackingPath: base, BackingFormat: "raw", ClusterSize: cluster})
			if err != nil {
				t.Fatal(err)
			}
			twin := filepath.Join(t.TempDir(), "twin.qcow2")
			testutil.MakeQcow2(t, twin, fmt.Sprint("cluster_size=", cluster), fmt.Sprint(size), base, "raw")
			for batch := range 3 {
				var cmds []string
				for range 15 {
					off, n, fill := testutil.RandomWrite(r, size, int64(cluster))
					if err := m.Write(ctx, Caller{}, v.ID, off, pattern(fill, int(n))); err != nil {
						t.Fatalf("batch %d: Write(%d, %d bytes): %v", batch, off, n, err)
					}
					cmds = append(cmds, fmt.Sprintf("write -P %#x %d %d", fill, off, n))
				}
				testutil.QemuIO(t, "qcow2", twin, cmds...)
				if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", v.DevicePath, twin).CombinedOutput(); err != nil {
					t.Fatalf("batch %d: qemu-img compare (volagent's Write, qemu-io twin): %v\n%s\nwrites:\n%s", batch, err, out, strings.Join(cmds, "\n"))
				}
				qemuCheck(t, v.DevicePath)
				testutil.QemuImg(t, "check", "-f", "qcow2", twin)
			}
		})
	}
}
