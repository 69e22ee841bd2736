package main

// Shared by the client subcommands (volumes, overlay, jobs): they talk to
// `volagentd` over D-Bus, on the system bus unless told otherwise.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/godbus/dbus/v5"
	"github.com/spf13/cobra"

	"github.com/volagent/volagent/dbusapi"
)

// clientFlags are the flags every client subcommand has.
type clientFlags struct {
	busAddress string
	json       bool
}

func (f *clientFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.busAddress, "bus-address", "", "D-Bus address of the daemon's bus (default: $DBUS_SYSTEM_BUS_ADDRESS, else the system bus)")
	cmd.Flags().BoolVar(&f.json, "json", false, "print JSON for programs instead of text for people")
}

// dialDaemon connects to the daemon's bus.
func dialDaemon(f clientFlags) (*dbus.Conn, error) {
	conn, err := dbusapi.Connect(f.busAddress)
	if err != nil {
		return nil, fmt.Errorf("connecting to the bus: %w", err)
	}
	return conn, nil
}

// daemonError turns a D-Bus error into one a person can act on; a policy
// violation exits with status 3, as the local commands' refusals do.
func daemonError(err error) error {
	if err == nil {
		return nil
	}
	var de dbus.Error
	if !errors.As(err, &de) {
		var dp *dbus.Error
		if !errors.As(err, &dp) {
			return err
		}
		de = *dp
	}
	msg := de.Error()
	switch {
	case de.Name == dbusapi.ErrorPolicyViolation:
		return refused(fmt.Errorf("refused by the policy: %s", msg))
	case strings.HasPrefix(de.Name, dbusapi.ErrorPrefix):
		return fmt.Errorf("%s (%s)", msg, strings.TrimPrefix(de.Name, dbusapi.ErrorPrefix))
	case de.Name == "org.freedesktop.DBus.Error.ServiceUnknown" || de.Name == "org.freedesktop.DBus.Error.NameHasNoOwner":
		return fmt.Errorf("the volagent daemon is not running: nothing owns %s on this bus (start it with `volagentd`)", dbusapi.BusName)
	case de.Name == "org.freedesktop.DBus.Error.AccessDenied":
		return fmt.Errorf("the bus refused the call: only root and members of group %q may change volumes (%s)", dbusapi.DefaultAdminGroup, msg)
	}
	return fmt.Errorf("%s (%s)", msg, de.Name)
}

// managedObjects is the daemon's GetManagedObjects.
type managedObjects map[dbus.ObjectPath]map[string]map[string]dbus.Variant

func getManagedObjects(conn *dbus.Conn) (managedObjects, error) {
	var objs managedObjects
	err := conn.Object(dbusapi.BusName, dbusapi.ManagerPath).Call(dbusapi.ObjectManagerIface+".GetManagedObjects", 0).Store(&objs)
	return objs, daemonError(err)
}

// ofInterface returns the objects that have iface, sorted by path, with
// that interface's properties.
func (m managedObjects) ofInterface(iface string) []objectProps {
	var out []objectProps
	for path, ifaces := range m {
		if props, ok := ifaces[iface]; ok {
			out = append(out, objectProps{path: path, props: props})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].path < out[j].path })
	return out
}

type objectProps struct {
	path  dbus.ObjectPath
	props map[string]dbus.Variant
}

func (o objectProps) str(name string) string {
	switch v := o.props[name].Value().(type) {
	case string:
		return v
	case dbus.ObjectPath:
		return string(v)
	}
	return ""
}

func (o objectProps) u64(name string) uint64 {
	v, _ := o.props[name].Value().(uint64)
	return v
}

func (o objectProps) f64(name string) float64 {
	v, _ := o.props[name].Value().(float64)
	return v
}

// lastElement is the name part of a pool path (for display).
func lastElement(p string) string {
	return p[strings.LastIndex(p, "/")+1:]
}

// printJSON prints v indented, for scripts.
func printJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// volumeJSON is a volume as `--json` prints it; field names are stable.
type volumeJSON struct {
	Object           string `json:"object"`
	ID               string `json:"id"`
	Name             string `json:"name"`
	Pool             string `json:"pool"`
	DevicePath       string `json:"device-path"`
	Format           string `json:"format"`
	VirtualSize      uint64 `json:"virtual-size"`
	DeviceSize       uint64 `json:"device-size"`
	HighestAllocated uint64 `json:"highest-allocated"`
	BackingName      string `json:"backing-name"`
	BackingFormat    string `json:"backing-format"`
	Role             string `json:"role"`
	// Problem is why the daemon will not use the volume; "" when usable.
	Problem string `json:"problem"`
	// ActiveOn is where the volume is active: "local", "" (nowhere), or
	// the other hosts of a shared pool.
	ActiveOn string `json:"active-on"`
}

func volumeFromProps(o objectProps, pools map[string]string) volumeJSON {
	pool := pools[o.str("Pool")]
	if pool == "" {
		pool = lastElement(o.str("Pool"))
	}
	return volumeJSON{
		Object: string(o.path), ID: o.str("Id"), Name: o.str("Name"), Pool: pool,
		DevicePath: o.str("DevicePath"), Format: o.str("Format"), VirtualSize: o.u64("VirtualSize"),
		DeviceSize: o.u64("DeviceSize"), HighestAllocated: o.u64("HighestAllocated"),
		BackingName: o.str("BackingName"), BackingFormat: o.str("BackingFormat"), Role: o.str("Role"),
		Problem: o.str("Problem"), ActiveOn: o.str("ActiveOn"),
	}
}

// poolNames maps pool object paths to pool names.
func (m managedObjects) poolNames() map[string]string {
	names := map[string]string{}
	for _, p := range m.ofInterface(dbusapi.PoolIface) {
		names[string(p.path)] = p.str("Name")
	}
	return names
}

// quoteIfNeeded shows a string that came from an image (a backing name)
// safely on a terminal.
func quoteIfNeeded(s string) string {
	for _, r := range s {
		if r < ' ' || r == 0x7f || r == ' ' || r == '"' {
			return fmt.Sprintf("%q", s)
		}
	}
	if s == "" {
		return "-"
	}
	return s
}

// printJSONCompact prints v on one line.
func printJSONCompact(out io.Writer, v any) error {
	return json.NewEncoder(out).Encode(v)
}
