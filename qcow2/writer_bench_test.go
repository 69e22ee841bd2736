package qcow2

import (
	"fmt"
	"os"
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
	const writes = 4000
	const cluster = 64 << 10
	const imageSpan = writes * cluster
	dir := b.TempDir()
	base := filepath.Join(dir, "base.raw")
	writeRandomFile(b, base, imageSpan, 42)
	dev := looptest.Device(b, 2*imageSpan+(64<<20), 512)
	tgt, err := hostblk.OpenTarget(dev, false)
	if err != nil {
		b.Fatal(err)
	}
	defer tgt.Close()
	if _, err := Create(tgt, imageSpan+(32<<20), CreateOptions{VirtualSize: imageSpan, BackingFile: base, BackingFormat: "raw", BlockSize: tgt.BlockSize}); err != nil {
		b.Fatal(err)
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
	// A 64 KiB write per round too: a copy-on-write must write the whole
	// cluster, so that is the floor the device sets.
	var ours, raw, raw64 []time.Duration
	big := AlignedBuffer(cluster, 4096)
	for b.Loop() {
		ours, raw = ours[:0], raw[:0]
		for i := range int64(writes) {
			start := time.Now()
			if _, err := tgt.WriteAt(big, rawBase-imageSpan/2+i*cluster); err != nil {
				b.Fatal(err)
			}
			raw64 = append(raw64, time.Since(start))
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
	slices.Sort(raw64)
	m64 := raw64[len(raw64)/2]
	slices.Sort(ours)
	slices.Sort(raw)
	mo, mr := ours[len(ours)/2], raw[len(raw)/2]
	ratio := float64(mo) / float64(mr)
	b.ReportMetric(float64(mo.Microseconds()), "us-median-cow")
	b.ReportMetric(float64(mr.Microseconds()), "us-median-raw")
	b.ReportMetric(float64(m64.Microseconds()), "us-median-raw64k")
	b.ReportMetric(ratio, "ratio")
	if out := os.Getenv("VOLAGENT_BENCH_RESULT"); out != "" {
		os.WriteFile(out, fmt.Appendf(nil, "%.3f %.3f %.3f %.3f\n", float64(mo.Nanoseconds())/1e6, float64(mr.Nanoseconds())/1e6, ratio, float64(m64.Nanoseconds())/1e6), 0o600)
	}
}
