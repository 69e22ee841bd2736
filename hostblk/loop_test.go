package hostblk

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

func TestAttachLoopSectorSizesAndDirectIO(t *testing.T) {
	testRoot(t)
	dir := testDir(t)
	for _, sectorSize := range []uint32{512, 4096} {
		t.Run(fmt.Sprint(sectorSize), func(t *testing.T) {
			const size = 8 << 20
			file := sparseFile(t, dir, fmt.Sprintf("s%d.img", sectorSize), size)
			loop := attachTestLoop(t, file, LoopOptions{SectorSize: sectorSize})
			if !loop.DirectIO {
				t.Error("direct I/O is off")
			}
			if loop.SectorSize != sectorSize {
				t.Errorf("sector size %d, want %d", loop.SectorSize, sectorSize)
			}
			if loop.BackingFile != file || loop.Offset != 0 || loop.SizeLimit != 0 || loop.ReadOnly {
				t.Errorf("LoopDevice = %+v, want backing %s, whole file, writable", loop, file)
			}
			// The kernel's own view, independent of LoopDevice.
			if dio, err := readSysfs(fmt.Sprintf("/sys/block/loop%d/loop/dio", loop.Number)); err != nil || dio != "1" {
				t.Errorf("sysfs loop/dio = %q, %v; want 1", dio, err)
			}
			// Bytes written through the device are in the file at the same
			// offset.
			data := randomBytes(t, 64<<10)
			writeSync(t, loop.Path, 1<<20, data)
			requireEqualBytes(t, "backing file", readAt(t, file, 1<<20, len(data)), data)
		})
	}
}

func TestAttachLoopDefaultsTo4096Sectors(t *testing.T) {
	testRoot(t)
	loop := attachTestLoop(t, sparseFile(t, testDir(t), "d.img", 1<<20), LoopOptions{})
	if loop.SectorSize != 4096 || !loop.DirectIO {
		t.Errorf("default attach: sector size %d direct I/O %v, want 4096 and on", loop.SectorSize, loop.DirectIO)
	}
}

func TestAttachLoopOffsetAndSizeLimit(t *testing.T) {
	testRoot(t)
	file := sparseFile(t, testDir(t), "off.img", 8<<20)
	const off, limit = 1 << 20, 2 << 20
	loop := attachTestLoop(t, file, LoopOptions{Offset: off, SizeLimit: limit})
	if loop.Offset != off || loop.SizeLimit != limit {
		t.Errorf("offset %d size limit %d, want %d and %d", loop.Offset, loop.SizeLimit, off, limit)
	}
	info, err := Inspect(loop.Path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != limit {
		t.Errorf("device size %d, want %d", info.Size, limit)
	}
	data := randomBytes(t, 4096)
	writeSync(t, loop.Path, 0, data)
	requireEqualBytes(t, "file at the offset", readAt(t, file, off, len(data)), data)
}

func TestAttachLoopRejectsBadOptions(t *testing.T) {
	testRoot(t)
	file := sparseFile(t, testDir(t), "bad.img", 1<<20)
	for _, opts := range []LoopOptions{
		{SectorSize: 1000},
		{SectorSize: 8192},
		{Offset: 100},
		{SizeLimit: 4097},
	} {
		if dev, err := AttachLoop(file, opts); err == nil {
			DetachLoop(dev.Path)
			t.Errorf("AttachLoop(%+v) succeeded", opts)
		}
	}
	if _, err := AttachLoop(filepath.Join(t.TempDir(), "missing"), LoopOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("AttachLoop(missing file) = %v, want ErrNotExist", err)
	}
}

func TestFindLoops(t *testing.T) {
	testRoot(t)
	dir := testDir(t)
	file := sparseFile(t, dir, "find.img", 4<<20)
	other := sparseFile(t, dir, "other.img", 4<<20)
	loop := attachTestLoop(t, file, LoopOptions{})

	found, err := FindLoops(file)
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0].Path != loop.Path {
		t.Fatalf("FindLoops(%s) = %+v, want [%s]", file, found, loop.Path)
	}
	// The same file under another name is the same backing file.
	link := filepath.Join(dir, "link.img")
	if err := os.Symlink(file, link); err != nil {
		t.Fatal(err)
	}
	if found, err := FindLoops(link); err != nil || len(found) != 1 || found[0].Path != loop.Path {
		t.Errorf("FindLoops(symlink) = %+v, %v; want [%s]", found, err, loop.Path)
	}
	if found, err := FindLoops(other); err != nil || len(found) != 0 {
		t.Errorf("FindLoops(unattached file) = %+v, %v; want none", found, err)
	}
	all, err := LoopDevices()
	if err != nil {
		t.Fatal(err)
	}
	var listed bool
	for _, l := range all {
		listed = listed || l.Path == loop.Path && l.BackingFile == file
	}
	if !listed {
		t.Errorf("LoopDevices() does not list %s over %s", loop.Path, file)
	}
}

func TestGrowLoopFile(t *testing.T) {
	testRoot(t)
	file := sparseFile(t, testDir(t), "grow.img", 4<<20)
	loop := attachTestLoop(t, file, LoopOptions{})
	if err := GrowLoopFile(file, 12<<20); err != nil {
		t.Fatal(err)
	}
	info, err := Inspect(loop.Path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != 12<<20 {
		t.Fatalf("loop size after growing the file to 12 MiB: %d", info.Size)
	}
	// The new space is usable and lands in the file.
	data := randomBytes(t, 4096)
	writeSync(t, loop.Path, 12<<20-4096, data)
	requireEqualBytes(t, "grown file tail", readAt(t, file, 12<<20-4096, 4096), data)

	if err := GrowLoopFile(file, 12<<20); err != nil {
		t.Errorf("growing to the current size: %v", err)
	}
	if err := GrowLoopFile(file, 4<<20); err == nil || !strings.Contains(err.Error(), "shrinking") {
		t.Errorf("shrinking: %v, want refusal", err)
	}
}

func TestSetLoopSizeLimit(t *testing.T) {
	testRoot(t)
	file := sparseFile(t, testDir(t), "limit.img", 8<<20)
	loop := attachTestLoop(t, file, LoopOptions{SizeLimit: 2 << 20})
	if err := SetLoopSizeLimit(loop.Path, 6<<20); err != nil {
		t.Fatal(err)
	}
	if info, err := Inspect(loop.Path); err != nil || info.Size != 6<<20 {
		t.Fatalf("size after SetLoopSizeLimit(6 MiB) = %d, %v", info.Size, err)
	}
	if found, err := FindLoops(file); err != nil || len(found) != 1 || found[0].SizeLimit != 6<<20 || !found[0].DirectIO {
		t.Errorf("FindLoops after resize = %+v, %v; want size limit 6 MiB, direct I/O kept", found, err)
	}
}

func TestDetachLoop(t *testing.T) {
	testRoot(t)
	file := sparseFile(t, testDir(t), "detach.img", 4<<20)
	loop := attachTestLoop(t, file, LoopOptions{})
	if err := DetachLoop(loop.Path); err != nil {
		t.Fatal(err)
	}
	if found, err := FindLoops(file); err != nil || len(found) != 0 {
		t.Fatalf("FindLoops after detach = %+v, %v; want none", found, err)
	}
	// Another test may have attached the freed device to its own file.
	if b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/backing_file", loop.Number)); err == nil && strings.TrimSpace(string(b)) == file {
		t.Errorf("sysfs still has %s as the backing file after detach", file)
	}
	// Detaching again is fine (cleanups are retried after crashes), and
	// leaves alone a device another process attached meanwhile.
	if err := DetachLoopDevice(loop); err != nil {
		t.Errorf("second detach: %v", err)
	}
}

// TestAttachLoopConcurrent races attaches against each other: they all ask
// LOOP_CTL_GET_FREE at once and get the same device, and all but one must
// retry on EBUSY.
func TestAttachLoopConcurrent(t *testing.T) {
	testRoot(t)
	dir := testDir(t)
	const workers, rounds = 8, 3
	for round := 0; round < rounds; round++ {
		files := make([]string, workers)
		for i := range files {
			files[i] = sparseFile(t, dir, fmt.Sprintf("r%d-%d.img", round, i), 1<<20)
		}
		devs := make([]LoopDevice, workers)
		errs := make([]error, workers)
		var start, done sync.WaitGroup
		start.Add(1)
		for i := range files {
			done.Add(1)
			go func() {
				defer done.Done()
				start.Wait()
				devs[i], errs[i] = AttachLoop(files[i], LoopOptions{})
			}()
		}
		start.Done()
		done.Wait()
		for i, err := range errs {
			if err == nil {
				t.Cleanup(func() { detachAllOver(t, files[i]) })
			}
		}
		seen := map[string]bool{}
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d attach %d: %v", round, i, err)
			}
			if seen[devs[i].Path] {
				t.Fatalf("round %d: %s handed out twice", round, devs[i].Path)
			}
			seen[devs[i].Path] = true
			found, err := FindLoops(files[i])
			if err != nil || len(found) != 1 || found[0].Path != devs[i].Path {
				t.Fatalf("round %d: %s should be the only loop over %s, found %+v (%v)", round, devs[i].Path, files[i], found, err)
			}
		}
	}
}

// TestRemoveLoopDevice: a detached loop device can be removed; an attached
// one cannot.
func TestRemoveLoopDevice(t *testing.T) {
	testRoot(t)
	backing := sparseFile(t, testDir(t), "remove.img", 16<<20)
	dev, err := AttachLoop(backing, LoopOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { DetachLoop(dev.Path) })
	n, err := strconv.Atoi(strings.TrimPrefix(dev.Path, "/dev/loop"))
	if err != nil {
		t.Fatalf("loop device path %q: %v", dev.Path, err)
	}
	if err := RemoveLoopDevice(n); err == nil {
		t.Fatalf("RemoveLoopDevice(%d) removed an attached device", n)
	}
	if err := DetachLoop(dev.Path); err != nil {
		t.Fatal(err)
	}
	if err := RemoveLoopDevice(n); err != nil {
		t.Fatalf("RemoveLoopDevice(%d) after detach: %v", n, err)
	}
	if _, err := os.Stat(fmt.Sprintf("/sys/block/loop%d", n)); !os.IsNotExist(err) {
		t.Errorf("/sys/block/loop%d still exists after removal (%v)", n, err)
	}
}

// TestLoopBackingFileAndPoolVolume: the host facts the hook and the
// domain policy read without a daemon. A loop device names its backing
// file; a file (or a loop device over it, or a symlink to either) is a
// pool volume exactly when it carries the pool metadata xattr.
func TestLoopBackingFileAndPoolVolume(t *testing.T) {
	testRoot(t)
	dir := testDir(t)
	plain := sparseFile(t, dir, "plain.img", 8<<20)
	volume := sparseFile(t, dir, "volume.img", 8<<20)
	if err := unix.Setxattr(volume, poolMetaXattr, []byte(`{}`), 0); err != nil {
		t.Fatal(err)
	}
	plainLoop := attachTestLoop(t, plain, LoopOptions{})
	volumeLoop := attachTestLoop(t, volume, LoopOptions{})
	link := filepath.Join(dir, "link")
	if err := os.Symlink(volumeLoop.Path, link); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{plainLoop.Path: plain, volumeLoop.Path: volume, plain: "", link: "", "/dev/loop-control": ""} {
		if got := LoopBackingFile(path); got != want {
			t.Errorf("LoopBackingFile(%s) = %q, want %q", path, got, want)
		}
	}
	for path, want := range map[string]bool{plain: false, plainLoop.Path: false, volume: true, volumeLoop.Path: true, link: true, "/dev/loop-control": false} {
		if got := IsLoopPoolVolume(path); got != want {
			t.Errorf("IsLoopPoolVolume(%s) = %v, want %v", path, got, want)
		}
	}
}
