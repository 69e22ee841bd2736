package dbusapi

import (
	_ "embed"
	"encoding/xml"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"
)

// IntrospectionXML is the API's documented introspection data, the same
// bytes as packaging/dbus/org.volagent.VolAgent1.xml.
//
//go:embed org.volagent.VolAgent1.xml
var IntrospectionXML []byte

// apiInterfaces are the interfaces of IntrospectionXML by name, parsed on
// first use: the volagent command links this package for its clients and
// must not pay for the parse at every start (the hook runs at every domain
// start).
var apiInterfaces = sync.OnceValue(func() map[string]introspect.Interface { return mustParseInterfaces(IntrospectionXML) })

func mustParseInterfaces(data []byte) map[string]introspect.Interface {
	var node introspect.Node
	if err := xml.Unmarshal(data, &node); err != nil {
		panic(fmt.Sprintf("dbusapi: embedded introspection XML: %v", err))
	}
	ifaces := make(map[string]introspect.Interface, len(node.Interfaces))
	for _, i := range node.Interfaces {
		ifaces[i.Name] = i
	}
	return ifaces
}

// methodSignatures returns the input and output signatures of a method
// of the API, as the XML declares them.
func methodSignatures(iface, method string) (in, out string, ok bool) {
	for _, m := range apiInterfaces()[iface].Methods {
		if m.Name != method {
			continue
		}
		for _, a := range m.Args {
			if a.Direction == "out" {
				out += a.Type
			} else {
				in += a.Type
			}
		}
		return in, out, true
	}
	return "", "", false
}

// The standard interfaces every object has, for introspection.
var (
	propertiesData = introspect.Interface{
		Name: PropertiesIface,
		Methods: []introspect.Method{
			{Name: "Get", Args: []introspect.Arg{{Name: "interface_name", Type: "s", Direction: "in"}, {Name: "property_name", Type: "s", Direction: "in"}, {Name: "value", Type: "v", Direction: "out"}}},
			{Name: "GetAll", Args: []introspect.Arg{{Name: "interface_name", Type: "s", Direction: "in"}, {Name: "props", Type: "a{sv}", Direction: "out"}}},
			{Name: "Set", Args: []introspect.Arg{{Name: "interface_name", Type: "s", Direction: "in"}, {Name: "property_name", Type: "s", Direction: "in"}, {Name: "value", Type: "v", Direction: "in"}}},
		},
		Signals: []introspect.Signal{
			{Name: "PropertiesChanged", Args: []introspect.Arg{{Name: "interface_name", Type: "s"}, {Name: "changed_properties", Type: "a{sv}"}, {Name: "invalidated_properties", Type: "as"}}},
		},
	}
	objectManagerData = introspect.Interface{
		Name: ObjectManagerIface,
		Methods: []introspect.Method{
			{Name: "GetManagedObjects", Args: []introspect.Arg{{Name: "objects", Type: "a{oa{sa{sv}}}", Direction: "out"}}},
		},
		Signals: []introspect.Signal{
			{Name: "InterfacesAdded", Args: []introspect.Arg{{Name: "object_path", Type: "o"}, {Name: "interfaces_and_properties", Type: "a{sa{sv}}"}}},
			{Name: "InterfacesRemoved", Args: []introspect.Arg{{Name: "object_path", Type: "o"}, {Name: "interfaces", Type: "as"}}},
		},
	}
)

const introspectDoctype = `<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
`

// introspectionOf renders the introspection of one object: its API
// interface (if any) with the standard ones, and its children.
func introspectionOf(path dbus.ObjectPath, apiIface string, children []string) string {
	var node introspect.Node
	node.Interfaces = append(node.Interfaces, introspect.IntrospectData, introspect.PeerData)
	if apiIface != "" {
		node.Interfaces = append(node.Interfaces, propertiesData)
		if apiIface == ManagerIface {
			node.Interfaces = append(node.Interfaces, objectManagerData)
		}
		node.Interfaces = append(node.Interfaces, apiInterfaces()[apiIface])
	}
	sort.Strings(children)
	for _, c := range children {
		node.Children = append(node.Children, introspect.Node{Name: c})
	}
	out, err := xml.MarshalIndent(node, "", "  ")
	if err != nil {
		// Only static, valid data goes in; this cannot fail.
		panic(fmt.Sprintf("dbusapi: rendering introspection of %s: %v", path, err))
	}
	var b strings.Builder
	b.WriteString(introspectDoctype)
	b.Write(out)
	b.WriteString("\n")
	return b.String()
}
