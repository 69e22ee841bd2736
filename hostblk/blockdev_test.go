package hostblk

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/volagent/volagent/internal/testutil"
	"golang.org/x/sys/unix"
)

func TestDeviceInfo(t *testing.T) {
	testRoot(t)
	dir := testDir(t)
	for _, tc := range []struct {
		name       string
		sectorSize uint32
		readOnly   bool
	}{
		{"512", 512, false},
		{"4096", 4096, false},
		{"4096-readonly", 4096, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 8 << 20
			file := sparseFile(t, dir, tc.name+".img", size)
			loop := attachTestLoop(t, file, LoopOptions{SectorSize: tc.sectorSize, ReadOnly: tc.readOnly})
			info, err := Inspect(loop.Path)
			if err != nil {
				t.Fatal(err)
			}
			want := DeviceInfo{Path: loop.Path, Size: size, LogicalBlockSize: int(tc.sectorSize), ReadOnly: tc.readOnly}
			// A loop device's physical block size is at least its logical
			// one; the exact value depends on the backing filesystem.
			if info.PhysicalBlockSize < info.LogicalBlockSize || info.PhysicalBlockSize%info.LogicalBlockSize != 0 {
				t.Errorf("physical block size %d vs logical %d", info.PhysicalBlockSize, info.LogicalBlockSize)
			}
			want.PhysicalBlockSize = info.PhysicalBlockSize
			if info != want {
				t.Errorf("Inspect(%s) = %+v, want %+v", loop.Path, info, want)
			}
		})
	}
}

func TestOpenDeviceRejectsRegularFile(t *testing.T) {
	file := sparseFile(t, t.TempDir(), "f", 4096)
	_, err := OpenDevice(file, OpenOptions{})
	if err == nil || !strings.Contains(err.Error(), "not a block device") {
		t.Fatalf("OpenDevice(regular file) = %v, want a not-a-block-device error", err)
	}
}

func TestExclusiveOpenRefusesSecondWriter(t *testing.T) {
	testRoot(t)
	file := sparseFile(t, testDir(t), "excl.img", 4<<20)
	loop := attachTestLoop(t, file, LoopOptions{})

	first, err := OpenDevice(loop.Path, OpenOptions{Write: true, Exclusive: true})
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()

	second, err := OpenDevice(loop.Path, OpenOptions{Write: true, Exclusive: true})
	if err == nil {
		second.Close()
		t.Fatal("second exclusive open succeeded while the first is open")
	}
	if !errors.Is(err, ErrDeviceBusy) {
		t.Fatalf("second exclusive open: %v, want ErrDeviceBusy", err)
	}
	if !strings.Contains(err.Error(), loop.Path) {
		t.Errorf("error %q does not name the device", err)
	}
	usage, err := DeviceUsage(loop.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !usage.Claimed || !usage.InUse() {
		t.Errorf("DeviceUsage while exclusively open = %+v, want Claimed", usage)
	}

	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	third, err := OpenDevice(loop.Path, OpenOptions{Write: true, Exclusive: true})
	if err != nil {
		t.Fatalf("exclusive open after the first writer closed: %v", err)
	}
	third.Close()
}

// TestExclusiveOpenAndMount checks both directions against a mounted
// filesystem: no exclusive open of a mounted device, and no mount of an
// exclusively open one.
func TestExclusiveOpenAndMount(t *testing.T) {
	testRoot(t)
	testutil.RequireTool(t, "mkfs.ext4", "mount", "umount")
	dir := testDir(t)
	file := sparseFile(t, dir, "fs.img", 32<<20)
	loop := attachTestLoop(t, file, LoopOptions{})
	testutil.Run(t, "mkfs.ext4", "-q", "-F", loop.Path)
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}

	dev, err := OpenDevice(loop.Path, OpenOptions{Write: true, Exclusive: true})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", loop.Path, mnt).CombinedOutput(); err == nil {
		exec.Command("umount", mnt).Run()
		t.Errorf("mounted a device held exclusively by a writer")
	} else {
		t.Logf("mount refused as expected: %s", strings.TrimSpace(string(out)))
	}
	dev.Close()

	testutil.Run(t, "mount", loop.Path, mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	if dev, err := OpenDevice(loop.Path, OpenOptions{Write: true, Exclusive: true}); !errors.Is(err, ErrDeviceBusy) {
		if err == nil {
			dev.Close()
		}
		t.Errorf("exclusive open of a mounted device: %v, want ErrDeviceBusy", err)
	}
	if usage, err := DeviceUsage(loop.Path); err != nil || !usage.Claimed {
		t.Errorf("DeviceUsage(mounted) = %+v, %v; want Claimed", usage, err)
	}
	testutil.Run(t, "umount", mnt)
}

func TestDeviceUsage(t *testing.T) {
	testRoot(t)
	file := sparseFile(t, testDir(t), "usage.img", 8<<20)
	lower := attachTestLoop(t, file, LoopOptions{})

	usage, err := DeviceUsage(lower.Path)
	if err != nil {
		t.Fatal(err)
	}
	if usage.InUse() {
		t.Fatalf("DeviceUsage(fresh loop) = %+v, want not in use", usage)
	}

	upper, err := AttachLoop(lower.Path, LoopOptions{Offset: 4096, SizeLimit: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer DetachLoop(upper.Path)
	usage, err = DeviceUsage(lower.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(usage.LoopDevices, []string{upper.Path}) || !usage.InUse() {
		t.Fatalf("DeviceUsage(loop under %s) = %+v, want LoopDevices [%s]", upper.Path, usage, upper.Path)
	}

	if _, err := DeviceUsage(file); err == nil {
		t.Error("DeviceUsage(regular file) succeeded")
	}
}

func TestZeroOutAndDiscard(t *testing.T) {
	testRoot(t)
	const size = 4 << 20
	file := sparseFile(t, testDir(t), "zero.img", size)
	loop := attachTestLoop(t, file, LoopOptions{SectorSize: 4096})
	data := randomBytes(t, size)
	writeSync(t, loop.Path, 0, data)

	dev, err := OpenDevice(loop.Path, OpenOptions{Write: true, Exclusive: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()

	// Zero-out: the range reads as zeros, its neighbours are untouched.
	const zOff, zLen = 64 << 10, 128 << 10
	if err := dev.ZeroOut(zOff, zLen); err != nil {
		t.Fatal(err)
	}
	got := readAt(t, loop.Path, 0, size)
	want := slices.Clone(data)
	clear(want[zOff : zOff+zLen])
	requireEqualBytes(t, "device after ZeroOut", got, want)

	// Discard on a loop device punches a hole in the backing file.
	blocksBefore := allocatedBlocks(t, file)
	const dOff, dLen = 1 << 20, 2 << 20
	if err := dev.Discard(dOff, dLen); err != nil {
		t.Fatal(err)
	}
	if after := allocatedBlocks(t, file); after >= blocksBefore {
		t.Errorf("backing file blocks %d -> %d after discarding %d bytes, want fewer", blocksBefore, after, dLen)
	}
	got = readAt(t, loop.Path, 0, size)
	clear(want[dOff : dOff+dLen])
	requireEqualBytes(t, "device after Discard", got, want)

	for _, bad := range []struct{ off, length int64 }{
		{512, 4096},         // misaligned offset for 4096-byte sectors
		{0, 100},            // misaligned length
		{-4096, 4096},       // negative
		{0, 0},              // empty
		{size - 4096, 8192}, // beyond the end
	} {
		if err := dev.ZeroOut(bad.off, bad.length); err == nil {
			t.Errorf("ZeroOut(%d, %d) succeeded", bad.off, bad.length)
		}
		if err := dev.Discard(bad.off, bad.length); err == nil {
			t.Errorf("Discard(%d, %d) succeeded", bad.off, bad.length)
		}
	}
	err = dev.ZeroOut(512, 4096)
	if err == nil || !strings.Contains(err.Error(), "logical block size 4096") {
		t.Errorf("misaligned ZeroOut error %v does not name the block size", err)
	}
}

func allocatedBlocks(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}

func TestReadOnlyLoopRefusesWrites(t *testing.T) {
	testRoot(t)
	file := sparseFile(t, testDir(t), "ro.img", 4<<20)
	loop := attachTestLoop(t, file, LoopOptions{ReadOnly: true})
	if !loop.ReadOnly {
		t.Errorf("LoopDevice.ReadOnly = false for a read-only attach")
	}
	f, err := os.OpenFile(loop.Path, os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteAt(bytes.Repeat([]byte{1}, 4096), 0)
		if err == nil {
			err = f.Sync()
		}
		f.Close()
	}
	if err == nil {
		t.Fatal("writing a read-only loop device succeeded")
	}
}
