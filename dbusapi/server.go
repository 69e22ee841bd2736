package dbusapi

import (
	"context"
	"log/slog"
	"reflect"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/backend"
)

// DefaultJobRetention is how long a finished job's object stays on the bus,
// so that a client that looks late still finds the outcome.
const DefaultJobRetention = 10 * time.Minute

// Options configure a Server.
type Options struct {
	Version      string        // the Manager's Version property
	Logger       *slog.Logger  // nil: slog.Default()
	Authorizer   Authorizer    // nil: UnixAuthorizer{}
	JobRetention time.Duration // 0: DefaultJobRetention
	Inspect      InspectLimits // zero: the defaults
}

// Server exports a Backend on one D-Bus connection. It is the connection's
// dbus.Handler: create it first, connect with dbus.WithHandler(server),
// then Start it. The objects it serves come from a snapshot of the
// backend's state kept current from the backend's events, so reads never
// wait for the backend and signals always match what Get returns.
type Server struct {
	backend Backend
	opts    Options
	log     *slog.Logger

	ctx    context.Context // for backend calls; cancelled by Stop
	cancel context.CancelFunc

	mu      sync.RWMutex
	conn    *dbus.Conn
	pools   map[string]backend.PoolInfo   // by path element
	volumes map[string]backend.VolumeInfo // by path element
	jobs    map[string]*jobEntry          // by path element
	stopped bool

	inspects *inspectGate

	unsubscribe func()
	stopping    chan struct{} // closed by Stop
	eventsDone  chan struct{} // closed when forward returns
}

type jobEntry struct {
	info    backend.JobInfo
	removal *time.Timer // set once the job has ended
}

func isTerminal(s backend.JobState) bool { return s != backend.JobRunning && s != "" }

// NewServer returns a Server for b; it serves nothing until Start.
func NewServer(b Backend, opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Authorizer == nil {
		opts.Authorizer = UnixAuthorizer{}
	}
	if opts.JobRetention <= 0 {
		opts.JobRetention = DefaultJobRetention
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		backend:  b,
		opts:     opts,
		log:      opts.Logger,
		ctx:      ctx,
		cancel:   cancel,
		pools:    map[string]backend.PoolInfo{},
		volumes:  map[string]backend.VolumeInfo{},
		jobs:     map[string]*jobEntry{},
		stopping: make(chan struct{}),
		inspects: newInspectGate(opts.Inspect),
	}
}

// Start takes the backend's current state and forwards its events as
// signals on conn, which must have been made with dbus.WithHandler(s).
// Call it before requesting the bus name, so that the first caller finds
// every object.
func (s *Server) Start(conn *dbus.Conn) {
	events, unsubscribe := s.backend.Subscribe()
	s.mu.Lock()
	for _, p := range s.backend.Pools() {
		s.pools[EscapePathElement(p.Name)] = p
	}
	for _, v := range s.backend.Volumes() {
		s.volumes[EscapePathElement(v.ID)] = v
	}
	for _, j := range s.backend.Jobs() {
		s.putJobLocked(j)
	}
	s.conn = conn
	s.unsubscribe = unsubscribe
	s.eventsDone = make(chan struct{})
	s.mu.Unlock()
	go s.forward(events)
}

// Stop forwards the events the backend has already sent (stop the backend
// first, so that the cancelled jobs' Completed signals go out), then stops
// forwarding and cancels backend calls still in flight. It does not close
// the connection.
func (s *Server) Stop() {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return
	}
	s.stopped = true
	started := s.eventsDone != nil
	s.mu.Unlock()
	if started {
		close(s.stopping)
		<-s.eventsDone
		s.unsubscribe()
	}
	s.cancel()
	s.mu.Lock()
	for _, j := range s.jobs {
		if j.removal != nil {
			j.removal.Stop()
		}
	}
	s.mu.Unlock()
}

// stopIdle is how long Stop waits for one more event before it gives up.
const stopIdle = 300 * time.Millisecond

func (s *Server) forward(events <-chan backend.Event) {
	defer close(s.eventsDone)
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return
			}
			s.apply(ev)
			continue
		case <-s.stopping:
		}
		// Stopping: drain what the backend still sends, until it is idle.
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					return
				}
				s.apply(ev)
			case <-time.After(stopIdle):
				return
			}
		}
	}
}

// apply brings the snapshot up to date with one backend event and emits
// the matching signals.
func (s *Server) apply(ev backend.Event) {
	switch ev.Kind {
	case backend.EventVolumeAdded, backend.EventVolumeChanged:
		if ev.Volume != nil {
			s.putVolume(*ev.Volume)
		}
	case backend.EventVolumeRemoved:
		s.removeVolume(ev.VolumeID)
	case backend.EventPoolChanged:
		if ev.Pool != nil {
			s.putPool(*ev.Pool)
		}
	case backend.EventJobAdded, backend.EventJobProgress, backend.EventJobCompleted:
		if ev.Job != nil {
			s.putJob(*ev.Job)
		}
	case backend.EventPolicyViolation:
		if v := ev.Violation; v != nil {
			s.emit(ManagerPath, ManagerIface+".PolicyViolation", v.Subject, v.Code, v.Message)
		}
	case backend.EventLeaseLost:
		if l := ev.Lease; l != nil {
			s.emit(ManagerPath, ManagerIface+".LeaseLost", l.Pool, l.Lost, l.Message)
		}
	default:
		s.log.Debug("ignoring backend event", "kind", ev.Kind)
	}
}

// emit sends a signal; a failure only means the connection is gone.
func (s *Server) emit(path dbus.ObjectPath, name string, values ...any) {
	s.mu.RLock()
	conn := s.conn
	s.mu.RUnlock()
	s.emitOn(conn, path, name, values...)
}

func (s *Server) emitOn(conn *dbus.Conn, path dbus.ObjectPath, name string, values ...any) {
	if conn == nil {
		return
	}
	if err := conn.Emit(path, name, values...); err != nil {
		s.log.Debug("emitting signal", "signal", name, "path", string(path), "error", err)
	}
}

// changed emits PropertiesChanged for the properties of iface that differ
// between old and new.
func (s *Server) changed(path dbus.ObjectPath, iface string, old, new map[string]dbus.Variant) {
	diff := map[string]dbus.Variant{}
	for k, v := range new {
		if o, ok := old[k]; !ok || !reflect.DeepEqual(o.Value(), v.Value()) {
			diff[k] = v
		}
	}
	if len(diff) > 0 {
		s.emitOn(s.conn, path, PropertiesIface+".PropertiesChanged", iface, diff, []string{})
	}
}

func (s *Server) added(path dbus.ObjectPath, iface string, props map[string]dbus.Variant) {
	s.emitOn(s.conn, ManagerPath, ObjectManagerIface+".InterfacesAdded", path, map[string]map[string]dbus.Variant{iface: props})
}

func (s *Server) removed(path dbus.ObjectPath, iface string) {
	s.emitOn(s.conn, ManagerPath, ObjectManagerIface+".InterfacesRemoved", path, []string{iface})
}

// Signals are emitted with s.mu held, so that InterfacesAdded always goes
// out before the first PropertiesChanged of the same object.

func (s *Server) putPool(p backend.PoolInfo) {
	key := EscapePathElement(p.Name)
	s.mu.Lock()
	defer s.mu.Unlock()
	old, exists := s.pools[key]
	s.pools[key] = p
	path := PoolPath(p.Name)
	if !exists {
		s.added(path, PoolIface, poolProps(p))
		s.changed(ManagerPath, ManagerIface, nil, map[string]dbus.Variant{"Pools": dbus.MakeVariant(s.poolPathsLocked())})
		return
	}
	s.changed(path, PoolIface, poolProps(old), poolProps(p))
	if p.SpaceLow && !old.SpaceLow {
		// Once per entry into the low state, after the properties say so.
		s.emitOn(s.conn, path, PoolIface+".SpaceLow", unsigned(p.Free), unsigned(p.SpaceNeeded))
	}
}

// putVolume adds or updates a volume and returns its object path.
func (s *Server) putVolume(v backend.VolumeInfo) dbus.ObjectPath {
	key := EscapePathElement(v.ID)
	s.mu.Lock()
	defer s.mu.Unlock()
	old, exists := s.volumes[key]
	s.volumes[key] = v
	path := VolumePath(v.ID)
	if !exists {
		s.added(path, VolumeIface, volumeProps(v))
	} else {
		s.changed(path, VolumeIface, volumeProps(old), volumeProps(v))
	}
	return path
}

// addVolumeIfAbsent is for a method's own result: the event that announces
// the volume may have come (and gone) first, and is authoritative.
func (s *Server) addVolumeIfAbsent(v backend.VolumeInfo) dbus.ObjectPath {
	s.mu.RLock()
	_, exists := s.volumes[EscapePathElement(v.ID)]
	s.mu.RUnlock()
	if !exists {
		if _, err := s.backend.Volume(v.ID); err == nil {
			s.putVolume(v)
		}
	}
	return VolumePath(v.ID)
}

func (s *Server) removeVolume(id string) {
	key := EscapePathElement(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, exists := s.volumes[key]; !exists {
		return
	}
	delete(s.volumes, key)
	s.removed(VolumePath(id), VolumeIface)
}

// refreshVolume re-reads a volume from the backend after a method changed
// it, so that the caller sees the change as soon as the method returns.
func (s *Server) refreshVolume(id string) {
	v, err := s.backend.Volume(id)
	if err != nil {
		s.removeVolume(id)
		return
	}
	s.putVolume(v)
}

// putJob adds or updates a job; a job that has just ended gets its
// Completed signal and is removed from the bus after the retention time.
func (s *Server) putJob(j backend.JobInfo) dbus.ObjectPath {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.putJobLocked(j)
}

func (s *Server) putJobLocked(j backend.JobInfo) dbus.ObjectPath {
	key := strconv.FormatUint(j.ID, 10)
	path := JobPath(j.ID)
	e, exists := s.jobs[key]
	if exists && isTerminal(e.info.State) {
		// An ended job does not start again; a late snapshot is stale.
		if !isTerminal(j.State) {
			return path
		}
		s.changed(path, JobIface, jobProps(e.info), jobProps(j))
		e.info = j
		return path
	}
	if !exists {
		e = &jobEntry{info: j}
		s.jobs[key] = e
		s.added(path, JobIface, jobProps(j))
	} else {
		old := e.info
		e.info = j
		s.changed(path, JobIface, jobProps(old), jobProps(j))
	}
	if isTerminal(j.State) {
		s.emitOn(s.conn, path, JobIface+".Completed", j.State == backend.JobSucceeded, j.Message)
		e.removal = time.AfterFunc(s.opts.JobRetention, func() { s.removeJob(key) })
	}
	return path
}

// addJobIfAbsent is for Import's own result (see addVolumeIfAbsent).
func (s *Server) addJobIfAbsent(j backend.JobInfo) dbus.ObjectPath {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, exists := s.jobs[strconv.FormatUint(j.ID, 10)]; exists {
		return JobPath(j.ID)
	}
	return s.putJobLocked(j)
}

func (s *Server) removeJob(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.jobs[key]
	if !ok || s.stopped {
		return
	}
	delete(s.jobs, key)
	s.removed(JobPath(e.info.ID), JobIface)
}

// resync makes the snapshot equal to the backend's state (after Rescan).
func (s *Server) resync() {
	pools := s.backend.Pools()
	volumes := s.backend.Volumes()
	for _, p := range pools {
		s.putPool(p)
	}
	present := map[string]bool{}
	for _, v := range volumes {
		s.putVolume(v)
		present[EscapePathElement(v.ID)] = true
	}
	s.mu.RLock()
	var gone []string
	for key, v := range s.volumes {
		if !present[key] {
			gone = append(gone, v.ID)
		}
	}
	s.mu.RUnlock()
	for _, id := range gone {
		s.removeVolume(id)
	}
}

func (s *Server) poolPathsLocked() []dbus.ObjectPath {
	paths := make([]dbus.ObjectPath, 0, len(s.pools))
	for _, p := range s.pools {
		paths = append(paths, PoolPath(p.Name))
	}
	sort.Slice(paths, func(i, j int) bool { return paths[i] < paths[j] })
	return paths
}

// Property maps, one per interface, as the XML declares them.

func (s *Server) managerPropsLocked() map[string]dbus.Variant {
	return map[string]dbus.Variant{
		"Version": dbus.MakeVariant(s.opts.Version),
		"Pools":   dbus.MakeVariant(s.poolPathsLocked()),
	}
}

func poolProps(p backend.PoolInfo) map[string]dbus.Variant {
	return map[string]dbus.Variant{
		"Name":        dbus.MakeVariant(p.Name),
		"Type":        dbus.MakeVariant(string(p.Type)),
		"Capacity":    dbus.MakeVariant(unsigned(p.Capacity)),
		"Free":        dbus.MakeVariant(unsigned(p.Free)),
		"PolicyMode":  dbus.MakeVariant(string(p.Policy)),
		"Shared":      dbus.MakeVariant(p.Shared),
		"SpaceNeeded": dbus.MakeVariant(unsigned(p.SpaceNeeded)),
		"SpaceLow":    dbus.MakeVariant(p.SpaceLow),
	}
}

func volumeProps(v backend.VolumeInfo) map[string]dbus.Variant {
	return map[string]dbus.Variant{
		"Id":               dbus.MakeVariant(v.ID),
		"Name":             dbus.MakeVariant(v.Name),
		"Pool":             dbus.MakeVariant(PoolPath(v.Pool)),
		"DevicePath":       dbus.MakeVariant(v.DevicePath),
		"Format":           dbus.MakeVariant(v.Format),
		"VirtualSize":      dbus.MakeVariant(unsigned(v.VirtualSize)),
		"DeviceSize":       dbus.MakeVariant(unsigned(v.DeviceSize)),
		"HighestAllocated": dbus.MakeVariant(unsigned(v.HighestAllocated)),
		"BackingName":      dbus.MakeVariant(v.BackingName),
		"BackingFormat":    dbus.MakeVariant(v.BackingFormat),
		"Role":             dbus.MakeVariant(string(v.Role)),
		"Problem":          dbus.MakeVariant(v.Problem),
		"ActiveOn":         dbus.MakeVariant(v.ActiveOn),
	}
}

func jobProps(j backend.JobInfo) map[string]dbus.Variant {
	volume := dbus.ObjectPath("/")
	if j.Volume != "" {
		volume = VolumePath(j.Volume)
	}
	var started uint64
	if !j.StartedAt.IsZero() {
		started = unsigned(j.StartedAt.UnixMicro())
	}
	return map[string]dbus.Variant{
		"Operation":    dbus.MakeVariant(j.Operation),
		"Volume":       dbus.MakeVariant(volume),
		"State":        dbus.MakeVariant(string(j.State)),
		"Progress":     dbus.MakeVariant(j.Progress),
		"Bytes":        dbus.MakeVariant(unsigned(j.Bytes)),
		"TotalBytes":   dbus.MakeVariant(unsigned(j.TotalBytes)),
		"Rate":         dbus.MakeVariant(j.Rate),
		"StartedByUID": dbus.MakeVariant(j.StartedBy),
		"StartedAt":    dbus.MakeVariant(started),
		"Cancelable":   dbus.MakeVariant(j.Cancelable && !isTerminal(j.State)),
		"Message":      dbus.MakeVariant(j.Message),
	}
}

// unsigned maps a byte count to a D-Bus t; a negative count (which the
// backend never reports) shows as 0 rather than as 16 EiB.
func unsigned(n int64) uint64 {
	if n < 0 {
		return 0
	}
	return uint64(n)
}
