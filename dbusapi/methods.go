package dbusapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/backend"
)

// apiMethods is the method table of the object's API interface.
func (o object) apiMethods() methodTable {
	t := methodTable{}
	add := func(name string, fn handlerFunc) { t[name] = o.bind(apiInterface[o.kind], name, "", fn) }
	switch o.kind {
	case kindManager:
		add("CreateOverlay", o.createOverlay)
		add("Import", o.importImage)
		add("Inspect", o.inspect)
		add("Rescan", o.rescan)
		add("CheckDomain", o.checkDomain)
	case kindVolume:
		add("Delete", o.deleteVolume)
		add("Resize", o.resizeVolume)
		add("Write", o.writeVolume)
		add("Check", o.checkVolume)
		add("Activate", o.activateVolume)
		add("Deactivate", o.deactivateVolume)
	case kindJob:
		add("Cancel", o.cancelJob)
	}
	return t
}

// authorize checks that the caller may change state; every mutating
// method calls it before it looks at the backend, so a refused call
// changes nothing and learns nothing.
func (c *call) authorize(opts options) (backend.Caller, *dbus.Error) {
	interactive, err := opts.interactive()
	if err != nil {
		return backend.Caller{}, err
	}
	s := c.object.s
	caller, derr := s.opts.Authorizer.Authorize(s.ctx, c.conn, c.sender, interactive)
	if derr != nil {
		s.log.Warn("refused a call", "method", opts.method, "object", string(c.object.path), "sender", c.sender, "uid", caller.UID, "error", derr.Error())
		return caller, derr
	}
	return caller, nil
}

// volumeID is the backend ID of the volume the call is on.
func (c *call) volumeID() (string, *dbus.Error) {
	s := c.object.s
	s.mu.RLock()
	v, ok := s.volumes[c.object.key]
	s.mu.RUnlock()
	if !ok {
		return "", notFound("volume %s no longer exists", c.object.path)
	}
	return v.ID, nil
}

func (o object) createOverlay(c *call, args []any) ([]any, *dbus.Error) {
	pool, name, backing, backingFormat := args[0].(string), args[1].(string), args[2].(string), args[3].(string)
	opts, derr := parseOptions("CreateOverlay", args[5].(map[string]dbus.Variant), "cluster-size")
	if derr != nil {
		return nil, derr
	}
	caller, derr := c.authorize(opts)
	if derr != nil {
		return nil, derr
	}
	size, err := toInt64("virtual_size", args[4].(uint64))
	if err != nil {
		return nil, invalidArgument("CreateOverlay: %v", err)
	}
	cluster, derr := opts.uint("cluster-size", 0)
	if derr != nil {
		return nil, derr
	}
	if cluster > 1<<21 {
		return nil, invalidArgument("CreateOverlay: cluster-size %d is larger than qcow2's 2 MiB", cluster)
	}
	if err := validateNames(pool, name); err != nil {
		return nil, invalidArgument("CreateOverlay: %v", err)
	}
	req := backend.OverlayRequest{Pool: pool, Name: name, VirtualSize: size, ClusterSize: int(cluster)}
	if key := childOf(VolumesPath, dbus.ObjectPath(backing)); key != "" {
		o.s.mu.RLock()
		v, ok := o.s.volumes[key]
		o.s.mu.RUnlock()
		if !ok {
			return nil, notFound("CreateOverlay: backing volume %s does not exist", backing)
		}
		if backingFormat != "" && backingFormat != v.Format {
			return nil, invalidArgument("CreateOverlay: backing_format %q contradicts the format %q of backing volume %s; pass \"\" to use the volume's", backingFormat, v.Format, backing)
		}
		req.BackingVolume = v.ID
	} else {
		if strings.HasPrefix(backing, string(ManagerPath)+"/") {
			return nil, invalidArgument("CreateOverlay: backing %q is not a volume object path", backing)
		}
		if err := validateBackingPath(backing); err != nil {
			return nil, invalidArgument("CreateOverlay: %v", err)
		}
		if err := validateFormat("backing_format", backingFormat); err != nil {
			return nil, invalidArgument("CreateOverlay: %v", err)
		}
		req.BackingPath, req.BackingFormat = backing, backingFormat
	}
	info, err := o.s.backend.CreateOverlay(o.s.ctx, caller, req)
	if err != nil {
		return nil, toDBusError(err)
	}
	o.s.log.Info("created overlay", "volume", info.ID, "name", info.Name, "pool", info.Pool, "uid", caller.UID)
	return []any{o.s.addVolumeIfAbsent(info)}, nil
}

// sourceFile is a file descriptor passed by a client, as the backend reads
// it. Closing it twice is harmless (the backend closes it when its job
// ends; the adapter closes it when Import fails).
type sourceFile struct {
	f    *os.File
	size int64
}

func (s *sourceFile) ReadAt(p []byte, off int64) (int, error) { return s.f.ReadAt(p, off) }
func (s *sourceFile) Stat() (int64, error)                    { return s.size, nil }
func (s *sourceFile) Close() error                            { return s.f.Close() }

// openPassedFile checks a file descriptor from a caller: it must be open
// for reading on a regular file or a block device (a pipe cannot be read
// at offsets, and a device node of another kind is never an image).
func openPassedFile(f *os.File, field string) (*sourceFile, error) {
	flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", field, err)
	}
	if flags&unix.O_ACCMODE == unix.O_WRONLY {
		return nil, fmt.Errorf("%s is open for writing only; open it for reading", field)
	}
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%s: %v", field, err)
	}
	mode := st.Mode()
	switch {
	case mode.IsRegular():
		return &sourceFile{f: f, size: st.Size()}, nil
	case mode&os.ModeDevice != 0 && mode&os.ModeCharDevice == 0:
		// Block devices report size 0 in stat; their end is their size.
		// The offset is shared with the caller's descriptor, which only
		// this daemon reads at explicit offsets anyway.
		size, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return nil, fmt.Errorf("%s: size of the block device: %v", field, err)
		}
		return &sourceFile{f: f, size: size}, nil
	}
	return nil, fmt.Errorf("%s is a %s, not a regular file or block device", field, describeMode(mode))
}

func describeMode(m os.FileMode) string {
	switch {
	case m&os.ModeNamedPipe != 0:
		return "pipe"
	case m&os.ModeSocket != 0:
		return "socket"
	case m&os.ModeCharDevice != 0:
		return "character device"
	case m.IsDir():
		return "directory"
	}
	return m.Type().String()
}

func (o object) importImage(c *call, args []any) ([]any, *dbus.Error) {
	pool, name, format := args[0].(string), args[1].(string), args[3].(string)
	opts, derr := parseOptions("Import", args[4].(map[string]dbus.Variant), "virtual-size")
	if derr != nil {
		return nil, derr
	}
	caller, derr := c.authorize(opts)
	if derr != nil {
		return nil, derr
	}
	virtualSize, derr := opts.uint("virtual-size", 0)
	if derr != nil {
		return nil, derr
	}
	size, err := toInt64("virtual-size", virtualSize)
	if err != nil {
		return nil, invalidArgument("Import: %v", err)
	}
	if err := validateNames(pool, name); err != nil {
		return nil, invalidArgument("Import: %v", err)
	}
	if err := validateFormat("source_format", format); err != nil {
		return nil, invalidArgument("Import: %v", err)
	}
	f := takeFD(args, 2, "import-source")
	src, err := openPassedFile(f, "source")
	if err != nil {
		f.Close()
		return nil, invalidArgument("Import: %v", err)
	}
	job, err := o.s.backend.Import(o.s.ctx, caller, backend.ImportRequest{
		Pool: pool, Name: name, Source: src, SourceFormat: format, VirtualSize: size,
	})
	if err != nil {
		src.Close()
		return nil, toDBusError(err)
	}
	o.s.log.Info("started import", "job", job.ID, "name", name, "pool", pool, "uid", caller.UID)
	return []any{o.s.addJobIfAbsent(job)}, nil
}

// inspect is open to every caller: it reads only the descriptor the caller
// passed, which the caller could read itself. What a caller can make it
// cost is bounded: InspectLimits turns per UID and in all, a deadline on
// reading the descriptor, and a report of bounded size (qcow2's caps).
func (o object) inspect(c *call, args []any) ([]any, *dbus.Error) {
	format := args[1].(string)
	opts, derr := parseOptions("Inspect", args[2].(map[string]dbus.Variant), "name")
	if derr != nil {
		return nil, derr
	}
	name, derr := opts.string("name", "fd")
	if derr != nil {
		return nil, derr
	}
	if err := validateFormat("format", format); err != nil {
		return nil, invalidArgument("Inspect: %v", err)
	}
	uid, err := callerUID(o.s.ctx, c.conn, c.sender)
	if err != nil {
		return nil, failed("Inspect: cannot identify the caller %s: %v", c.sender, err)
	}
	release, derr := o.s.inspects.enter(uid)
	if derr != nil {
		return nil, derr
	}
	f := takeFD(args, 0, "inspect-fd")
	r := &deadlineReader{f: f, deadline: time.Now().Add(o.s.inspects.limits.ReadTimeout)}
	// A hung read (or stat) keeps the call's turn and the descriptor
	// until it returns; the caller gets its answer at the deadline.
	defer r.afterReads(func() { f.Close(); release() })
	var src *sourceFile
	err = r.do(func() (err error) { src, err = openPassedFile(f, "fd"); return err })
	if errors.Is(err, ErrReadTimeout) {
		return nil, failed("Inspect: %v; the descriptor passed must answer within %s", err, o.s.inspects.limits.ReadTimeout)
	}
	if err != nil {
		return nil, invalidArgument("Inspect: %v", err)
	}
	rep, err := o.s.backend.Inspect(o.s.ctx, r, src.size, name, format)
	if errors.Is(err, ErrReadTimeout) {
		return nil, failed("Inspect: %v; the descriptor passed must answer reads within %s", err, o.s.inspects.limits.ReadTimeout)
	}
	if err != nil {
		return nil, toDBusError(err)
	}
	out, err := json.Marshal(rep)
	if err != nil {
		return nil, failed("Inspect: encoding the report: %v", err)
	}
	return []any{string(out)}, nil
}

func (o object) rescan(c *call, args []any) ([]any, *dbus.Error) {
	opts, derr := parseOptions("Rescan", args[0].(map[string]dbus.Variant))
	if derr != nil {
		return nil, derr
	}
	if _, derr := c.authorize(opts); derr != nil {
		return nil, derr
	}
	if err := o.s.backend.Rescan(o.s.ctx); err != nil {
		return nil, toDBusError(err)
	}
	o.s.resync()
	return nil, nil
}

// volumeMethod is what every Volume method does first: check the
// options argument, authorize the caller, and find the volume's ID.
func (c *call) volumeMethod(method string, options any, known ...string) (backend.Caller, string, *dbus.Error) {
	opts, derr := parseOptions(method, options.(map[string]dbus.Variant), known...)
	if derr != nil {
		return backend.Caller{}, "", derr
	}
	caller, derr := c.authorize(opts)
	if derr != nil {
		return backend.Caller{}, "", derr
	}
	id, derr := c.volumeID()
	if derr != nil {
		return backend.Caller{}, "", derr
	}
	return caller, id, nil
}

func (o object) deleteVolume(c *call, args []any) ([]any, *dbus.Error) {
	caller, id, derr := c.volumeMethod("Delete", args[0], "force")
	if derr != nil {
		return nil, derr
	}
	opts, _ := parseOptions("Delete", args[0].(map[string]dbus.Variant), "force")
	force, derr := opts.bool("force")
	if derr != nil {
		return nil, derr
	}
	if err := o.s.backend.DeleteWith(o.s.ctx, caller, id, backend.DeleteOptions{Force: force}); err != nil {
		return nil, toDBusError(err)
	}
	o.s.log.Info("deleted volume", "volume", id, "uid", caller.UID)
	o.s.removeVolume(id)
	return nil, nil
}

func (o object) resizeVolume(c *call, args []any) ([]any, *dbus.Error) {
	caller, id, derr := c.volumeMethod("Resize", args[1])
	if derr != nil {
		return nil, derr
	}
	size, err := toInt64("size", args[0].(uint64))
	if err != nil {
		return nil, invalidArgument("Resize: %v", err)
	}
	if err := o.s.backend.Resize(o.s.ctx, caller, id, size); err != nil {
		return nil, toDBusError(err)
	}
	o.s.refreshVolume(id)
	return nil, nil
}

func (o object) writeVolume(c *call, args []any) ([]any, *dbus.Error) {
	caller, id, derr := c.volumeMethod("Write", args[2])
	if derr != nil {
		return nil, derr
	}
	offset, err := toInt64("offset", args[0].(uint64))
	if err != nil {
		return nil, invalidArgument("Write: %v", err)
	}
	if err := o.s.backend.Write(o.s.ctx, caller, id, offset, args[1].([]byte)); err != nil {
		return nil, toDBusError(err)
	}
	o.s.refreshVolume(id)
	return nil, nil
}

func (o object) checkVolume(c *call, args []any) ([]any, *dbus.Error) {
	// Check only reads, but it reads a whole device: not for everyone.
	_, id, derr := c.volumeMethod("Check", args[0])
	if derr != nil {
		return nil, derr
	}
	res, err := o.s.backend.Check(o.s.ctx, id)
	if err != nil {
		return nil, toDBusError(err)
	}
	problems := make([]string, 0, len(res.Problems))
	for _, p := range res.Problems {
		problems = append(problems, fmt.Sprintf("%v: %s", p.Kind, p.Message))
	}
	return []any{map[string]dbus.Variant{
		"clean":              dbus.MakeVariant(res.Clean()),
		"corruptions":        dbus.MakeVariant(uint64(max(res.Corruptions, 0))),
		"leaks":              dbus.MakeVariant(uint64(max(res.Leaks, 0))),
		"check-errors":       dbus.MakeVariant(uint64(max(res.CheckErrors, 0))),
		"image-end-offset":   dbus.MakeVariant(unsigned(res.ImageEndOffset)),
		"allocated-clusters": dbus.MakeVariant(unsigned(res.AllocatedClusters)),
		"total-clusters":     dbus.MakeVariant(unsigned(res.TotalClusters)),
		"problems":           dbus.MakeVariant(problems),
		"problems-omitted":   dbus.MakeVariant(uint64(max(res.ProblemsOmitted, 0))),
	}}, nil
}

func (o object) cancelJob(c *call, args []any) ([]any, *dbus.Error) {
	opts, derr := parseOptions("Cancel", args[0].(map[string]dbus.Variant))
	if derr != nil {
		return nil, derr
	}
	caller, derr := c.authorize(opts)
	if derr != nil {
		return nil, derr
	}
	if err := o.s.backend.CancelJob(caller, o.jobID()); err != nil {
		return nil, toDBusError(err)
	}
	o.s.log.Info("cancelled job", "job", o.jobID(), "uid", caller.UID)
	return nil, nil
}

// maxDomainXML bounds CheckDomain's domain_xml (real ones are a few KiB;
// the backend has the same bound).
const maxDomainXML = 16 << 20

// checkDomain is root only, whatever the Authorizer says: it opens and
// reads the header of every path the XML names, which no other caller may
// make the daemon do (the volagent group included).
func (o object) checkDomain(c *call, args []any) ([]any, *dbus.Error) {
	domainXML := args[0].(string)
	opts, derr := parseOptions("CheckDomain", args[1].(map[string]dbus.Variant), "operation")
	if derr != nil {
		return nil, derr
	}
	operation, derr := opts.string("operation", "")
	if derr != nil {
		return nil, derr
	}
	s := o.s
	uid, err := callerUID(s.ctx, c.conn, c.sender)
	if err != nil {
		return nil, failed("CheckDomain: cannot identify the caller %s: %v", c.sender, err)
	}
	if uid != 0 {
		s.log.Warn("refused a call", "method", "CheckDomain", "sender", c.sender, "uid", uid)
		return nil, notAuthorized("CheckDomain: UID %d may not call it: only root may (it reads the headers of every image the domain XML names)", uid)
	}
	if len(domainXML) > maxDomainXML {
		return nil, invalidArgument("CheckDomain: domain_xml is %d bytes; at most %d", len(domainXML), maxDomainXML)
	}
	var busy []backend.DomainViolation
	if operation == "prepare" || operation == "restore" {
		// The domain starts here: its shared volumes are activated first
		// (the check reads their headers through their devices).
		busy = s.backend.ActivateForDomain(s.ctx, []byte(domainXML))
	}
	allowed, rep, err := s.backend.CheckDomain(s.ctx, []byte(domainXML))
	if err != nil {
		return nil, toDBusError(err)
	}
	if len(busy) > 0 {
		rep.Violations = append(rep.Violations, busy...)
		allowed = false
	}
	if operation == "migrate" {
		// Whatever the policy mode: a shared volume must not be left
		// exclusive on the source while the destination writes.
		if refused := s.backend.MigrationRefusal([]byte(domainXML), rep); len(refused) > 0 {
			rep.Violations = append(rep.Violations, refused...)
			allowed = false
		}
	}
	out, err := json.Marshal(rep)
	if err != nil {
		return nil, failed("CheckDomain: encoding the report: %v", err)
	}
	return []any{allowed, string(out)}, nil
}

func (o object) activateVolume(c *call, args []any) ([]any, *dbus.Error) {
	caller, id, derr := c.volumeMethod("Activate", args[0], "shared")
	if derr != nil {
		return nil, derr
	}
	opts, _ := parseOptions("Activate", args[0].(map[string]dbus.Variant), "shared")
	shared, derr := opts.bool("shared")
	if derr != nil {
		return nil, derr
	}
	if err := o.s.backend.Activate(o.s.ctx, caller, id, shared); err != nil {
		return nil, toDBusError(err)
	}
	o.s.refreshVolume(id)
	return nil, nil
}

func (o object) deactivateVolume(c *call, args []any) ([]any, *dbus.Error) {
	caller, id, derr := c.volumeMethod("Deactivate", args[0])
	if derr != nil {
		return nil, derr
	}
	if err := o.s.backend.Deactivate(o.s.ctx, caller, id); err != nil {
		return nil, toDBusError(err)
	}
	o.s.refreshVolume(id)
	return nil, nil
}
