package backend

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
)

// volumeNamePattern is the set of names every layer below accepts: LVM LV
// names, loop-pool file names (which must not start with '.'), and
// libvirt volume names (no '/', not "." or "..").
var volumeNamePattern = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.+-]{0,63}$`)

// originPattern bounds OverlayRequest.Origin to what an LVM tag holds
// unencoded.
var originPattern = regexp.MustCompile(`^[a-zA-Z0-9:._-]{0,64}$`)

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

// validateVolumeName checks a volume name a caller gave; the error wraps
// ErrInvalidArgument.
func validateVolumeName(name string) error {
	if !volumeNamePattern.MatchString(name) {
		return fmt.Errorf("%w: volume name %q: want 1 to 64 characters of [a-zA-Z0-9_.+-], starting with a letter or digit", ErrInvalidArgument, name)
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

// validateLVMName applies LVM's rules for volume group names.
func validateLVMName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("missing")
	case len(name) > 127:
		return fmt.Errorf("longer than 127 characters")
	case name[0] == '-' || name == "." || name == "..":
		return fmt.Errorf("not allowed by LVM")
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		ok := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '+' || c == '_' || c == '.' || c == '-'
		if !ok {
			return fmt.Errorf("character %q not allowed (LVM allows [a-zA-Z0-9+_.-])", c)
		}
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
