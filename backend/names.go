package backend

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
	"sync"
)

// The one rule for volume and pool names. dbusapi applies it to callers'
// arguments (ValidateVolumeName, ValidatePoolName), the configuration to
// pool names, the backend to every volume it makes; the introspection XML
// states the same limits (a dbusapi test reads the XML and compares them
// with these constants). hostblk checks only what LVM and the file system
// themselves require (hostblk/lvm.go validateName), a looser, lower-level
// rule that also covers names volagent did not choose (VGs, other LVs).
const (
	// MaxVolumeNameLength bounds volume names: LVM allows 127 characters
	// per LV name, libvirt shows the name in its paths, and a refused
	// request adds ".refused.reason"; 64 leaves room for all of them.
	MaxVolumeNameLength = 64
	// MaxPoolNameLength bounds pool names; a pool name is a D-Bus path
	// element, a libvirt pool name and a directory name.
	MaxPoolNameLength = 32
	// VolumeNameChars and PoolNameChars are the characters allowed, as
	// the error messages and the documentation show them.
	VolumeNameChars = "[a-zA-Z0-9_.+-]"
	PoolNameChars   = "[a-zA-Z0-9_-]"
)

// volumeNamePattern is the set of names every layer below accepts: LVM LV
// names, loop-pool file names (which must not start with '.'), and
// libvirt volume names (no '/', not "." or ".."). The first character is
// a letter or digit: '-' would read as an option, '.' hides a file, and
// '+' or '_' are refused too so that no name looks like LVM's own.
var volumeNamePattern = lazyRegexp(fmt.Sprintf(`^[a-zA-Z0-9]%s{0,%d}$`, VolumeNameChars, MaxVolumeNameLength-1))

var poolNamePattern = lazyRegexp(fmt.Sprintf(`^%s{1,%d}$`, PoolNameChars, MaxPoolNameLength))

// originPattern bounds OverlayRequest.Origin to what an LVM tag holds
// unencoded.
var originPattern = lazyRegexp(`^[a-zA-Z0-9:._-]{0,64}$`)

// lazyRegexp compiles a pattern on first use. Bounded repetitions such as
// {0,63} compile to thousands of allocations, which every process linking
// backend would otherwise pay at start: the volagent command, and so the
// libvirt hook at every domain start, among them.
func lazyRegexp(pattern string) func() *regexp.Regexp {
	return sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(pattern) })
}

// lvmReservedPrefixes and lvmReservedInfixes are the names LVM refuses for
// LVs (lib/misc/lvm-string.c: apply_lv_name_restrictions): its own
// internal sub-LVs use them.
var (
	lvmReservedPrefixes = []string{"snapshot", "pvmove"}
	lvmReservedInfixes  = []string{
		"_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig", "_mimage", "_mlog",
		"_pmspare", "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
	}
)

// ValidateVolumeName checks a volume name a caller gave: 1 to
// MaxVolumeNameLength characters of VolumeNameChars, starting with a
// letter or digit, and nothing LVM reserves. The error wraps
// ErrInvalidArgument and names the value.
func ValidateVolumeName(name string) error {
	if !volumeNamePattern().MatchString(name) {
		return fmt.Errorf("%w: volume name %q: want 1 to %d characters of %s, starting with a letter or digit",
			ErrInvalidArgument, name, MaxVolumeNameLength, VolumeNameChars)
	}
	for _, p := range lvmReservedPrefixes {
		if strings.HasPrefix(name, p) {
			return fmt.Errorf("%w: volume name %q: LVM reserves names starting with %q", ErrInvalidArgument, name, p)
		}
	}
	for _, s := range lvmReservedInfixes {
		if strings.Contains(name, s) {
			return fmt.Errorf("%w: volume name %q: LVM reserves names containing %q", ErrInvalidArgument, name, s)
		}
	}
	return nil
}

// ValidatePoolName checks a pool name (from the configuration or a
// caller): 1 to MaxPoolNameLength characters of PoolNameChars. The error
// wraps ErrInvalidArgument and names the value.
func ValidatePoolName(name string) error {
	if !poolNamePattern().MatchString(name) {
		return fmt.Errorf("%w: pool name %q: want 1 to %d characters of %s", ErrInvalidArgument, name, MaxPoolNameLength, PoolNameChars)
	}
	return nil
}

// VolumeID is the ID of volume name in pool: a hex hash, so it is stable
// across restarts (it depends on nothing but the names), opaque, and a
// valid D-Bus object path element.
func VolumeID(pool, name string) string {
	sum := sha256.Sum256([]byte(pool + "\x00" + name))
	return hex.EncodeToString(sum[:16])
}

// isVolumeID reports whether s has the shape of a VolumeID. It tells a
// managed backing (recorded by ID in the volume metadata) from a path.
func isVolumeID(s string) bool {
	if len(s) != 32 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}
