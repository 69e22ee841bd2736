package qcow2

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
)

// diffGeometry is one point of the geometry matrix the differential test
// covers.
type diffGeometry struct {
	cluster int
	refBits int
	extL2   bool
	compat  string // "0.10" or "1.1"
	lazy    bool
	sector  int    // 0: a file; 512 or 4096: a loop device with that logical block size
	backing string // "", "raw", "qcow2" (a chain: qcow2 over raw), "qcow2c" (compressed)
}

func (g diffGeometry) String() string {
	dev := "file"
	if g.sector > 0 {
		dev = fmt.Sprint("loop", g.sector)
	}
	b := g.backing
	if b == "" {
		b = "none"
	}
	return fmt.Sprintf("c%d-rc%d-ext%v-v%s-lazy%v-%s-backing-%s", g.cluster, g.refBits, g.extL2, g.compat, g.lazy, dev, b)
}

// valid: what qemu-img create accepts.
func (g diffGeometry) valid() bool {
	switch {
	case g.compat == "0.10" && (g.refBits != 16 || g.extL2 || g.lazy):
		return false
	case g.extL2 && g.cluster < 16<<10:
		return false
	}
	return true
}

func (g diffGeometry) options() string {
	o := fmt.Sprintf("cluster_size=%d,refcount_bits=%d,compat=%s", g.cluster, g.refBits, g.compat)
	if g.extL2 {
		o += ",extended_l2=on"
	}
	if g.lazy {
		o += ",lazy_refcounts=on"
	}
	return o
}

var diffAxes = struct {
	clusters, refBits, sectors []int
	compat, backing            []string
}{
	clusters: []int{512, 4 << 10, 64 << 10, 128 << 10, 2 << 20},
	refBits:  []int{1, 2, 4, 8, 16, 32, 64},
	sectors:  []int{0, 512, 4096},
	compat:   []string{"0.10", "1.1"},
	backing:  []string{"", "raw", "qcow2", "qcow2c"},
}

// axisValues lists a geometry's value on each axis, for pair coverage.
func (g diffGeometry) axisValues() []string {
	return []string{
		"c" + fmt.Sprint(g.cluster), "r" + fmt.Sprint(g.refBits), "e" + fmt.Sprint(g.extL2),
		"v" + g.compat, "l" + fmt.Sprint(g.lazy), "s" + fmt.Sprint(g.sector), "b" + g.backing,
	}
}

func pairsOf(g diffGeometry) []string {
	v := g.axisValues()
	var pairs []string
	for i := range v {
		for j := i + 1; j < len(v); j++ {
			pairs = append(pairs, v[i]+"/"+v[j])
		}
	}
	return pairs
}

func randomGeometry(r *rand.Rand) diffGeometry {
	for {
		g := diffGeometry{
			cluster: diffAxes.clusters[r.IntN(len(diffAxes.clusters))],
			refBits: diffAxes.refBits[r.IntN(len(diffAxes.refBits))],
			extL2:   r.IntN(2) == 0,
			compat:  diffAxes.compat[r.IntN(len(diffAxes.compat))],
			lazy:    r.IntN(2) == 0,
			sector:  diffAxes.sectors[r.IntN(len(diffAxes.sectors))],
			backing: diffAxes.backing[r.IntN(len(diffAxes.backing))],
		}
		if g.valid() {
			return g
		}
	}
}

// pickGeometries chooses geometries greedily so that every pair of axis
// values that some valid geometry has is covered (all-pairs), at most
// limit of them (0: until every pair is covered).
func pickGeometries(r *rand.Rand, limit int) []diffGeometry {
	all := map[string]bool{}
	for range 20000 {
		for _, p := range pairsOf(randomGeometry(r)) {
			all[p] = false
		}
	}
	var picked []diffGeometry
	for limit == 0 || len(picked) < limit {
		best, bestNew := diffGeometry{}, 0
		for range 200 {
			g := randomGeometry(r)
			n := 0
			for _, p := range pairsOf(g) {
				if !all[p] {
					n++
				}
			}
			if n > bestNew {
				best, bestNew = g, n
			}
		}
		if bestNew == 0 {
			break
		}
		for _, p := range pairsOf(best) {
			all[p] = true
		}
		picked = append(picked, best)
	}
	return picked
}

// TestWriterDifferentialMatrix applies the same random workload (writes of
// random offsets and lengths, zero writes, discards) through the Writer
// and through qemu-io on a twin image, over a pairwise sample of the
// geometry matrix: cluster sizes 512 B to 2 MiB, refcount widths 1 to 64,
// extended L2 on and off, compat 0.10 and 1.1, lazy refcounts, files and
// loop devices with 512- and 4096-byte logical blocks, raw, qcow2 (a
// chain) and compressed qcow2 backings or none. After each batch the
// guest views must be identical (qemu-img compare) and qemu-img check must
// find neither errors nor leaks in either image.
//
// VOLAGENT_DIFF_SEED=n reproduces a run; VOLAGENT_DIFF_LONG=1 (make fuzz)
// covers every pair of axis values and runs more batches.
func TestWriterDifferentialMatrix(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "qemu-img", "qemu-io")
	seed := testutil.DiffSeed(t)
	long := os.Getenv("VOLAGENT_DIFF_LONG") != ""
	r := rand.New(rand.NewPCG(seed, 16))
	limit, batches, ops := 16, 3, 15
	if long {
		limit, batches, ops = 0, 5, 25
	}
	geometries := pickGeometries(r, limit)
	dir := looptest.Dir(t, "volagent-diff-")
	bases := makeDiffBases(t, dir)
	for i, g := range geometries {
		gseed := r.Uint64()
		t.Run(g.String(), func(t *testing.T) {
			t.Logf("geometry seed %d", gseed)
			runDifferential(t, filepath.Join(dir, fmt.Sprint("g", i)), g, bases, gseed, batches, ops)
		})
	}
}

const diffSize = 8 << 20

// makeDiffBases makes the backing images: a raw file, a qcow2 over it
// with its own writes (a chain) and a compressed qcow2.
func makeDiffBases(t *testing.T, dir string) map[string][2]string {
	raw := filepath.Join(dir, "base.raw")
	writeRandomFile(t, raw, diffSize, 77)
	chain := filepath.Join(dir, "base-chain.qcow2")
	testutil.MakeQcow2(t, chain, "cluster_size=4096", "", raw, "raw")
	testutil.QemuIO(t, "qcow2", chain, "write -P 0x33 1m 300k", "write -z 3m 64k", "write -P 0x44 6m 5000")
	comp := filepath.Join(dir, "base.qcow2c")
	testutil.QemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", raw, comp)
	return map[string][2]string{"raw": {raw, "raw"}, "qcow2": {chain, "qcow2"}, "qcow2c": {comp, "qcow2"}}
}

type diffOp struct {
	kind   int // 0 write, 1 zero write, 2 discard
	off, n int64
	fill   byte
}

func runDifferential(t *testing.T, dir string, g diffGeometry, bases map[string][2]string, seed uint64, batches, ops int) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	create := func(target string) {
		args := []string{"create", "-q", "-f", "qcow2", "-o", g.options()}
		if g.backing != "" {
			b := bases[g.backing]
			args = append(args, "-b", b[0], "-F", b[1])
		}
		testutil.QemuImg(t, append(args, target, fmt.Sprint(diffSize))...)
	}
	ours := filepath.Join(dir, "ours.qcow2")
	if g.sector > 0 {
		ours = looptest.Device(t, 64<<20, g.sector)
	}
	twin := filepath.Join(dir, "twin.qcow2")
	create(ours)
	create(twin)
	r := rand.New(rand.NewPCG(seed, 5))
	c := int64(g.cluster)
	unit := c // what a discard makes read zeros
	if g.extL2 {
		unit /= subclusters
	}
	for batch := range batches {
		tgt, err := hostblk.OpenTarget(ours, false)
		if err != nil {
			t.Fatal(err)
		}
		w, err := OpenWriter(tgt, tgt.Size, WriterOptions{BlockSize: tgt.BlockSize, Backing: diffBacking(t, g, bases), ContainerSize: tgt.ContainerSize()})
		if err != nil {
			tgt.Close()
			t.Fatalf("batch %d: OpenWriter: %v", batch, err)
		}
		var cmds []string
		for i := range ops {
			o := randomDiffOp(r, c)
			if o.kind == 2 && g.compat == "0.10" && g.backing != "" {
				// A version 2 discard makes clusters read the backing file,
				// which no twin command can force: qemu skips some discards
				// (they are advisory), so the oracle would be ambiguous.
				// They become zero writes here.
				o.kind = 1
			}
			switch o.kind {
			case 0:
				p := make([]byte, o.n)
				for j := range p {
					p[j] = o.fill
				}
				_, err = w.WriteAt(p, o.off)
				cmds = append(cmds, fmt.Sprintf("write -P %#x %d %d", o.fill, o.off, o.n))
			case 1:
				err = w.WriteZeroes(o.off, o.n)
				cmds = append(cmds, fmt.Sprintf("write -z %d %d", o.off, o.n))
			case 2:
				err = w.Discard(o.off, o.n)
				cmds = append(cmds, fmt.Sprintf("discard %d %d", o.off, o.n))
				// volagent makes whole clusters (whole subclusters with
				// extended L2) read zeros in version 3, as qemu does from
				// 9.1; the twin gets explicit zeros there.
				first, end := ceilDiv(o.off, unit)*unit, (o.off+o.n)/unit*unit
				if o.off+o.n == diffSize {
					end = diffSize
				}
				if g.compat == "1.1" && first < end {
					cmds = append(cmds, fmt.Sprintf("write -z %d %d", first, end-first))
				}
			}
			if err != nil {
				w.Close()
				tgt.Close()
				t.Fatalf("batch %d op %d (%+v): %v", batch, i, o, err)
			}
		}
		err = w.Close()
		tgt.Close()
		if err != nil {
			t.Fatalf("batch %d: Close: %v", batch, err)
		}
		testutil.QemuIO(t, "qcow2", twin, cmds...)
		if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", ours, twin).CombinedOutput(); err != nil {
			mapOurs, _ := exec.Command("qemu-img", "map", "-f", "qcow2", "--output=json", ours).CombinedOutput()
			mapTwin, _ := exec.Command("qemu-img", "map", "-f", "qcow2", "--output=json", twin).CombinedOutput()
			t.Fatalf("batch %d: qemu-img compare (volagent, qemu-io twin): %v\n%s\nops:\n%s\nmap of ours:\n%s\nmap of the twin:\n%s", batch, err, out, strings.Join(cmds, "\n"), mapOurs, mapTwin)
		}
		requireClean(t, ours)
		requireClean(t, twin)
	}
}

func randomDiffOp(r *rand.Rand, c int64) diffOp {
	o := diffOp{kind: []int{0, 0, 0, 1, 2}[r.IntN(5)]}
	o.off, o.n, o.fill = testutil.RandomWrite(r, diffSize, c)
	if o.kind != 0 { // qemu-io zero writes and discards: 512-byte granularity
		o.off = o.off / 512 * 512
		o.n = max(512, (o.n+511)/512*512)
	}
	o.n = min(o.n, diffSize-o.off)
	return o
}

// diffBacking opens the backing disk a geometry names (nil for none).
func diffBacking(t *testing.T, g diffGeometry, bases map[string][2]string) Disk {
	if g.backing == "" {
		return nil
	}
	b := bases[g.backing]
	if b[1] == "raw" {
		d, err := OpenRaw(mustOpen(t, b[0]))
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	d, err := OpenChain(b[0], "qcow2", &Gate{AllowedRoots: []string{filepath.Dir(b[0])}})
	if err != nil {
		t.Fatal(err)
	}
	return d
}
