package hostblk

import (
	"context"
	"errors"
	"slices"
	"testing"
)

// These tests run the real lvm on a volume group of one loop-device PV.

func TestLVMVolumeGroupReports(t *testing.T) {
	vg := newTestVG(t, 64<<20)
	ctx := context.Background()

	vgs, err := vg.lvm.VolumeGroups(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// --devices hides every other VG on the host.
	if len(vgs) != 1 || vgs[0].Name != vg.name {
		t.Fatalf("VolumeGroups = %+v, want only %s", vgs, vg.name)
	}
	info := vgs[0]
	// 64 MiB PV minus 1 MiB of metadata area = 15 extents of 4 MiB.
	if info.ExtentSize != 4<<20 || info.ExtentCount != 15 || info.FreeExtents != 15 ||
		info.Size != 15*4<<20 || info.Free != info.Size || info.UUID == "" {
		t.Errorf("VolumeGroup = %+v", info)
	}
	if one, err := vg.lvm.VolumeGroup(ctx, vg.name); err != nil || !equalVG(one, info) {
		t.Errorf("VolumeGroup(%s) = %+v, %v", vg.name, one, err)
	}
	pvs, err := vg.lvm.PhysicalVolumes(ctx, vg.name)
	if err != nil {
		t.Fatal(err)
	}
	if len(pvs) != 1 || pvs[0].Name != vg.pv || pvs[0].VG != vg.name || pvs[0].PEStart != 1<<20 || pvs[0].Size != 15*4<<20 {
		t.Errorf("PhysicalVolumes = %+v", pvs)
	}
}

func equalVG(a, b VG) bool {
	return a.Name == b.Name && a.UUID == b.UUID && a.Size == b.Size && a.Free == b.Free &&
		a.ExtentSize == b.ExtentSize && slices.Equal(a.Tags, b.Tags)
}

func TestLVMLogicalVolumeLifecycle(t *testing.T) {
	vg := newTestVG(t, 64<<20)
	ctx := context.Background()
	l := vg.lvm

	meta := VolumeMeta{Role: "overlay", BackingName: "/var/lib/images/base image.qcow2", BackingFormat: "qcow2"}
	tags, err := meta.Tags()
	if err != nil {
		t.Fatal(err)
	}
	// 5 MiB rounds up to two 4 MiB extents.
	lv, err := l.CreateLV(ctx, vg.name, "vol1", 5<<20, CreateOptions{Tags: tags})
	if err != nil {
		t.Fatal(err)
	}
	if lv.Name != "vol1" || lv.VG != vg.name || lv.Size != 8<<20 || lv.Path != "/dev/"+vg.name+"/vol1" || lv.UUID == "" {
		t.Errorf("CreateLV = %+v", lv)
	}
	// The pool's state comes back from LVM alone.
	got, owned, err := ParseVolumeTags(lv.Tags)
	if err != nil || !owned || got != meta {
		t.Errorf("metadata from tags %q = %+v, owned %v, %v; want %+v", lv.Tags, got, owned, err, meta)
	}
	if info, err := l.VolumeGroup(ctx, vg.name); err != nil || info.Free != 13*4<<20 {
		t.Errorf("VG free after an 8 MiB LV = %d, %v", info.Free, err)
	}

	if err := l.AddLVTags(ctx, vg.name, "vol1", "extra", "volagent.x=1"); err != nil {
		t.Fatal(err)
	}
	if err := l.DeleteLVTags(ctx, vg.name, "vol1", "extra", "not-there"); err != nil {
		t.Fatal(err)
	}
	lv, err = l.LogicalVolume(ctx, vg.name, "vol1")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(lv.Tags, "volagent.x=1") || slices.Contains(lv.Tags, "extra") || !slices.Contains(lv.Tags, OwnerTag) {
		t.Errorf("tags after add/delete: %q", lv.Tags)
	}

	lv, err = l.ExtendLV(ctx, vg.name, "vol1", 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	if lv.Size != 16<<20 {
		t.Errorf("size after ExtendLV(16 MiB) = %d", lv.Size)
	}
	// Extending to a size the LV already has is a no-op, not an error.
	if lv, err = l.ExtendLV(ctx, vg.name, "vol1", 12<<20); err != nil || lv.Size != 16<<20 {
		t.Errorf("ExtendLV(smaller) = %d, %v; want 16 MiB, nil", lv.Size, err)
	}

	if err := l.RenameLV(ctx, vg.name, "vol1", "vol2"); err != nil {
		t.Fatal(err)
	}
	lvs, err := l.LogicalVolumes(ctx, vg.name)
	if err != nil {
		t.Fatal(err)
	}
	if len(lvs) != 1 || lvs[0].Name != "vol2" || lvs[0].Size != 16<<20 || lvs[0].UUID != lv.UUID {
		t.Errorf("LogicalVolumes after rename = %+v", lvs)
	}

	if err := l.RemoveLV(ctx, vg.name, "vol2"); err != nil {
		t.Fatal(err)
	}
	if _, err := l.LogicalVolume(ctx, vg.name, "vol2"); !errors.Is(err, ErrLVNotFound) {
		t.Errorf("LogicalVolume after remove: %v, want ErrLVNotFound", err)
	}
	if lvs, err := l.LogicalVolumes(ctx, vg.name); err != nil || len(lvs) != 0 {
		t.Errorf("LogicalVolumes after remove = %+v, %v", lvs, err)
	}
	if info, err := l.VolumeGroup(ctx, vg.name); err != nil || info.Free != info.Size {
		t.Errorf("VG after remove: %+v, %v; want all free", info, err)
	}
}

func TestLVMErrors(t *testing.T) {
	vg := newTestVG(t, 64<<20)
	ctx := context.Background()
	l := vg.lvm
	missing := vg.name + "_missing"

	requireLVMError := func(t *testing.T, what string, err, sentinel error) {
		t.Helper()
		var lvmErr *LVMError
		if !errors.As(err, &lvmErr) {
			t.Fatalf("%s: %v (%T), want an *LVMError", what, err, err)
		}
		if !errors.Is(err, sentinel) {
			t.Errorf("%s: %v, want %v", what, err, sentinel)
		}
		if lvmErr.ExitCode != 5 || lvmErr.Stderr == "" || len(lvmErr.Args) == 0 {
			t.Errorf("%s: LVMError %+v lacks exit code, stderr or args", what, lvmErr)
		}
	}

	_, err := l.VolumeGroup(ctx, missing)
	requireLVMError(t, "VolumeGroup(missing)", err, ErrVGNotFound)
	_, err = l.LogicalVolumes(ctx, missing)
	requireLVMError(t, "LogicalVolumes(missing VG)", err, ErrVGNotFound)
	_, err = l.PhysicalVolumes(ctx, missing)
	requireLVMError(t, "PhysicalVolumes(missing VG)", err, ErrVGNotFound)
	_, err = l.CreateLV(ctx, missing, "v", 4<<20, CreateOptions{})
	requireLVMError(t, "CreateLV(missing VG)", err, ErrVGNotFound)

	_, err = l.LogicalVolume(ctx, vg.name, "nolv")
	requireLVMError(t, "LogicalVolume(missing)", err, ErrLVNotFound)
	err = l.RemoveLV(ctx, vg.name, "nolv")
	requireLVMError(t, "RemoveLV(missing)", err, ErrLVNotFound)
	err = l.RenameLV(ctx, vg.name, "nolv", "x")
	requireLVMError(t, "RenameLV(missing)", err, ErrLVNotFound)
	err = l.AddLVTags(ctx, vg.name, "nolv", "t")
	requireLVMError(t, "AddLVTags(missing)", err, ErrLVNotFound)
	err = l.RemoveLV(ctx, missing, "nolv")
	requireLVMError(t, "RemoveLV(missing VG)", err, ErrVGNotFound)
	_, err = l.ExtendLV(ctx, vg.name, "nolv", 8<<20)
	requireLVMError(t, "ExtendLV(missing)", err, ErrLVNotFound)

	if _, err := l.CreateLV(ctx, vg.name, "dup", 4<<20, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err = l.CreateLV(ctx, vg.name, "dup", 4<<20, CreateOptions{})
	requireLVMError(t, "CreateLV(duplicate)", err, ErrLVExists)
	if _, err := l.CreateLV(ctx, vg.name, "other", 4<<20, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	err = l.RenameLV(ctx, vg.name, "other", "dup")
	requireLVMError(t, "RenameLV(onto existing)", err, ErrLVExists)

	_, err = l.CreateLV(ctx, vg.name, "big", 1<<30, CreateOptions{})
	requireLVMError(t, "CreateLV(too big)", err, ErrNoSpace)
	_, err = l.ExtendLV(ctx, vg.name, "dup", 1<<30)
	requireLVMError(t, "ExtendLV(too big)", err, ErrNoSpace)
	// A failed command changed nothing.
	if lv, err := l.LogicalVolume(ctx, vg.name, "dup"); err != nil || lv.Size != 4<<20 {
		t.Errorf("dup after failed extend: %+v, %v", lv, err)
	}
}
