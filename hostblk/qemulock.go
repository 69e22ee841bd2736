package hostblk

// qemu's image locks (block/file-posix.c), spoken both ways: volagent
// takes the locks qemu-img would take, so qemu refuses what volagent is
// writing, and it tests for qemu's locks, so volagent refuses what qemu
// holds.
//
// The protocol: open file description (OFD) locks, always F_RDLCK, one
// byte each. Byte 100+i means "I hold permission i", byte 200+i "I do
// not share permission i". Before using an image qemu takes its own bytes
// and then tests, with F_OFD_GETLK and F_WRLCK (which a read lock of
// anyone else blocks), byte 200+i for each permission it wants and byte
// 100+i for each permission it refuses to share. A conflict drops its
// bytes again and fails with `Failed to get "write" lock` (or `shared
// "write" lock`).

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrImageInUse: another process (a qemu, qemu-img, another volagent)
// holds qemu's image locks in a way that conflicts with the use asked
// for. Errors matching it are *ImageInUseError and also match
// ErrTargetBusy.
var ErrImageInUse = errors.New("image is in use")

// Perm is one of qemu's block permissions (BLK_PERM_*), numbered as
// qemu numbers their lock bytes.
type Perm uint

const (
	PermConsistentRead Perm = 0
	PermWrite          Perm = 1
	PermWriteUnchanged Perm = 2
	PermResize         Perm = 3
	// PermGraphMod existed in qemu up to 6.1 (BLK_PERM_GRAPH_MOD); its
	// bytes 104 and 204 are tested and set as those versions did.
	PermGraphMod Perm = 4

	numPerms = 5
	// Offsets of qemu's lock bytes (RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE).
	lockPermBase   = 100
	lockSharedBase = 200
)

var permNames = [numPerms]string{"consistent read", "write", "write unchanged", "resize", "change children"}

// Perms is a set of permissions.
type Perms uint8

// PermSet makes a set of perms.
func PermSet(perms ...Perm) Perms {
	var s Perms
	for _, p := range perms {
		s |= 1 << p
	}
	return s
}

// Has reports whether p is in the set.
func (s Perms) Has(p Perm) bool { return s&(1<<p) != 0 }

// Names are the permissions' names, as qemu prints them.
func (s Perms) Names() []string {
	var out []string
	for i := Perm(0); i < numPerms; i++ {
		if s.Has(i) {
			out = append(out, permNames[i])
		}
	}
	return out
}

func (s Perms) String() string {
	if s == 0 {
		return "none"
	}
	return strings.Join(s.Names(), ", ")
}

// The lock sets of qemu-img.
var (
	// WriterLocks are what qemu-img takes on an image it writes (qemu
	// 7.x: bytes 100, 101, 103, 201, 203; qemu up to 6.1 also 204): it
	// holds consistent read, write and resize, and shares neither write
	// nor resize.
	WriterLocks = LockSet{Hold: PermSet(PermConsistentRead, PermWrite, PermResize), Unshared: PermSet(PermWrite, PermResize, PermGraphMod)}
	// ReaderLocks are what qemu-img check, info and convert take without
	// -U: they hold consistent read and share neither write nor resize
	// (the qcow2 metadata must not change under them).
	ReaderLocks = LockSet{Hold: PermSet(PermConsistentRead), Unshared: PermSet(PermWrite, PermResize, PermGraphMod)}
	// SharedReaderLocks are qemu-img -U's (force-share): consistent read,
	// everything shared.
	SharedReaderLocks = LockSet{Hold: PermSet(PermConsistentRead)}
)

// GuestDiskLocks are what a qemu guest device takes on its disk's top
// image: consistent read, and write unless the disk is read-only; it does
// not share resize, nor write unless the disk is shareable (share-rw).
func GuestDiskLocks(readOnly, shareable bool) LockSet {
	set := LockSet{Hold: PermSet(PermConsistentRead), Unshared: PermSet(PermResize)}
	if !readOnly {
		set.Hold |= PermSet(PermWrite)
	}
	if !shareable {
		set.Unshared |= PermSet(PermWrite)
	}
	return set
}

// BackingLocks are what qemu takes on a backing image: consistent read,
// and neither write nor resize shared.
var BackingLocks = LockSet{Hold: PermSet(PermConsistentRead), Unshared: PermSet(PermWrite, PermResize)}

// LockSet says which permissions a user of an image holds and which it
// does not share.
type LockSet struct {
	Hold, Unshared Perms
}

// ImageLock is a set of qemu image locks held on an open file. The locks
// belong to the file's open file description: they go when it is closed
// or Release is called.
type ImageLock struct {
	f    *os.File
	set  LockSet
	path string
}

// LockImage takes set's qemu image locks on f (open for reading) as qemu
// does: its own bytes first, then the test for conflicts, so that two
// parties starting at once both see each other. A conflict drops the
// bytes it took and returns an *ImageInUseError (errors.Is ErrImageInUse
// and ErrTargetBusy) naming the holders it found in /proc.
func LockImage(f *os.File, set LockSet) (*ImageLock, error) {
	l := &ImageLock{f: f, set: set, path: f.Name()}
	var taken []int64
	var failed int64
	apply := func(off int64) error {
		if err := ofdLock(f, unix.F_OFD_SETLK, unix.F_RDLCK, off); err != nil {
			failed = off
			return err
		}
		taken = append(taken, off)
		return nil
	}
	var err error
	for i := Perm(0); i < numPerms && err == nil; i++ {
		if set.Hold.Has(i) {
			err = apply(lockPermBase + int64(i))
		}
	}
	for i := Perm(0); i < numPerms && err == nil; i++ {
		if set.Unshared.Has(i) {
			err = apply(lockSharedBase + int64(i))
		}
	}
	var conflicts []string
	var holders []Holder // found by the test for other nodes
	switch {
	case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES):
		// Someone holds a write lock on the byte: not qemu's protocol,
		// but certainly a user that does not want to share it.
		conflicts = append(conflicts, fmt.Sprintf("Failed to lock byte %d", failed))
	case err != nil:
		unlockBytes(f, taken)
		return nil, &os.PathError{Op: "lock (qemu image lock bytes)", Path: l.path, Err: err}
	default:
		conflicts, err = testConflicts(f, set)
		if err == nil && len(conflicts) == 0 {
			conflicts, holders, err = otherNodeConflicts(nil, f, set)
		}
		if err != nil {
			unlockBytes(f, taken)
			return nil, err
		}
	}
	if len(conflicts) > 0 {
		unlockBytes(f, taken)
		if holders == nil {
			holders, _ = FindHolders(f, true)
		}
		return nil, &ImageInUseError{Path: l.path, Conflicts: conflicts, Holders: holders}
	}
	return l, nil
}

// testConflicts is qemu's raw_check_lock_bytes: it returns qemu's
// message for each conflict.
func testConflicts(f *os.File, set LockSet) ([]string, error) {
	var out []string
	for i := Perm(0); i < numPerms; i++ {
		if !set.Hold.Has(i) {
			continue
		}
		busy, err := ofdLocked(f, lockSharedBase+int64(i))
		if err != nil {
			return nil, err
		}
		if busy {
			out = append(out, fmt.Sprintf("Failed to get %q lock", permNames[i]))
		}
	}
	for i := Perm(0); i < numPerms; i++ {
		if !set.Unshared.Has(i) {
			continue
		}
		busy, err := ofdLocked(f, lockPermBase+int64(i))
		if err != nil {
			return nil, err
		}
		if busy {
			out = append(out, fmt.Sprintf("Failed to get shared %q lock", permNames[i]))
		}
	}
	return out, nil
}

// otherNodeConflicts finds, for a block device, the conflicts with locks
// taken through another device node of the same device (a qemu in a
// private /dev has its own node, with its own inode, which the kernel's
// lock test does not see).
// It also returns the holders it found, for the refusal's message.
func otherNodeConflicts(locks *LockTable, f *os.File, set LockSet) ([]string, []Holder, error) {
	var st unix.Stat_t
	if err := withFd(f, func(fd int) error { return unix.Fstat(fd, &st) }); err != nil {
		return nil, nil, &os.PathError{Op: "fstat", Path: f.Name(), Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return nil, nil, nil
	}
	holders, err := findHolders(locks, f, true, true)
	if err != nil {
		return nil, nil, err
	}
	var out []string
	for _, h := range holders {
		for _, i := range (h.Unshared & set.Hold).Names() {
			out = append(out, fmt.Sprintf("Failed to get %q lock (held through another node of the device)", i))
		}
		for _, i := range (h.Held & set.Unshared).Names() {
			out = append(out, fmt.Sprintf("Failed to get shared %q lock (held through another node of the device)", i))
		}
	}
	return out, holders, nil
}

// CheckImageLocks reports, without taking any lock, whether a qemu that
// opened f with set would be refused by the locks others hold, on f's
// node or on another node of the same block device: nil if not, else an
// *ImageInUseError naming the holders. The libvirt hook asks it for every
// image of a domain about to start, because a qemu in libvirt's private
// /dev locks a node of its own and would not see a writer's locks on the
// host's node. locks is a reading of /proc/locks (nil: read it now, if f
// is a block device).
func CheckImageLocks(locks *LockTable, f *os.File, set LockSet) error {
	conflicts, err := testConflicts(f, set)
	var holders []Holder // found by the test for other nodes
	if err == nil && len(conflicts) == 0 {
		conflicts, holders, err = otherNodeConflicts(locks, f, set)
	}
	if err != nil || len(conflicts) == 0 {
		return err
	}
	if holders == nil {
		holders, _ = findHolders(locks, f, true, false)
	}
	return &ImageInUseError{Path: f.Name(), Conflicts: conflicts, Holders: holders}
}

// CheckImageLocksPath is CheckImageLocks on the image at path, opened
// read-only just for the test. Anything but a regular file or a block
// device has no image locks: nil.
func CheckImageLocksPath(locks *LockTable, path string, set LockSet) error {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() && st.Mode()&os.ModeDevice == 0 || st.Mode()&os.ModeCharDevice != 0 {
		return nil
	}
	return CheckImageLocks(locks, f, set)
}

// Release drops the locks (closing the file would too).
func (l *ImageLock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	var offs []int64
	for i := Perm(0); i < numPerms; i++ {
		if l.set.Hold.Has(i) {
			offs = append(offs, lockPermBase+int64(i))
		}
		if l.set.Unshared.Has(i) {
			offs = append(offs, lockSharedBase+int64(i))
		}
	}
	err := unlockBytes(l.f, offs)
	l.f = nil
	return err
}

func unlockBytes(f *os.File, offs []int64) error {
	var errs []error
	for _, off := range offs {
		if err := ofdLock(f, unix.F_OFD_SETLK, unix.F_UNLCK, off); err != nil {
			errs = append(errs, fmt.Errorf("unlock byte %d of %s: %w", off, f.Name(), err))
		}
	}
	return errors.Join(errs...)
}

// ofdLock runs one F_OFD_SETLK on a single byte.
func ofdLock(f *os.File, cmd int, typ int16, off int64) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: off, Len: 1}
	return withFd(f, func(fd int) error { return unix.FcntlFlock(uintptr(fd), cmd, &lk) })
}

// ofdLocked is qemu_lock_fd_test(exclusive): whether another open file
// description holds a lock on byte off.
func ofdLocked(f *os.File, off int64) (bool, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: off, Len: 1}
	err := withFd(f, func(fd int) error { return unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &lk) })
	if err != nil {
		return false, &os.PathError{Op: "F_OFD_GETLK", Path: f.Name(), Err: err}
	}
	return lk.Type != unix.F_UNLCK, nil
}

func withFd(f *os.File, fn func(fd int) error) error {
	conn, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := conn.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// ImageUsage is what others hold of an image, by qemu's locks.
type ImageUsage struct {
	// Held are the permissions other open files hold (bytes 100+i).
	Held Perms
	// Unshared are the permissions other open files refuse to share
	// (bytes 200+i).
	Unshared Perms
	// Holders are the processes found holding the locks.
	Holders []Holder
}

// InUse reports whether anyone else holds any of qemu's image locks.
func (u ImageUsage) InUse() bool { return u.Held != 0 || u.Unshared != 0 || len(u.Holders) > 0 }

// ProbeImage reports who else holds qemu's image locks on the file open
// as f, taking no lock itself.
func ProbeImage(f *os.File) (ImageUsage, error) {
	var u ImageUsage
	for i := Perm(0); i < numPerms; i++ {
		held, err := ofdLocked(f, lockPermBase+int64(i))
		if err != nil {
			return ImageUsage{}, err
		}
		unshared, err := ofdLocked(f, lockSharedBase+int64(i))
		if err != nil {
			return ImageUsage{}, err
		}
		if held {
			u.Held |= PermSet(i)
		}
		if unshared {
			u.Unshared |= PermSet(i)
		}
	}
	var st unix.Stat_t
	if err := withFd(f, func(fd int) error { return unix.Fstat(fd, &st) }); err != nil {
		return ImageUsage{}, &os.PathError{Op: "fstat", Path: f.Name(), Err: err}
	}
	if u.Held == 0 && u.Unshared == 0 && st.Mode&unix.S_IFMT != unix.S_IFBLK {
		// A regular file has one inode, and the lock test above saw
		// every lock on it: nobody holds any. (A block device may be
		// locked through another node, which only /proc shows.)
		return u, nil
	}
	var err error
	u.Holders, err = FindHolders(f, true)
	if err != nil {
		return ImageUsage{}, err
	}
	return u, nil
}

// Err is nil for an unused image, else an *ImageInUseError for path
// that says what the others hold.
func (u ImageUsage) Err(path string) error {
	if !u.InUse() {
		return nil
	}
	var conflicts []string
	if u.Held != 0 {
		conflicts = append(conflicts, "held: "+u.Held.String())
	}
	if u.Unshared != 0 {
		conflicts = append(conflicts, "not shared: "+u.Unshared.String())
	}
	return &ImageInUseError{Path: path, Conflicts: conflicts, Holders: u.Holders}
}

// ProbeImagePath is ProbeImage on the file or device at path (opened
// read-only for the probe and closed).
func ProbeImagePath(path string) (ImageUsage, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return ImageUsage{}, err
	}
	defer f.Close()
	return ProbeImage(f)
}

// Holder is a process holding qemu image locks on an image.
type Holder struct {
	PID     int
	Command string // argv[0]'s base name, e.g. qemu-system-x86_64
	// Held and Unshared are the permissions its locks claim.
	Held, Unshared Perms
	// Domain is the libvirt domain the process runs, when the daemon
	// knows it (hostblk never asks libvirt; callers fill it in).
	Domain string
}

func (h Holder) String() string {
	s := fmt.Sprintf("%s (pid %d", h.Command, h.PID)
	if h.Domain != "" {
		s += ", domain " + h.Domain
	}
	return s + ")"
}

// ImageInUseError is a refusal because of others' qemu image locks.
type ImageInUseError struct {
	Path string
	// Conflicts are qemu's words for each conflict, e.g. `Failed to get
	// shared "write" lock`.
	Conflicts []string
	// Holders are the processes found holding the locks; the daemon may
	// fill in their Domain.
	Holders []Holder
}

func (e *ImageInUseError) Error() string {
	who := "another process (none found in /proc; it may hold the image under another device node)"
	if len(e.Holders) > 0 {
		names := make([]string, len(e.Holders))
		for i, h := range e.Holders {
			names[i] = h.String()
		}
		who = strings.Join(names, ", ")
	}
	return fmt.Sprintf("%s: in use by %s (qemu's image locks: %s); stop it first, or wait until it closes the image",
		e.Path, who, strings.Join(e.Conflicts, "; "))
}

// Is makes the error match ErrImageInUse and ErrTargetBusy.
func (e *ImageInUseError) Is(target error) bool {
	return target == ErrImageInUse || target == ErrTargetBusy
}

// FindHolders finds the processes holding qemu image locks (bytes 100 to
// 104 and 200 to 204) on the file open as f, from the "lock:" lines of
// /proc/PID/fdinfo/FD (/proc/locks shows -1 as the pid of OFD locks). A
// lock is on an inode; for a block device, locks on any node of the same
// device count (qemu in a private /dev has its own node). excludeSelf
// leaves out f's own descriptor. It reads /proc/locks first (see
// LockTable) and scans the processes only when a lock there may be f's.
func FindHolders(f *os.File, excludeSelf bool) ([]Holder, error) {
	return findHolders(nil, f, excludeSelf, false)
}

// findHolders is FindHolders with locks, a reading of /proc/locks made by
// the caller (nil: read it now); otherNodesOnly skips the scan when the
// only locks on qemu's bytes are on f's own inode (which the lock test
// sees without /proc): the check for another node of a block device.
func findHolders(locks *LockTable, f *os.File, excludeSelf, otherNodesOnly bool) ([]Holder, error) {
	var st unix.Stat_t
	if err := withFd(f, func(fd int) error { return unix.Fstat(fd, &st) }); err != nil {
		return nil, &os.PathError{Op: "fstat", Path: f.Name(), Err: err}
	}
	isBlock := st.Mode&unix.S_IFMT == unix.S_IFBLK
	if locks == nil {
		locks = NewLockTable()
	}
	if !locks.mayHoldQemuLocks(st, isBlock, otherNodesOnly) {
		return nil, nil
	}
	self, selfFd := os.Getpid(), int(f.Fd())
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	byPID := map[int]*Holder{}
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fdinfo := filepath.Join("/proc", p.Name(), "fdinfo")
		fds, err := os.ReadDir(fdinfo)
		if err != nil {
			continue // gone, or not ours to read
		}
		for _, e := range fds {
			fd, err := strconv.Atoi(e.Name())
			if err != nil || excludeSelf && pid == self && fd == selfFd {
				continue
			}
			b, err := os.ReadFile(filepath.Join(fdinfo, e.Name()))
			if err != nil || !bytes.Contains(b, []byte("lock:")) {
				continue
			}
			held, unshared := qemuLockBytes(b, st, isBlock, func() (unix.Stat_t, error) {
				var fst unix.Stat_t
				err := unix.Stat(filepath.Join("/proc", p.Name(), "fd", e.Name()), &fst)
				return fst, err
			})
			if held|unshared == 0 {
				continue
			}
			h := byPID[pid]
			if h == nil {
				cmd, domain := processIdentity(pid)
				h = &Holder{PID: pid, Command: cmd, Domain: domain}
				byPID[pid] = h
			}
			h.Held |= held
			h.Unshared |= unshared
		}
	}
	out := make([]Holder, 0, len(byPID))
	for _, h := range byPID {
		out = append(out, *h)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PID < out[j].PID })
	return out, nil
}

// qemuLockBytes reads the lock lines of one fdinfo file, e.g.
// "lock:\t1: OFDLCK  ADVISORY  READ  -1 00:05:123 100 100", and returns
// the qemu lock bytes held on the image whose stat is st. statFd stats
// the descriptor, for a block device's locks on another node.
func qemuLockBytes(fdinfo []byte, st unix.Stat_t, isBlock bool, statFd func() (unix.Stat_t, error)) (held, unshared Perms) {
	sc := bufio.NewScanner(bytes.NewReader(fdinfo))
	checkedNode, otherNode := false, false
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "lock:")
		if !ok {
			continue
		}
		l, ok := parseLockLine(rest)
		if !ok {
			continue
		}
		same := l.dev == st.Dev && l.ino == st.Ino
		if !same && isBlock {
			if !checkedNode {
				checkedNode = true
				if fst, err := statFd(); err == nil && fst.Mode&unix.S_IFMT == unix.S_IFBLK && fst.Rdev == st.Rdev {
					otherNode = true
				}
			}
			same = otherNode
		}
		if !same {
			continue
		}
		for i := Perm(0); i < numPerms; i++ {
			if l.start <= lockPermBase+int64(i) && lockPermBase+int64(i) <= l.end {
				held |= PermSet(i)
			}
			if l.start <= lockSharedBase+int64(i) && lockSharedBase+int64(i) <= l.end {
				unshared |= PermSet(i)
			}
		}
	}
	return held, unshared
}

// lockLine is one lock as /proc/locks and fdinfo's "lock:" lines show it.
type lockLine struct {
	ofd        bool
	dev, ino   uint64
	start, end int64
}

// parseLockLine reads "1: OFDLCK ADVISORY READ -1 08:01:123 100 100"
// (the kernel prints the device as hex major:minor, the inode in decimal,
// and EOF for a lock to the end of the file).
func parseLockLine(line string) (lockLine, bool) {
	fields := strings.Fields(line)
	if len(fields) < 8 {
		return lockLine{}, false
	}
	id := strings.Split(fields[5], ":")
	start, err1 := strconv.ParseInt(fields[6], 10, 64)
	end, err2 := strconv.ParseInt(fields[7], 10, 64)
	if fields[7] == "EOF" {
		end, err2 = math.MaxInt64, nil
	}
	if len(id) != 3 || err1 != nil || err2 != nil {
		return lockLine{}, false
	}
	maj, e1 := strconv.ParseUint(id[0], 16, 32)
	min, e2 := strconv.ParseUint(id[1], 16, 32)
	ino, e3 := strconv.ParseUint(id[2], 10, 64)
	if e1 != nil || e2 != nil || e3 != nil {
		return lockLine{}, false
	}
	return lockLine{ofd: fields[1] == "OFDLCK", dev: unix.Mkdev(uint32(maj), uint32(min)), ino: ino, start: start, end: end}, true
}

// A LockTable is one reading of /proc/locks: the OFD locks on qemu's
// lock bytes, host-wide. Reading /proc/locks costs an RCU grace period
// (the kernel takes file_rwsem for writing), several milliseconds of
// waiting, so a caller that checks several images reads it once, on the
// first check that needs it (only block devices do), and may start that
// read early with Prefetch while it does other work.
type LockTable struct {
	once  sync.Once
	locks []lockLine
	// unknown: /proc/locks could not be read, so any image may be locked.
	unknown bool
}

// NewLockTable returns a table that reads /proc/locks when first asked.
// When it cannot be read the table answers "maybe" for every image, so
// callers scan /proc.
func NewLockTable() *LockTable { return &LockTable{} }

// Prefetch starts reading /proc/locks in the background.
func (t *LockTable) Prefetch() { go t.load() }

func (t *LockTable) load() {
	t.once.Do(func() {
		b, err := os.ReadFile("/proc/locks")
		if err != nil {
			t.unknown = true
			return
		}
		for _, line := range strings.Split(string(b), "\n") {
			l, ok := parseLockLine(line)
			if !ok || !l.ofd || l.end < lockPermBase || l.start > lockSharedBase+int64(numPerms)-1 {
				continue
			}
			t.locks = append(t.locks, l)
		}
	})
}

// mayHoldQemuLocks reports whether any OFD lock covers qemu's lock bytes
// on the image whose stat is st; for a block device, on any inode at all
// (another node of the same device, in a private /dev, has an inode of
// its own). Only then is the per-process scan of fdinfo worth its
// hundreds of opens. otherNodesOnly leaves out the locks on the image's
// own inode: a writer that has just taken its own bytes asks whether
// anyone holds the device through another node.
func (t *LockTable) mayHoldQemuLocks(st unix.Stat_t, isBlock, otherNodesOnly bool) bool {
	t.load()
	if t.unknown {
		return true
	}
	for _, l := range t.locks {
		ownInode := l.dev == st.Dev && l.ino == st.Ino
		if ownInode && !otherNodesOnly || !ownInode && isBlock {
			return true
		}
	}
	return false
}

// processIdentity is the base name of the process's argv[0] (comm is cut
// at 15 bytes: "qemu-system-x86"), or comm, or "?"; and the libvirt domain
// it runs, from the "-name guest=NAME,..." libvirt gives every qemu ("" if
// none).
func processIdentity(pid int) (command, domain string) {
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && len(b) > 0 {
		args := strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
		for i := 1; i+1 < len(args); i++ {
			if args[i] == "-name" {
				domain = qemuGuestName(args[i+1])
			}
		}
		if args[0] != "" {
			return strings.ToValidUTF8(filepath.Base(args[0]), "?"), strings.ToValidUTF8(domain, "?")
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil {
		return strings.ToValidUTF8(strings.TrimSpace(string(b)), "?"), ""
	}
	return "?", ""
}

// qemuGuestName reads the guest name out of qemu's -name option:
// "guest=vm1,debug-threads=on" or the legacy "vm1"; a comma inside the
// name is doubled, as in every qemu option value.
func qemuGuestName(opt string) string {
	v, ok := strings.CutPrefix(opt, "guest=")
	if !ok && strings.Contains(opt, "=") {
		return ""
	}
	var name strings.Builder
	for i := 0; i < len(v); i++ {
		if v[i] == ',' {
			if i+1 < len(v) && v[i+1] == ',' {
				name.WriteByte(',')
				i++
				continue
			}
			break
		}
		name.WriteByte(v[i])
	}
	return name.String()
}
