package dbusapi

import (
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strings"

	"github.com/godbus/dbus/v5"
)

// MaxNameLength bounds volume and pool names. LVM allows 127 characters
// per LV name; the backend adds its own prefix and suffixes, and libvirt
// shows names in its own paths, so callers get well under half of it.
const MaxNameLength = 64

// lvmReservedSubstrings appear in the names LVM gives its hidden sub-LVs;
// lvcreate refuses any name that contains one.
var lvmReservedSubstrings = []string{
	"_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_wcorig", "_iorig",
	"_imeta", "_idata", "_mimage", "_mlog", "_pmspare", "_rimage", "_rmeta",
	"_tdata", "_tmeta", "_vdata", "_vorigin",
}

// ValidateName checks a volume or pool name from a caller: 1 to
// MaxNameLength characters of [A-Za-z0-9+_.-], not starting with "-" or
// ".", and nothing LVM reserves, so that the name is valid as an LV name,
// a file name and a libvirt volume name, and can never traverse a path.
func ValidateName(field, name string) error {
	if name == "" {
		return fmt.Errorf("%s is empty", field)
	}
	if len(name) > MaxNameLength {
		return fmt.Errorf("%s %q is %d characters long; at most %d are allowed", field, name, len(name), MaxNameLength)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '+' || c == '_' || c == '.' || c == '-'
		if !ok {
			return fmt.Errorf("%s %q: character %q is not allowed; use letters, digits and + _ . -", field, name, c)
		}
	}
	if name[0] == '-' || name[0] == '.' {
		return fmt.Errorf("%s %q must not start with %q", field, name, name[0])
	}
	if strings.HasPrefix(name, "snapshot") || strings.HasPrefix(name, "pvmove") {
		return fmt.Errorf("%s %q: LVM reserves names starting with \"snapshot\" and \"pvmove\"", field, name)
	}
	for _, r := range lvmReservedSubstrings {
		if strings.Contains(name, r) {
			return fmt.Errorf("%s %q: LVM reserves names containing %q", field, name, r)
		}
	}
	return nil
}

// validateBackingPath checks that a backing path from a caller is absolute
// and already clean (no "." or ".." element, no doubled slash), so that
// what the backend checks against its roots is what will be recorded.
func validateBackingPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("backing is empty: give an absolute path or a volume object path")
	case strings.ContainsRune(p, 0):
		return fmt.Errorf("backing %q contains a NUL byte", p)
	case !filepath.IsAbs(p):
		return fmt.Errorf("backing %q is not an absolute path", p)
	case filepath.Clean(p) != p:
		return fmt.Errorf("backing %q is not a clean path (want %q)", p, filepath.Clean(p))
	}
	return nil
}

// validateFormat checks an image format from a caller: never guessed, so
// it must be one of the two volagent knows.
func validateFormat(field, format string) error {
	if format != "raw" && format != "qcow2" {
		return fmt.Errorf("%s %q: must be \"raw\" or \"qcow2\" (formats are never guessed)", field, format)
	}
	return nil
}

// toInt64 converts a D-Bus t into the backend's int64, refusing sizes and
// offsets beyond what a file can have.
func toInt64(field string, v uint64) (int64, error) {
	if v > math.MaxInt64 {
		return 0, fmt.Errorf("%s %d is too large (at most %d)", field, v, int64(math.MaxInt64))
	}
	return int64(v), nil
}

// options is the a{sv} argument of a method, read strictly: every key
// must be one the method knows, with the right type.
type options struct {
	method string
	values map[string]dbus.Variant
}

// commonOptions are accepted by every method.
var commonOptions = []string{"auth.no_user_interaction"}

// parseOptions refuses any key not in known (or commonOptions).
func parseOptions(method string, values map[string]dbus.Variant, known ...string) (options, *dbus.Error) {
	for k := range values {
		if !slices.Contains(known, k) && !slices.Contains(commonOptions, k) {
			all := append(append([]string{}, known...), commonOptions...)
			return options{}, invalidArgument("%s: unknown option %q (known: %s)", method, k, strings.Join(all, ", "))
		}
	}
	return options{method: method, values: values}, nil
}

// interactive reports whether polkit may ask the user.
func (o options) interactive() (bool, *dbus.Error) {
	v, ok := o.values["auth.no_user_interaction"]
	if !ok {
		return true, nil
	}
	b, ok := v.Value().(bool)
	if !ok {
		return false, o.wrongType("auth.no_user_interaction", v, "b")
	}
	return !b, nil
}

// bool returns a boolean option; false when absent.
func (o options) bool(key string) (bool, *dbus.Error) {
	v, ok := o.values[key]
	if !ok {
		return false, nil
	}
	b, ok := v.Value().(bool)
	if !ok {
		return false, o.wrongType(key, v, "b")
	}
	return b, nil
}

// uint returns an unsigned integer option (any of y q u t), or def.
func (o options) uint(key string, def uint64) (uint64, *dbus.Error) {
	v, ok := o.values[key]
	if !ok {
		return def, nil
	}
	switch n := v.Value().(type) {
	case byte:
		return uint64(n), nil
	case uint16:
		return uint64(n), nil
	case uint32:
		return uint64(n), nil
	case uint64:
		return n, nil
	}
	return 0, o.wrongType(key, v, "u or t")
}

// string returns a string option, or def.
func (o options) string(key, def string) (string, *dbus.Error) {
	v, ok := o.values[key]
	if !ok {
		return def, nil
	}
	s, ok := v.Value().(string)
	if !ok {
		return "", o.wrongType(key, v, "s")
	}
	return s, nil
}

func (o options) wrongType(key string, v dbus.Variant, want string) *dbus.Error {
	return invalidArgument("%s: option %q has type %s; want %s", o.method, key, v.Signature().String(), want)
}
