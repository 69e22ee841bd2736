package hostblk

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
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
