package hostblk

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// The loop index maps backing files (by device and inode, or a backing
// block device by its number) to the loop devices attached to them. It is
// built from sysfs once, on first use, and kept current by AttachLoop,
// DetachLoop and SetLoopSizeLimit, so finding a pool volume's device does
// not read every loop device's sysfs files (with a thousand volumes that
// was a million reads at start). A hit is verified with one
// LOOP_GET_STATUS64 on the device, so a device another process detached or
// re-attached is never returned; a miss re-reads only the loop devices the
// index does not hold as attached (a loop device attached by another
// process, e.g. losetup, is found then).
type loopIndex struct {
	mu    sync.Mutex
	built bool
	// attached holds the attached loop devices by number.
	attached map[int]LoopDevice
}

var loopIdx loopIndex

// sameBacking says whether loop device l is over the file st describes: a
// block device by its number, a file by its filesystem device and inode.
func sameBacking(l LoopDevice, st *unix.Stat_t) bool {
	if !l.backingKnown {
		return false
	}
	isBlock := st.Mode&unix.S_IFMT == unix.S_IFBLK
	if l.backingIsBlock != isBlock {
		return false
	}
	if isBlock {
		return l.backingRdev == st.Rdev
	}
	return l.backingDev == st.Dev && l.backingIno == st.Ino
}

// buildLocked reads every attached loop device.
func (x *loopIndex) buildLocked() error {
	numbers, err := loopNumbers()
	if err != nil {
		return err
	}
	x.attached = make(map[int]LoopDevice, len(numbers))
	for _, n := range numbers {
		l, ok, err := loopByIoctl(n)
		if err != nil {
			return err
		}
		if ok {
			x.attached[n] = l
		}
	}
	x.built = true
	return nil
}

// loopNumbers lists the loop devices sysfs has, attached or not.
func loopNumbers() ([]int, error) {
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		return nil, err
	}
	var numbers []int
	for _, e := range entries {
		numStr, ok := strings.CutPrefix(e.Name(), "loop")
		if !ok {
			continue
		}
		if n, err := strconv.Atoi(numStr); err == nil {
			numbers = append(numbers, n)
		}
	}
	return numbers, nil
}

// loopByIoctl reads loop device n as loopDeviceInfo does, from two ioctls
// (LOOP_GET_STATUS64 gives the backing file's identity, offset, size limit
// and flags; BLKSSZGET the sector size) and one sysfs file (the backing
// file's path) instead of six sysfs files and a stat. ok is false when n
// is not attached.
func loopByIoctl(n int) (l LoopDevice, ok bool, err error) {
	path := loopPath(n)
	err = withLoopFd(path, func(fd int) error {
		info, err := unix.IoctlLoopGetStatus64(fd)
		if err != nil {
			return err
		}
		sector, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
		if err != nil {
			return err
		}
		l = LoopDevice{
			Path: path, Number: n,
			Offset: info.Offset, SizeLimit: info.Sizelimit,
			ReadOnly:       info.Flags&unix.LO_FLAGS_READ_ONLY != 0,
			DirectIO:       info.Flags&unix.LO_FLAGS_DIRECT_IO != 0,
			SectorSize:     uint32(sector),
			backingKnown:   true,
			backingIsBlock: info.Rdevice != 0,
			backingRdev:    info.Rdevice,
			backingDev:     info.Device,
			backingIno:     info.Inode,
		}
		return nil
	})
	if errors.Is(err, unix.ENXIO) || errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENODEV) {
		return LoopDevice{}, false, nil // not attached, or gone
	}
	if err != nil {
		return LoopDevice{}, false, fmt.Errorf("reading loop device %s: %w", path, err)
	}
	backing, err := readSysfs(fmt.Sprintf("/sys/block/loop%d/loop/backing_file", n))
	if errors.Is(err, os.ErrNotExist) {
		return LoopDevice{}, false, nil // detached meanwhile
	}
	if err != nil {
		return LoopDevice{}, false, err
	}
	l.BackingFile = backing
	if b, ok := strings.CutSuffix(backing, " (deleted)"); ok {
		l.BackingFile, l.BackingDeleted = b, true
	}
	return l, true, nil
}

// refreshLocked brings the index up to date: a device it holds as attached
// is verified with one ioctl (verifyLocked), the others sysfs lists are
// read from sysfs.
func (x *loopIndex) refreshLocked() error {
	if !x.built {
		return x.buildLocked()
	}
	numbers, err := loopNumbers()
	if err != nil {
		return err
	}
	for _, number := range numbers {
		if l, known := x.attached[number]; known {
			if _, ok := x.verifyLocked(l); ok {
				continue
			}
		}
		dev, ok, err := loopByIoctl(number)
		if err != nil {
			return err
		}
		if ok {
			x.attached[number] = dev
		}
	}
	return nil
}

// verifyLocked asks the kernel whether loop device l still maps the same
// backing (LOOP_GET_STATUS64) and updates its offset, size limit and flags;
// ok is false (and l is dropped) when it no longer does.
func (x *loopIndex) verifyLocked(l LoopDevice) (LoopDevice, bool) {
	var info *unix.LoopInfo64
	err := withLoopFd(l.Path, func(fd int) error {
		var err error
		info, err = unix.IoctlLoopGetStatus64(fd)
		return err
	})
	if err != nil || !l.backingKnown {
		delete(x.attached, l.Number)
		return LoopDevice{}, false
	}
	same := info.Device == l.backingDev && info.Inode == l.backingIno
	if !same {
		delete(x.attached, l.Number)
		return LoopDevice{}, false
	}
	l.Offset, l.SizeLimit = info.Offset, info.Sizelimit
	l.ReadOnly = info.Flags&unix.LO_FLAGS_READ_ONLY != 0
	l.DirectIO = info.Flags&unix.LO_FLAGS_DIRECT_IO != 0
	x.attached[l.Number] = l
	return l, true
}

// find returns the loop devices over the file st describes, in device
// order. With refreshOnMiss, finding none re-reads the loop devices the
// index does not know as attached before answering.
func (x *loopIndex) find(st *unix.Stat_t, refreshOnMiss bool) ([]LoopDevice, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if !x.built {
		if err := x.buildLocked(); err != nil {
			return nil, err
		}
		refreshOnMiss = false // just read everything
	}
	found := x.matchLocked(st)
	if len(found) == 0 && refreshOnMiss {
		if err := x.refreshLocked(); err != nil {
			return nil, err
		}
		found = x.matchLocked(st)
	}
	sort.Slice(found, func(i, j int) bool { return found[i].Number < found[j].Number })
	return found, nil
}

func (x *loopIndex) matchLocked(st *unix.Stat_t) []LoopDevice {
	var found []LoopDevice
	for _, l := range x.attached {
		if !sameBacking(l, st) {
			continue
		}
		if l, ok := x.verifyLocked(l); ok {
			found = append(found, l)
		}
	}
	return found
}

// refresh re-reads the loop devices the index does not hold as attached.
func (x *loopIndex) refresh() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.refreshLocked()
}

// added records a device this process attached.
func (x *loopIndex) added(l LoopDevice) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.built {
		x.attached[l.Number] = l
	}
}

// removed forgets the device at path (this process detached it).
func (x *loopIndex) removed(path string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for n, l := range x.attached {
		if l.Path == path {
			delete(x.attached, n)
		}
	}
}

// sizeLimitSet records a new size limit of the device at path.
func (x *loopIndex) sizeLimitSet(path string, limit uint64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for n, l := range x.attached {
		if l.Path == path {
			l.SizeLimit = limit
			x.attached[n] = l
		}
	}
}
