package hostblk

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Shared volume groups: a VG on storage several hosts see, whose metadata
// and activations lvmlockd coordinates with sanlock leases on the VG's own
// "lvmlock" LV (lvmlockd(8)). volagent adds nothing to that protocol: it
// asks lvm for the locks (activation modes) and reads the leases to name
// the host that holds one.

// ErrLockedElsewhere means lvmlockd refused an LV lock because another
// host holds it in a conflicting mode (the LV is active there).
var ErrLockedElsewhere = errors.New("logical volume is locked by another host")

// ErrLockspace means the VG's lockspace is not usable on this host (not
// started, or lost: the lease storage failed), so lvm refuses the command.
var ErrLockspace = errors.New("the volume group's lockspace is not started or was lost")

// addSharedStderrPatterns adds lvmlockd's refusals to stderrPatterns.
func addSharedStderrPatterns(m map[error]*regexp.Regexp) {
	// lib/locking/lvmlockd.c: "LV locked by other host: vg/lv", and for a
	// shared activation that meets an exclusive one "... incompatible".
	m[ErrLockedElsewhere] = regexp.MustCompile(`(?i)locked by other host|lock held by another host|LV is already locked with incompatible mode`)
	m[ErrLockspace] = regexp.MustCompile(`(?i)lockspace .*(not started|is not running|has been lost|is being killed|failed)|lock start in progress|VG .* lock failed: (lockspace|storage|error -2[0-9][0-9])|Cannot access VG .* due to failed lock|Reading VG .* without a lock|lvmlockd not running`)
}

// LockMode is how an LV of a shared VG is activated: the LV lock lvmlockd
// takes for it.
type LockMode string

const (
	// LockExclusive: active on this host only (lvchange -aey); another
	// host's activation is refused while it lasts.
	LockExclusive LockMode = "ey"
	// LockShared: active read-mostly on any number of hosts (-asy); an
	// exclusive activation anywhere is refused while it lasts.
	LockShared LockMode = "sy"
)

// ActivateMode activates LV vg/lv with the given lock (lvchange
// --activate ey|sy) and returns its device. Errors: ErrLockedElsewhere when
// another host holds a conflicting lock; ErrLockspace when the VG's
// lockspace is not started. Only device-mapper activation has lock modes.
func (l *LVM) ActivateMode(ctx context.Context, vg, lv string, mode LockMode) (string, error) {
	if err := validateNames(vg, lv); err != nil {
		return "", err
	}
	if mode != LockExclusive && mode != LockShared {
		return "", fmt.Errorf("activate %s/%s: lock mode %q: want %q or %q", vg, lv, mode, LockExclusive, LockShared)
	}
	if l.NoDeviceMapper {
		return "", fmt.Errorf("activate %s/%s %s: lock modes need device-mapper activation", vg, lv, mode)
	}
	if err := l.runVG(ctx, vg, "lvchange", "--activate", string(mode), "--", vg+"/"+lv); err != nil {
		return "", err
	}
	return dmPath(vg, lv), nil
}

// LockStart starts the lockspace of shared VG vg on this host (vgchange
// --lockstart) and waits until it is started: with sanlock that is the
// time to acquire this host's host_id lease, tens of seconds.
func (l *LVM) LockStart(ctx context.Context, vg string) error {
	if err := validateVGName(vg); err != nil {
		return err
	}
	// lvmlockctl --wait-start would do the waiting; vgchange waits by
	// default (--lockopt nowait does not), so one command does both.
	return l.runVG(ctx, vg, "vgchange", "--lockstart", "--", vg)
}

// SharedVG is what a shared VG's report says about its locking.
type SharedVG struct {
	// LockType is "sanlock", "dlm", "idm", or "" for a VG that is not
	// shared.
	LockType string
	// Seqno is the metadata sequence number: it grows with every change
	// of the VG's metadata (an LV made, removed, extended, tagged), on
	// whichever host made it.
	Seqno uint64
}

// SharedVGStatus reports vg's lock type and metadata sequence number. On a
// shared VG it is one read of the metadata under lvmlockd's shared VG lock.
// It does not wait for this process's other commands on vg (a read that
// lvm's own locks order): a caller timing it times lvm and the storage.
func (l *LVM) SharedVGStatus(ctx context.Context, vg string) (SharedVG, error) {
	if err := validateVGName(vg); err != nil {
		return SharedVG{}, err
	}
	args := append(append([]string{}, reportArgs...), "-o", "vg_name,vg_lock_type,vg_seqno", "--", vg)
	rows, err := l.report(ctx, "vgs", args, "vg")
	if err != nil {
		return SharedVG{}, err
	}
	if len(rows) != 1 {
		return SharedVG{}, fmt.Errorf("vgs %s: expected 1 volume group, got %d", vg, len(rows))
	}
	var f fieldErrs
	s := SharedVG{LockType: f.str(rows[0], "vg_lock_type"), Seqno: f.uint(rows[0], "vg_seqno")}
	if s.LockType == "none" {
		s.LockType = ""
	}
	return s, f.err
}

// LVLock is an LV of a shared VG with where its lock lives.
type LVLock struct {
	Name string
	UUID string
	// Attr is lv_attr; its fifth character is 'a' while the LV is active
	// on this host.
	Attr string
	// Host is the host name of the host that created the LV (lv_host).
	Host string
	// LeaseOffset is the byte offset of the LV's sanlock lease in the VG's
	// lvmlock LV (from lv_lockargs "VERSION:OFFSET"); -1 when it has none.
	LeaseOffset int64
}

// ActiveHere reports whether the LV is active on this host.
func (l LVLock) ActiveHere() bool { return len(l.Attr) >= 5 && l.Attr[4] == 'a' }

// LVLocks lists the LVs of shared VG vg (the hidden lvmlock LV left out)
// with their lease offsets.
func (l *LVM) LVLocks(ctx context.Context, vg string) ([]LVLock, error) {
	if err := validateVGName(vg); err != nil {
		return nil, err
	}
	defer l.lockVG(vg)()
	args := append(append([]string{}, reportArgs...), "-o", "lv_name,lv_uuid,lv_attr,lv_host,lv_lockargs", "--", vg)
	rows, err := l.report(ctx, "lvs", args, "lv")
	if err != nil {
		return nil, err
	}
	return parseLVLocks(vg, rows)
}

func parseLVLocks(vg string, rows []reportRow) ([]LVLock, error) {
	var out []LVLock
	for _, r := range rows {
		var f fieldErrs
		lk := LVLock{Name: f.str(r, "lv_name"), UUID: f.str(r, "lv_uuid"), Attr: f.str(r, "lv_attr"), Host: f.str(r, "lv_host")}
		// The report names the field by its canonical name, lv_lockargs.
		lockArgs := f.str(r, "lv_lockargs")
		if f.err != nil {
			return nil, f.err
		}
		var err error
		if lk.LeaseOffset, err = ParseLockArgsOffset(lockArgs); err != nil {
			return nil, fmt.Errorf("LV %s/%s: %w", vg, lk.Name, err)
		}
		out = append(out, lk)
	}
	return out, nil
}

// ParseLockArgsOffset reads the lease offset out of a sanlock LV's
// lv_lock_args, "1.0.0:70254592" (lvmlockd's lock args version, then the
// offset in the lvmlock LV); -1 for "" (no lock).
func ParseLockArgsOffset(args string) (int64, error) {
	if args == "" {
		return -1, nil
	}
	_, off, ok := strings.Cut(args, ":")
	if !ok {
		return 0, fmt.Errorf("lv_lock_args %q: want VERSION:OFFSET", args)
	}
	// Newer lvm may append more fields after another ':'.
	off, _, _ = strings.Cut(off, ":")
	n, err := strconv.ParseInt(off, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("lv_lock_args %q: offset %q is not a byte count", args, off)
	}
	return n, nil
}

// LockDevice is the device of shared VG vg's lvmlock LV, where sanlock
// keeps the VG's leases; it exists while the lockspace is started.
func LockDevice(vg string) string {
	return "/dev/mapper/" + strings.ReplaceAll(vg, "-", "--") + "-lvmlock"
}

// LVMConfig reads one setting the way lvm itself resolves it (lvmconfig
// --typeconfig full: lvm.conf, lvmlocal.conf and the defaults), e.g.
// "global/use_lvmlockd" -> "1", "local/host_id" -> "0" when unset.
func (l *LVM) LVMConfig(ctx context.Context, key string) (string, error) {
	if !regexp.MustCompile(`^[a-z_]+/[a-z_]+$`).MatchString(key) {
		return "", fmt.Errorf("lvm setting %q: want section/name", key)
	}
	// lvmconfig reads configuration only: no device or activation
	// options apply.
	var out bytes.Buffer
	argv := []string{"lvmconfig", "--typeconfig", "full"}
	argv = append(argv, l.ExtraArgs...)
	argv = append(argv, key)
	ctx, cancel := l.withTimeout(ctx)
	defer cancel()
	cmd := l.command(ctx, argv)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		e := &LVMError{Args: argv, ExitCode: -1, Stderr: stderr.String(), cause: err}
		if cmd.ProcessState != nil {
			e.ExitCode = cmd.ProcessState.ExitCode()
		}
		return "", e
	}
	return ParseLVMConfigValue(&out, key)
}

// ParseLVMConfigValue reads lvmconfig's "name=value" line for key
// (section/name); a quoted string value is unquoted.
func ParseLVMConfigValue(r io.Reader, key string) (string, error) {
	_, name, _ := strings.Cut(key, "/")
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), "=")
		if !ok || strings.TrimSpace(k) != name {
			continue
		}
		v = strings.TrimSpace(v)
		if uq, err := strconv.Unquote(v); err == nil {
			v = uq
		}
		return v, nil
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", fmt.Errorf("lvmconfig %s: no %s= line in its output", key, name)
}

// DeviceMapperName is the device-mapper name of the block device at path
// ("VG-LV", hyphens in each part doubled), read from sysfs; "" when path
// is not a device-mapper device.
func DeviceMapperName(path string) string {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return ""
	}
	b, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/dm/name", unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev))))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
