package dbusapi

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/godbus/dbus/v5"
)

// objectKind is what an object path names.
type objectKind int

const (
	kindNode    objectKind = iota // a path above or between objects: introspection only
	kindManager                   // ManagerPath
	kindPool
	kindVolume
	kindJob
)

// apiInterface is the API interface of each kind of object.
var apiInterface = map[objectKind]string{
	kindManager: ManagerIface,
	kindPool:    PoolIface,
	kindVolume:  VolumeIface,
	kindJob:     JobIface,
}

// object is one path as a call found it.
type object struct {
	s    *Server
	path dbus.ObjectPath
	kind objectKind
	key  string // the path element under pools/, volumes/ or jobs/
}

// LookupObject implements dbus.Handler.
func (s *Server) LookupObject(path dbus.ObjectPath) (dbus.ServerObject, bool) {
	o := object{s: s, path: path}
	s.mu.RLock()
	defer s.mu.RUnlock()
	switch {
	case path == ManagerPath:
		o.kind = kindManager
	case path == PoolsPath || path == VolumesPath || path == JobsPath ||
		strings.HasPrefix(string(ManagerPath), string(path)) && (path == "/" || ManagerPath[len(path)] == '/'):
		o.kind = kindNode
	default:
		if k := childOf(PoolsPath, path); k != "" && s.hasPool(k) {
			o.kind, o.key = kindPool, k
		} else if k := childOf(VolumesPath, path); k != "" && s.volumes[k].ID != "" {
			o.kind, o.key = kindVolume, k
		} else if k := childOf(JobsPath, path); k != "" && s.jobs[k] != nil {
			o.kind, o.key = kindJob, k
		} else {
			return nil, false
		}
	}
	return o, true
}

func (s *Server) hasPool(key string) bool { _, ok := s.pools[key]; return ok }

// children lists the path elements directly under a node, for Introspect
// (busctl tree walks them).
func (o object) children() []string {
	s := o.s
	s.mu.RLock()
	defer s.mu.RUnlock()
	keys := func(n int, each func(func(string))) []string {
		out := make([]string, 0, n)
		each(func(k string) { out = append(out, k) })
		return out
	}
	switch o.path {
	case ManagerPath:
		return []string{"jobs", "pools", "volumes"}
	case PoolsPath:
		return keys(len(s.pools), func(add func(string)) {
			for k := range s.pools {
				add(k)
			}
		})
	case VolumesPath:
		return keys(len(s.volumes), func(add func(string)) {
			for k := range s.volumes {
				add(k)
			}
		})
	case JobsPath:
		return keys(len(s.jobs), func(add func(string)) {
			for k := range s.jobs {
				add(k)
			}
		})
	}
	if o.kind == kindNode {
		// Above the manager: the next element towards it.
		rest := strings.TrimPrefix(string(ManagerPath), string(o.path))
		rest = strings.TrimPrefix(rest, "/")
		next, _, _ := strings.Cut(rest, "/")
		return []string{next}
	}
	return nil
}

// LookupInterface implements dbus.ServerObject.
func (o object) LookupInterface(name string) (dbus.Interface, bool) {
	api := apiInterface[o.kind]
	switch {
	case name == IntrospectableIface:
		return methodTable{"Introspect": o.bind("", "Introspect", "", o.introspect)}, true
	case name == PropertiesIface && api != "":
		return methodTable{
			"Get":    o.bind("", "Get", "ss", o.propertiesGet),
			"GetAll": o.bind("", "GetAll", "s", o.propertiesGetAll),
			"Set":    o.bind("", "Set", "ssv", o.propertiesSet),
		}, true
	case name == ObjectManagerIface && o.kind == kindManager:
		return methodTable{"GetManagedObjects": o.bind("", "GetManagedObjects", "", o.getManagedObjects)}, true
	case name == api && api != "":
		return o.apiMethods(), true
	}
	return nil, false
}

// methodTable implements dbus.Interface.
type methodTable map[string]*method

func (t methodTable) LookupMethod(name string) (dbus.Method, bool) {
	m, ok := t[name]
	if !ok {
		return nil, false
	}
	return m, true
}

// call is one method call as a handler sees it.
type call struct {
	conn   *dbus.Conn
	sender string
	object object
}

// handlerFunc implements one method; args match the method's signature.
type handlerFunc func(c *call, args []any) ([]any, *dbus.Error)

// method implements dbus.Method and dbus.ArgumentDecoder: it checks the
// call's signature, then hands the raw body to its handlerFunc.
type method struct {
	obj  object
	name string
	in   string // the input signature the call must have
	fn   handlerFunc
}

// bind makes a method of o. For API methods iface is set and the input
// signature comes from the introspection XML, so what is served and what
// is documented cannot drift apart.
func (o object) bind(iface, name, in string, fn handlerFunc) *method {
	if iface != "" {
		var ok bool
		in, _, ok = methodSignatures(iface, name)
		if !ok {
			panic(fmt.Sprintf("dbusapi: %s.%s is not in the introspection XML", iface, name))
		}
	}
	return &method{obj: o, name: name, in: in, fn: fn}
}

// callArgs is what DecodeArguments passes on to Call.
type callArgs struct {
	call *call
	body []any
}

// DecodeArguments implements dbus.ArgumentDecoder.
func (m *method) DecodeArguments(conn *dbus.Conn, sender string, msg *dbus.Message, body []any) ([]any, error) {
	if got := dbus.SignatureOf(body...).String(); got != m.in {
		closeFDs(body)
		return nil, dbus.NewError("org.freedesktop.DBus.Error.InvalidArgs",
			[]any{fmt.Sprintf("%s takes arguments of type (%s), not (%s)", m.name, m.in, got)})
	}
	return []any{callArgs{call: &call{conn: conn, sender: sender, object: m.obj}, body: body}}, nil
}

// Call implements dbus.Method. File descriptors a handler did not take
// (by setting its argument to nil) are closed, so no caller can make the
// daemon leak them.
func (m *method) Call(args ...any) ([]any, error) {
	a := args[0].(callArgs)
	defer closeFDs(a.body)
	ret, err := m.fn(a.call, a.body)
	if err != nil {
		return nil, err
	}
	return ret, nil
}

func (m *method) NumArguments() int     { return 1 }
func (m *method) NumReturns() int       { return 0 }
func (m *method) ArgumentValue(int) any { return nil }
func (m *method) ReturnValue(int) any   { return nil }
func (m *method) String() string        { return m.name }

func closeFDs(body []any) {
	for i, v := range body {
		if fd, ok := v.(dbus.UnixFD); ok {
			os.NewFile(uintptr(fd), "unused-fd").Close()
			body[i] = nil
		}
	}
}

// takeFD removes the file descriptor at body[i] from the automatic close
// and returns it as a file the handler now owns.
func takeFD(body []any, i int, name string) *os.File {
	fd := body[i].(dbus.UnixFD)
	body[i] = nil
	return os.NewFile(uintptr(fd), name)
}

func (o object) introspect(*call, []any) ([]any, *dbus.Error) {
	return []any{introspectionOf(o.path, apiInterface[o.kind], o.children())}, nil
}

// props returns the current properties of the object's API interface.
func (o object) props() (map[string]dbus.Variant, bool) {
	s := o.s
	s.mu.RLock()
	defer s.mu.RUnlock()
	switch o.kind {
	case kindManager:
		return s.managerPropsLocked(), true
	case kindPool:
		p, ok := s.pools[o.key]
		return poolProps(p), ok
	case kindVolume:
		v, ok := s.volumes[o.key]
		return volumeProps(v), ok
	case kindJob:
		j, ok := s.jobs[o.key]
		if !ok {
			return nil, false
		}
		return jobProps(j.info), true
	}
	return nil, false
}

func (o object) propertiesGet(_ *call, args []any) ([]any, *dbus.Error) {
	iface, name := args[0].(string), args[1].(string)
	props, err := o.propsOf(iface)
	if err != nil {
		return nil, err
	}
	v, ok := props[name]
	if !ok {
		return nil, dbus.NewError("org.freedesktop.DBus.Error.UnknownProperty", []any{fmt.Sprintf("%s has no property %q", iface, name)})
	}
	return []any{v}, nil
}

func (o object) propertiesGetAll(_ *call, args []any) ([]any, *dbus.Error) {
	iface := args[0].(string)
	if iface != apiInterface[o.kind] {
		// Standard interfaces have no properties.
		return []any{map[string]dbus.Variant{}}, nil
	}
	props, err := o.propsOf(iface)
	if err != nil {
		return nil, err
	}
	return []any{props}, nil
}

func (o object) propertiesSet(_ *call, args []any) ([]any, *dbus.Error) {
	return nil, dbus.NewError("org.freedesktop.DBus.Error.PropertyReadOnly",
		[]any{fmt.Sprintf("%s.%s is read-only", args[0].(string), args[1].(string))})
}

func (o object) propsOf(iface string) (map[string]dbus.Variant, *dbus.Error) {
	if iface != apiInterface[o.kind] {
		return nil, dbus.NewError("org.freedesktop.DBus.Error.UnknownInterface", []any{fmt.Sprintf("%s has no interface %q", o.path, iface)})
	}
	props, ok := o.props()
	if !ok {
		return nil, notFound("object %s no longer exists", o.path)
	}
	return props, nil
}

// getManagedObjects returns every pool, volume and job with its properties.
func (o object) getManagedObjects(*call, []any) ([]any, *dbus.Error) {
	s := o.s
	s.mu.RLock()
	defer s.mu.RUnlock()
	objects := make(map[dbus.ObjectPath]map[string]map[string]dbus.Variant, len(s.pools)+len(s.volumes)+len(s.jobs))
	for _, p := range s.pools {
		objects[PoolPath(p.Name)] = map[string]map[string]dbus.Variant{PoolIface: poolProps(p)}
	}
	for _, v := range s.volumes {
		objects[VolumePath(v.ID)] = map[string]map[string]dbus.Variant{VolumeIface: volumeProps(v)}
	}
	for _, j := range s.jobs {
		objects[JobPath(j.info.ID)] = map[string]map[string]dbus.Variant{JobIface: jobProps(j.info)}
	}
	return []any{objects}, nil
}

// jobID is the backend's ID of a job object.
func (o object) jobID() uint64 {
	n, _ := strconv.ParseUint(o.key, 10, 64)
	return n
}
