package dbusapi

import (
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strings"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/qcow2"
)

// validateNames checks a pool and a volume name from a caller with the
// backend's one rule for names (backend/names.go), before anything else
// happens, so a bad name never reaches a path, a tag or an lvm command.
func validateNames(pool, name string) error {
	if err := backend.ValidatePoolName(pool); err != nil {
		return err
	}
	return backend.ValidateVolumeName(name)
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

// validateFormat checks an image format from a caller (qcow2.ParseFormat:
// never guessed, so it must be one of the two volagent knows).
func validateFormat(field, format string) error {
	if _, err := qcow2.ParseFormat(format); err != nil {
		return fmt.Errorf("%s: %w", field, err)
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
