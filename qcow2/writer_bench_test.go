package qcow2

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/looptest"
)

// BenchmarkCowWriteLatency measures 4 KiB writes, one per 64 KiB cluster,
// into a fresh overlay over a raw backing (each needs copy-on-write),
// against 4 KiB O_DIRECT writes to the raw device, alternating on the same
// loop device (direct I/O). It reports the median latencies, their ratio
// (goal: at most 1.5), and the median of a raw 64 KiB write, the floor a
// whole-cluster copy-on-write cannot beat. scripts/bench.sh runs it; it
// needs root.
func BenchmarkCowWriteLatency(b *testing.B) {
	benchCowLatency(b, 64<<10, false)
}

// BenchmarkSubclusterCowWriteLatency is BenchmarkCowWriteLatency with 128
// KiB clusters and extended L2 entries: each 4 KiB write into an
// unallocated cluster allocates one 4 KiB subcluster, so nothing is
// copied (goal: a ratio of at most 1.2 against the raw 4 KiB write).
func BenchmarkSubclusterCowWriteLatency(b *testing.B) {
	benchCowLatency(b, 128<<10, true)
}

func benchCowLatency(b *testing.B, cluster int64, extended bool) {
	const writes = 4000
	imageSpan := writes * cluster
	dir := b.TempDir()
	base := filepath.Join(dir, "base.raw")
	writeRandomFile(b, base, imageSpan, 42)
	dev := looptest.Device(b, int(2*imageSpan+(64<<20)), 512)
	if extended {
		// Create does not make extended L2 images; qemu-img does.
		out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-o", fmt.Sprintf("cluster_size=%d,extended_l2=on", cluster),
			"-b", base, "-F", "raw", dev, fmt.Sprint(imageSpan)).CombinedOutput()
		if err != nil {
			b.Fatalf("qemu-img create: %v: %s", err, out)
		}
	}
	tgt, err := hostblk.OpenTarget(dev, false)
	if err != nil {
		b.Fatal(err)
	}
	defer tgt.Close()
	if !extended {
		if _, err := Create(tgt, imageSpan+(32<<20), CreateOptions{VirtualSize: imageSpan, ClusterSize: int(cluster), BackingFile: base, BackingFormat: "raw", BlockSize: tgt.BlockSize}); err != nil {
			b.Fatal(err)
		}
	}
	backing, err := OpenRaw(mustOpen(b, base))
	if err != nil {
		b.Fatal(err)
	}
	w, err := OpenWriter(tgt, tgt.Size, WriterOptions{BlockSize: tgt.BlockSize, Backing: backing, ContainerSize: tgt.ContainerSize()})
	if err != nil {
		b.Fatal(err)
	}
	p := AlignedBuffer(4096, 4096)
	patternFill(p, 1, 0)
	rawBase := tgt.Size - imageSpan // past everything the overlay can allocate
	// A whole-cluster write per round too: a copy-on-write must write the
	// whole cluster, so that is the floor the device sets for it.
	var ours, raw, rawCluster []time.Duration
	big := AlignedBuffer(int(cluster), 4096)
	for b.Loop() {
		ours, raw = ours[:0], raw[:0]
		for i := range int64(writes) {
			start := time.Now()
			if _, err := tgt.WriteAt(big, rawBase-imageSpan/2+i*cluster); err != nil {
				b.Fatal(err)
			}
			rawCluster = append(rawCluster, time.Since(start))
			start = time.Now()
			if _, err := tgt.WriteAt(p, rawBase+i*cluster+8192); err != nil {
				b.Fatal(err)
			}
			raw = append(raw, time.Since(start))
			start = time.Now()
			if _, err := w.WriteAt(p, i*cluster+8192); err != nil {
				b.Fatal(err)
			}
			ours = append(ours, time.Since(start))
		}
	}
	if err := w.Close(); err != nil {
		b.Fatal(err)
	}
	slices.Sort(rawCluster)
	mc := rawCluster[len(rawCluster)/2]
	slices.Sort(ours)
	slices.Sort(raw)
	mo, mr := ours[len(ours)/2], raw[len(raw)/2]
	ratio := float64(mo) / float64(mr)
	b.ReportMetric(float64(mo.Microseconds()), "us-median-cow")
	b.ReportMetric(float64(mr.Microseconds()), "us-median-raw")
	b.ReportMetric(float64(mc.Microseconds()), "us-median-raw-cluster")
	b.ReportMetric(ratio, "ratio")
	if out := os.Getenv("VOLAGENT_BENCH_RESULT"); out != "" {
		os.WriteFile(out, fmt.Appendf(nil, "%.3f %.3f %.3f %.3f\n", float64(mo.Nanoseconds())/1e6, float64(mr.Nanoseconds())/1e6, ratio, float64(mc.Nanoseconds())/1e6), 0o600)
	}
}
