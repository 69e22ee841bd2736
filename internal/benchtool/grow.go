package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/hostblk"
)

// growLatency: grow -type loop|lvm -dir DIR [-n 20]. It makes a pool of
// that type under DIR (an LVM pool: a volume group on a loop device over
// a sparse file, with loop activation), an overlay in it, and times n
// growths by the pool's chunk as the block-threshold handler makes them
// (Manager.GrowVolume: the device is extended and the loop device told,
// so qemu's next size query sees it); it prints the median and the
// slowest in milliseconds, and removes everything.
func growLatency(args []string) error {
	fs := flag.NewFlagSet("grow", flag.ExitOnError)
	typ := fs.String("type", "loop", "pool type: loop or lvm")
	dir := fs.String("dir", "", "a directory for the pool (O_DIRECT capable)")
	n := fs.Int("n", 20, "growths")
	fs.Parse(args)
	if *dir == "" {
		return errors.New("grow needs -dir")
	}
	const chunk = 64 << 20
	ctx := context.Background()
	images := filepath.Join(*dir, "images")
	if err := os.MkdirAll(images, 0o755); err != nil {
		return err
	}
	base := filepath.Join(images, "base.raw")
	if err := os.WriteFile(base, nil, 0o644); err != nil {
		return err
	}
	if err := os.Truncate(base, 64<<20); err != nil {
		return err
	}
	pool := fmt.Sprintf("[[pool]]\nname = \"g\"\ntype = %q\nbacking_roots = [%q]\ninitial_size = \"64M\"\nchunk_size = \"64M\"\n", *typ, images)
	opts := backend.ManagerOptions{}
	switch *typ {
	case "loop":
		pool += fmt.Sprintf("directory = %q\n", filepath.Join(*dir, "pool"))
		defer func() {
			if loops, err := hostblk.FindLoops(filepath.Join(*dir, "pool", "v.img")); err == nil {
				for _, l := range loops {
					_ = hostblk.DetachLoop(l.Path)
				}
			}
		}()
	case "lvm":
		pvFile := filepath.Join(*dir, "pv.img")
		if err := os.WriteFile(pvFile, nil, 0o600); err != nil {
			return err
		}
		if err := os.Truncate(pvFile, int64(*n+4)*chunk); err != nil {
			return err
		}
		pv, err := hostblk.AttachLoop(pvFile, hostblk.LoopOptions{SectorSize: 512})
		if err != nil {
			return err
		}
		defer hostblk.DetachLoop(pv.Path)
		vg := fmt.Sprintf("volagent_bench_grow_%d", os.Getpid())
		lvm := &hostblk.LVM{NoDeviceMapper: true, Devices: []string{pv.Path}}
		if _, err := lvm.Run(ctx, "pvcreate", "-y", pv.Path); err != nil {
			return err
		}
		defer lvm.Run(context.Background(), "pvremove", "-ff", "-y", pv.Path)
		if _, err := lvm.Run(ctx, "vgcreate", "-y", "-s", "4m", vg, pv.Path); err != nil {
			return err
		}
		defer lvm.Run(context.Background(), "vgremove", "-ff", "-y", vg)
		pool += fmt.Sprintf("volume_group = %q\nactivation = \"loop\"\n", vg)
		opts.LVM = lvm
	default:
		return fmt.Errorf("-type %q: want loop or lvm", *typ)
	}
	cfg, err := backend.ParseConfig([]byte(pool), "bench")
	if err != nil {
		return err
	}
	m, err := backend.NewManager(cfg, opts)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := m.Load(ctx); err != nil {
		return err
	}
	v, err := m.CreateOverlay(ctx, backend.Caller{}, backend.OverlayRequest{Pool: "g", Name: "v", BackingPath: base, BackingFormat: "raw"})
	if err != nil {
		return err
	}
	defer m.Delete(context.Background(), backend.Caller{}, v.ID)
	var times []time.Duration
	size := v.DeviceSize
	for i := 0; i < *n; i++ {
		size += chunk
		start := time.Now()
		g, err := m.GrowVolume(ctx, backend.Caller{}, v.ID, size)
		if err != nil {
			return err
		}
		times = append(times, time.Since(start))
		if info, err := hostblk.Inspect(g.DevicePath); err != nil || info.Size < size {
			return fmt.Errorf("after growth %d the device shows %d bytes (%v), want %d", i, info.Size, err, size)
		}
	}
	med := median(times)
	fmt.Printf("%.1f %.1f\n", float64(med)/1e6, float64(times[len(times)-1])/1e6)
	return nil
}
