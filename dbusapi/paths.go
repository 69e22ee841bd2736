package dbusapi

import (
	"strconv"
	"strings"

	"github.com/godbus/dbus/v5"
)

// Bus name, object paths and interface names of the API.
const (
	BusName = "org.volagent.VolAgent1"

	ManagerPath         dbus.ObjectPath = "/org/volagent/VolAgent1"
	PoolsPath           dbus.ObjectPath = ManagerPath + "/pools"
	VolumesPath         dbus.ObjectPath = ManagerPath + "/volumes"
	JobsPath            dbus.ObjectPath = ManagerPath + "/jobs"
	ManagerIface                        = "org.volagent.VolAgent1.Manager"
	PoolIface                           = "org.volagent.VolAgent1.Pool"
	VolumeIface                         = "org.volagent.VolAgent1.Volume"
	JobIface                            = "org.volagent.VolAgent1.Job"
	ObjectManagerIface                  = "org.freedesktop.DBus.ObjectManager"
	PropertiesIface                     = "org.freedesktop.DBus.Properties"
	IntrospectableIface                 = "org.freedesktop.DBus.Introspectable"
	PeerIface                           = "org.freedesktop.DBus.Peer"
)

// EscapePathElement makes s one valid object path element: every byte
// outside [A-Za-z0-9] becomes _XX (lower-case hex), as systemd escapes unit
// names in paths, so any pool name or volume ID maps to exactly one path.
func EscapePathElement(s string) string {
	if s == "" {
		return "_"
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
			b.WriteByte(c)
			continue
		}
		const hex = "0123456789abcdef"
		b.WriteByte('_')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}

// PoolPath is the object path of the pool named name.
func PoolPath(name string) dbus.ObjectPath {
	return PoolsPath + "/" + dbus.ObjectPath(EscapePathElement(name))
}

// VolumePath is the object path of the volume with the given ID.
func VolumePath(id string) dbus.ObjectPath {
	return VolumesPath + "/" + dbus.ObjectPath(EscapePathElement(id))
}

// JobPath is the object path of job n.
func JobPath(n uint64) dbus.ObjectPath {
	return JobsPath + "/" + dbus.ObjectPath(strconv.FormatUint(n, 10))
}

// childOf returns the last element of path if path is directly under
// parent, and "" otherwise.
func childOf(parent, path dbus.ObjectPath) string {
	rest, ok := strings.CutPrefix(string(path), string(parent)+"/")
	if !ok || rest == "" || strings.Contains(rest, "/") {
		return ""
	}
	return rest
}
