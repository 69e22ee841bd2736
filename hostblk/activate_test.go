package hostblk

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// rawPEStart asks lvm directly (not through the code under test) where the
// PV's first extent is.
func rawPEStart(t *testing.T, vg *testVG) uint64 {
	t.Helper()
	out, err := vg.lvm.Run(context.Background(), "pvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "pe_start", vg.pv)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Report []struct {
			PV []struct {
				PEStart string `json:"pe_start"`
			} `json:"pv"`
		} `json:"report"`
	}
	if err := json.Unmarshal(out, &doc); err != nil || len(doc.Report) != 1 || len(doc.Report[0].PV) != 1 {
		t.Fatalf("pvs output %s: %v", out, err)
	}
	n, err := strconv.ParseUint(doc.Report[0].PV[0].PEStart, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestLoopActivationMapsLVExtents(t *testing.T) {
	vg := newTestVG(t, 64<<20)
	ctx := context.Background()
	a, err := NewActivator(ActivationLoop, vg.lvm)
	if err != nil {
		t.Fatal(err)
	}
	const extent = 4 << 20
	// A first LV takes extents 0-1, so the one under test starts at
	// extent 2, not at the PV's first extent.
	for _, name := range []string{"first", "vol"} {
		if _, err := vg.lvm.CreateLV(ctx, vg.name, name, 2*extent, CreateOptions{Contiguous: true}); err != nil {
			t.Fatal(err)
		}
	}
	lvOffset := int64(rawPEStart(t, vg)) + 2*extent

	dev, err := a.Activate(ctx, vg.name, "vol")
	if err != nil {
		t.Fatal(err)
	}
	info, err := Inspect(dev)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != 2*extent || info.LogicalBlockSize != 512 {
		t.Errorf("activated LV: %+v, want 8 MiB with the PV's 512-byte sectors", info)
	}
	if l, err := loopByPath(dev); err != nil || !l.DirectIO || l.Offset != uint64(lvOffset) {
		t.Errorf("loop of the LV: %+v, %v; want direct I/O at offset %d", l, err, lvOffset)
	}

	// Bytes written through the LV land at exactly its extents on the PV.
	head, tail := randomBytes(t, 4096), randomBytes(t, 4096)
	writeSync(t, dev, 0, head)
	writeSync(t, dev, 2*extent-4096, tail)
	dropCaches(t, vg.pv)
	requireEqualBytes(t, "PV at the LV's first byte", readAt(t, vg.pv, lvOffset, 4096), head)
	requireEqualBytes(t, "PV at the LV's last block", readAt(t, vg.pv, lvOffset+2*extent-4096, 4096), tail)
	// ... and nowhere else: the neighbouring LV's last block is untouched.
	requireEqualBytes(t, "PV before the LV", readAt(t, vg.pv, lvOffset-4096, 4096), make([]byte, 4096))

	// After a restart the device is found again from sysfs alone, and
	// activating again reuses it instead of attaching a second loop.
	restarted, err := NewActivator(ActivationLoop, &LVM{NoDeviceMapper: true, Devices: vg.lvm.Devices})
	if err != nil {
		t.Fatal(err)
	}
	if path, err := restarted.DevicePath(ctx, vg.name, "vol"); err != nil || path != dev {
		t.Errorf("DevicePath after restart = %q, %v; want %s", path, err, dev)
	}
	if path, err := restarted.Activate(ctx, vg.name, "vol"); err != nil || path != dev {
		t.Errorf("Activate again = %q, %v; want %s", path, err, dev)
	}
	if loops, err := FindLoops(vg.pv); err != nil || len(loops) != 1 {
		t.Errorf("loops over the PV: %+v, %v; want exactly one", loops, err)
	}
	if _, err := restarted.DevicePath(ctx, vg.name, "first"); !errors.Is(err, ErrNotActive) {
		t.Errorf("DevicePath(inactive LV) = %v, want ErrNotActive", err)
	}

	// Extending the LV and refreshing grows the device; the new tail is
	// the LV's new extents on the PV (contiguous, right after the old).
	if _, err := vg.lvm.ExtendLV(ctx, vg.name, "vol", 3*extent); err != nil {
		t.Fatal(err)
	}
	if err := a.Refresh(ctx, vg.name, "vol"); err != nil {
		t.Fatal(err)
	}
	if info, err := Inspect(dev); err != nil || info.Size != 3*extent {
		t.Fatalf("size after extend and refresh = %d, %v; want %d", info.Size, err, 3*extent)
	}
	newTail := randomBytes(t, 4096)
	writeSync(t, dev, 3*extent-4096, newTail)
	dropCaches(t, vg.pv)
	requireEqualBytes(t, "PV at the extended LV's last block", readAt(t, vg.pv, lvOffset+3*extent-4096, 4096), newTail)

	// If the process dies between lvextend and Refresh, Activate fixes
	// the size.
	if _, err := vg.lvm.ExtendLV(ctx, vg.name, "vol", 4*extent); err != nil {
		t.Fatal(err)
	}
	if path, err := restarted.Activate(ctx, vg.name, "vol"); err != nil || path != dev {
		t.Fatalf("Activate after an unrefreshed extend = %q, %v", path, err)
	}
	if info, err := Inspect(dev); err != nil || info.Size != 4*extent {
		t.Errorf("size after Activate of an extended LV = %d, %v; want %d", info.Size, err, 4*extent)
	}

	if err := a.Deactivate(ctx, vg.name, "vol"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.DevicePath(ctx, vg.name, "vol"); !errors.Is(err, ErrNotActive) {
		t.Errorf("DevicePath after Deactivate = %v, want ErrNotActive", err)
	}
	if loops, err := FindLoops(vg.pv); err != nil || len(loops) != 0 {
		t.Errorf("loops over the PV after Deactivate: %+v, %v", loops, err)
	}
	if err := a.Deactivate(ctx, vg.name, "vol"); err != nil {
		t.Errorf("second Deactivate: %v", err)
	}
}

func loopByPath(path string) (LoopDevice, error) {
	loops, err := LoopDevices()
	if err != nil {
		return LoopDevice{}, err
	}
	for _, l := range loops {
		if l.Path == path {
			return l, nil
		}
	}
	return LoopDevice{}, errors.New(path + " is not an attached loop device")
}

func TestLoopActivationRefusesNonContiguousLV(t *testing.T) {
	vg := newTestVG(t, 64<<20)
	ctx := context.Background()
	a, err := NewActivator(ActivationLoop, vg.lvm)
	if err != nil {
		t.Fatal(err)
	}
	// Without Contiguous, extending "split" after "blocker" was allocated
	// gives it two segments with a gap.
	if _, err := vg.lvm.CreateLV(ctx, vg.name, "split", 4<<20, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := vg.lvm.CreateLV(ctx, vg.name, "blocker", 4<<20, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := vg.lvm.ExtendLV(ctx, vg.name, "split", 8<<20); err != nil {
		t.Fatal(err)
	}
	segs, err := vg.lvm.Segments(ctx, vg.name, "split")
	if err != nil || len(segs) != 2 {
		t.Fatalf("segments of split: %+v, %v; want 2", segs, err)
	}
	_, err = a.Activate(ctx, vg.name, "split")
	if !errors.Is(err, ErrNotLoopMappable) {
		t.Fatalf("Activate(two segments) = %v, want ErrNotLoopMappable", err)
	}
	t.Logf("refusal: %v", err)
	if loops, err := FindLoops(vg.pv); err != nil || len(loops) != 0 {
		t.Errorf("a refused activation left loops: %+v, %v", loops, err)
	}

	// With Contiguous, an extension that cannot stay contiguous fails
	// in LVM instead of producing an unmappable LV.
	if _, err := vg.lvm.CreateLV(ctx, vg.name, "contig", 4<<20, CreateOptions{Contiguous: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := vg.lvm.CreateLV(ctx, vg.name, "blocker2", 4<<20, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := vg.lvm.ExtendLV(ctx, vg.name, "contig", 8<<20); !errors.Is(err, ErrNoSpace) {
		t.Errorf("non-contiguous extend of a contiguous LV: %v, want ErrNoSpace", err)
	}
	if _, err := a.Activate(ctx, vg.name, "contig"); err != nil {
		t.Errorf("contiguous LV still activates: %v", err)
	}
}

func TestLoopMappingMergesAdjacentSegments(t *testing.T) {
	// LVM normally merges adjacent segments itself; the mapping must not
	// depend on it.
	bin, _ := fakeLVM(t, `case "$1" in
lvs) echo '{"report":[{"seg":[
 {"lv_name":"v","seg_start_pe":"2","seg_size_pe":"3","segtype":"linear","stripes":"1","seg_pe_ranges":"/dev/pv:12-14"},
 {"lv_name":"v","seg_start_pe":"0","seg_size_pe":"2","segtype":"linear","stripes":"1","seg_pe_ranges":"/dev/pv:10-11"}]}]}';;
vgs) case "$*" in
  *pe_start*) echo '{"report":[{"vg":[{"pv_name":"/dev/pv","vg_name":"vg0","pv_size":"1073741824","pe_start":"1048576"}]}]}';;
  *) echo '{"report":[{"vg":[{"vg_name":"vg0","vg_uuid":"u","vg_size":"1073741824","vg_free":"0","vg_extent_size":"4194304","vg_extent_count":"256","vg_free_count":"0","vg_tags":""}]}]}';;
  esac;;
esac`)
	m, err := LoopMappingOf(context.Background(), &LVM{Command: bin}, "vg0", "v")
	if err != nil {
		t.Fatal(err)
	}
	want := LoopMapping{PV: "/dev/pv", Offset: 1<<20 + 10*4<<20, Size: 5 * 4 << 20}
	if m != want {
		t.Errorf("mapping %+v, want %+v", m, want)
	}
}

// countingLVM returns an LVM like l whose commands are counted: the real
// lvm runs behind a script that logs each call. calls reads the count.
func countingLVM(t *testing.T, l *LVM) (counted *LVM, calls func() int) {
	t.Helper()
	real, err := exec.LookPath("lvm")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	log := filepath.Join(dir, "calls")
	bin := filepath.Join(dir, "lvm")
	script := "#!/bin/sh\necho \"$1\" >> " + log + "\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	c := &LVM{Command: bin, NoDeviceMapper: l.NoDeviceMapper, Devices: l.Devices}
	return c, func() int {
		b, err := os.ReadFile(log)
		if errors.Is(err, os.ErrNotExist) {
			return 0
		}
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(string(b), "\n")
	}
}

func TestLoopActivateAllMapsEveryLVWithThreeCommands(t *testing.T) {
	vg := newTestVG(t, 128<<20)
	ctx := context.Background()
	const extent = 4 << 20
	names := []string{"a", "c", "d", "e", "b"}
	for i, name := range names[:4] {
		if _, err := vg.lvm.CreateLV(ctx, vg.name, name, uint64(i+1)*extent, CreateOptions{Contiguous: true}); err != nil {
			t.Fatal(err)
		}
	}
	// "split" has two segments with a gap: it cannot be mapped.
	if _, err := vg.lvm.CreateLV(ctx, vg.name, "split", extent, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := vg.lvm.CreateLV(ctx, vg.name, "blocker", extent, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := vg.lvm.ExtendLV(ctx, vg.name, "split", 2*extent); err != nil {
		t.Fatal(err)
	}
	// "b" (last, so it can grow in place) is active from before (a
	// restart keeps it), at its old size: the daemon died between
	// lvextend and the refresh.
	if _, err := vg.lvm.CreateLV(ctx, vg.name, "b", 2*extent, CreateOptions{Contiguous: true}); err != nil {
		t.Fatal(err)
	}
	first, err := NewActivator(ActivationLoop, vg.lvm)
	if err != nil {
		t.Fatal(err)
	}
	kept, err := first.Activate(ctx, vg.name, "b")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vg.lvm.ExtendLV(ctx, vg.name, "b", 3*extent); err != nil {
		t.Fatal(err)
	}

	lvm, calls := countingLVM(t, vg.lvm)
	lvs, err := lvm.LogicalVolumes(ctx, vg.name)
	if err != nil {
		t.Fatal(err)
	}
	a, err := NewActivator(ActivationLoop, lvm)
	if err != nil {
		t.Fatal(err)
	}
	before := calls()
	got := a.ActivateAll(ctx, vg.name, lvs)
	if n := calls() - before; n != 3 {
		t.Errorf("ActivateAll of %d LVs ran %d lvm commands, want 3 (segments, VG, PVs)", len(lvs), n)
	}
	if len(got) != len(lvs) {
		t.Errorf("ActivateAll returned %d results for %d LVs: %+v", len(got), len(lvs), got)
	}
	if r := got["split"]; !errors.Is(r.Err, ErrNotLoopMappable) || r.Path != "" {
		t.Errorf("split: %+v, want ErrNotLoopMappable and no device", r)
	}
	if r := got["b"]; r.Err != nil || r.Path != kept {
		t.Errorf("b: %+v, want its existing device %s", r, kept)
	}
	for _, name := range append(names, "blocker") {
		r := got[name]
		if r.Err != nil {
			t.Errorf("%s: %v", name, r.Err)
			continue
		}
		// Each device is the LV's extents, at the LV's current size, as
		// Activate would map them.
		m, err := LoopMappingOf(ctx, vg.lvm, vg.name, name)
		if err != nil {
			t.Fatal(err)
		}
		l, err := loopByPath(r.Path)
		if err != nil || l.Offset != m.Offset || l.SizeLimit != m.Size || l.BackingFile != vg.pv {
			t.Errorf("%s: loop %+v, %v; want %s at offset %d, %d bytes", name, l, err, vg.pv, m.Offset, m.Size)
		}
		if again, err := a.Activate(ctx, vg.name, name); err != nil || again != r.Path {
			t.Errorf("%s: Activate after ActivateAll = %q, %v; want %s", name, again, err, r.Path)
		}
	}
	if loops, err := FindLoops(vg.pv); err != nil || len(loops) != len(names)+1 {
		t.Errorf("loops over the PV: %d, %v; want one per mappable LV (%d)", len(loops), err, len(names)+1)
	}
}
