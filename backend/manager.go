package backend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/qcow2"
)

// ManagerOptions are the optional parts of NewManager.
type ManagerOptions struct {
	// LVM is the exec layer for every LVM command; nil means a default one
	// (NoDeviceMapper set when a pool uses loop activation). Tests pass one
	// with Devices set to isolate their volume group.
	LVM *hostblk.LVM
	// Logger receives what the Manager did on its own (crash cleanup,
	// policy violations in audit mode, refused headers); nil discards.
	Logger *slog.Logger
}

// Manager is the daemon's state: pools, volumes and jobs. All methods are
// safe for concurrent use. Once Close has begun, the mutating ones
// (CreateOverlay, Import, Delete, Resize, Write, Rescan) refuse with
// ErrBusy ("volagent is shutting down"); CancelJob and the readers work. State lives on the devices only (see the
// package comment); the Manager's maps are a cache rebuilt by Load and
// Rescan.
type Manager struct {
	cfg        *Config
	lvm        *hostblk.LVM
	log        *slog.Logger
	pools      []*pool // configuration order
	poolByName map[string]*pool

	// scanMu keeps Load and Rescan from running twice at once.
	scanMu sync.Mutex

	mu      sync.Mutex
	volumes map[string]*volume // complete volumes, by ID
	// pending are volumes an operation of this Manager is making or
	// removing (ID to operation). They are not listed, their names are
	// taken, and a rescan leaves their in-progress marks alone.
	pending map[string]string
	// backingUsers counts operations in flight that use a volume as a
	// backing (a CreateOverlay being made over it).
	backingUsers map[string]int
	// opLocks serialise the operations on one volume (Write, Resize,
	// Delete, Check).
	opLocks map[string]*sync.Mutex
	jobs    jobTable
	subs    subscribers
	closed  bool

	// checked holds the result of each volume's full background check
	// (bgcheck.go): the problem it found, "" for a sound image. Volumes
	// not in it wait for theirs.
	checked        map[string]string
	checkWake      chan struct{}
	checkerStarted bool

	jobCtx    context.Context
	jobCancel context.CancelFunc
	jobWG     sync.WaitGroup
	// opWG counts the mutating calls in flight (beginOp), so Close
	// waits for them as it waits for jobs.
	opWG sync.WaitGroup

	// domains is libvirt as the Manager asks it (SetDomains); nil
	// without the libvirt integration. Guarded by mu.
	domains Domains

	// growth is the next growth of the volumes running domains use, by
	// domain name (NoteGrowthNeeds). Guarded by mu.
	growth map[string][]GrowthNeed
	// fill is each pool's fill state as last reported, by pool name;
	// fillMu orders its updates with the events that report them.
	fillMu sync.Mutex
	fill   map[string]poolFill

	// hooks are fault-injection points for tests; zero in production.
	hooks testHooks
}

// testHooks let tests stop an operation abruptly after a step, as if the
// process died there (no cleanup runs), and slow jobs down.
type testHooks struct {
	// crashAfter is called after each step of a mutating operation
	// (e.g. "create:device"); returning true stops the operation there
	// with errSimulatedCrash.
	crashAfter func(step string) bool
	// importChunk is called before each chunk an import job copies.
	importChunk func(ctx context.Context, offset int64)
}

// errSimulatedCrash is what an operation returns when a test hook stopped
// it; it skips every cleanup, as a real crash would.
var errSimulatedCrash = errors.New("simulated crash (test hook)")

func (m *Manager) crashPoint(step string) error {
	if m.hooks.crashAfter != nil && m.hooks.crashAfter(step) {
		return fmt.Errorf("%w: %w after %s", ErrFailed, errSimulatedCrash, step)
	}
	return nil
}

// pool is one configured pool, opened by Load.
type pool struct {
	cfg    PoolConfig
	act    hostblk.Activator // lvm pools
	loop   *hostblk.LoopPool // loop pools, after Load
	shared *sharedState      // shared lvm pools, after Load
	opened atomic.Bool       // set once by Load; read without locks
}

// volume is a complete volume as the Manager knows it.
type volume struct {
	info VolumeInfo
	meta hostblk.VolumeMeta
	// file is a loop-pool volume's backing file; "" for LVM.
	file string
	// clusterSize is a qcow2 image's cluster size (0 for raw), for what
	// the image can grow to.
	clusterSize int64
	// backingPath is what overlays over this volume record as their
	// backing name: the loop-pool file (stable across reboots) or the LV's
	// device.
	backingPath string
	// problem is why the volume cannot be used ("" when it can): a header
	// that is refused, a backing that is not what its metadata says.
	problem string
	// notHere: a shared pool's volume not active on this host; its header
	// is not read (nor checked) here.
	notHere bool
}

// NewManager checks the configuration and prepares the pools; nothing on
// the host is touched until Load.
func NewManager(cfg *Config, opts ManagerOptions) (*Manager, error) {
	if cfg == nil {
		return nil, fmt.Errorf("%w: configuration is nil", ErrInvalidArgument)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	lvm := opts.LVM
	if lvm == nil {
		lvm = &hostblk.LVM{}
		for _, pc := range cfg.Pools {
			if pc.Type == PoolLVM && pc.Activation == string(hostblk.ActivationLoop) {
				lvm.NoDeviceMapper = true
			}
		}
	}
	m := &Manager{
		cfg: cfg, lvm: lvm, log: log,
		poolByName:   map[string]*pool{},
		volumes:      map[string]*volume{},
		pending:      map[string]string{},
		backingUsers: map[string]int{},
		opLocks:      map[string]*sync.Mutex{},
		checked:      map[string]string{},
		checkWake:    make(chan struct{}, 1),
	}
	m.jobCtx, m.jobCancel = context.WithCancel(context.Background())
	for i, pc := range cfg.Pools {
		if _, dup := m.poolByName[pc.Name]; dup {
			return nil, fmt.Errorf("%w: pool[%d]: name %q is used twice", ErrInvalidArgument, i, pc.Name)
		}
		p := &pool{cfg: pc}
		switch pc.Type {
		case PoolLVM:
			mode, err := hostblk.ParseActivationMode(pc.Activation)
			if err != nil {
				return nil, fmt.Errorf("%w: pool %q: %w", ErrInvalidArgument, pc.Name, err)
			}
			if p.act, err = hostblk.NewActivator(mode, lvm); err != nil {
				return nil, fmt.Errorf("%w: pool %q: %w (all LVM pools share one LVM exec layer, so their activation modes must agree)", ErrInvalidArgument, pc.Name, err)
			}
		case PoolLoop:
		default:
			return nil, fmt.Errorf("%w: pool %q: type %q: want %q or %q", ErrInvalidArgument, pc.Name, pc.Type, PoolLVM, PoolLoop)
		}
		if pc.InitialSize <= 0 || pc.ChunkSize <= 0 {
			return nil, fmt.Errorf("%w: pool %q: initial_size %d and chunk_size %d must be positive (ParseConfig sets defaults)", ErrInvalidArgument, pc.Name, pc.InitialSize, pc.ChunkSize)
		}
		m.pools = append(m.pools, p)
		m.poolByName[pc.Name] = p
	}
	return m, nil
}

// Load opens the pools (creating a loop pool's directory if missing,
// checking that an LVM pool's volume group exists), removes what crashed
// operations left behind (volumes still marked in progress, temporary
// loop-pool files), activates the volumes and rebuilds the state from
// them. It is idempotent: calling it again is a Rescan.
//
// A pool that cannot be opened is left out (not listed); Load still loads
// the others and returns an error naming every pool that failed, wrapping
// the kind of the first failure. A volume whose qcow2 header is refused is
// listed with its problem logged (VolumeInfo.Problem), not dropped: it
// still occupies space and a name, and an admin must decide about it.
//
// Load reads of each image its header and refcount structures only; the
// full check of the volumes it found runs in the background once
// StartBackgroundChecks has been called (see bgcheck.go).
func (m *Manager) Load(ctx context.Context) error {
	m.scanMu.Lock()
	defer m.scanMu.Unlock()
	if m.isClosed() {
		return fmt.Errorf("%w: manager is closed", ErrFailed)
	}
	var errs []error
	for _, p := range m.pools {
		if p.opened.Load() {
			continue
		}
		if err := m.openPool(ctx, p); err != nil {
			m.log.Error("pool not opened", "pool", p.cfg.Name, "err", err)
			errs = append(errs, err)
			continue
		}
		p.opened.Store(true)
	}
	m.scanLocked(ctx, nil)
	m.wakeChecker()
	if len(errs) > 0 {
		return fmt.Errorf("%w (%d of %d pools failed)", errs[0], len(errs), len(m.pools))
	}
	return nil
}

// Rescan rebuilds the state from the devices again, as Load does, and
// sends events for what changed. ErrBusy once Close has begun.
func (m *Manager) Rescan(ctx context.Context) error {
	done, err := m.beginOp("Rescan")
	if err != nil {
		return err
	}
	defer done()
	return m.Load(ctx)
}

func (m *Manager) openPool(ctx context.Context, p *pool) error {
	switch p.cfg.Type {
	case PoolLoop:
		lp, err := hostblk.OpenLoopPool(p.cfg.Directory, hostblk.LoopOptions{})
		if err != nil {
			return fmt.Errorf("%w: pool %q: %w", ErrFailed, p.cfg.Name, err)
		}
		p.loop = lp
	case PoolLVM:
		if p.cfg.Shared {
			// lvmlockd's set-up first: without it the VG may not even be
			// seen as what it is.
			return m.openShared(ctx, p)
		}
		if _, err := m.lvm.VolumeGroup(ctx, p.cfg.VolumeGroup); err != nil {
			if errors.Is(err, hostblk.ErrVGNotFound) {
				return fmt.Errorf("%w: pool %q: volume group %q does not exist (create it with vgcreate, or fix volume_group)", ErrNotFound, p.cfg.Name, p.cfg.VolumeGroup)
			}
			return fmt.Errorf("%w: pool %q: %w", ErrFailed, p.cfg.Name, err)
		}
	}
	return nil
}

// scanLocked rebuilds the volume map from every opened pool (only that
// one when only is not nil). A pool whose listing fails keeps its
// previous volumes (an lvm hiccup must not make volumes vanish for
// clients), as do the pools not scanned.
func (m *Manager) scanLocked(ctx context.Context, only *pool) {
	found := map[string]*volume{}
	failed := map[string]bool{}
	for _, p := range m.pools {
		if !p.opened.Load() {
			continue
		}
		if only != nil && p != only {
			failed[p.cfg.Name] = true
			continue
		}
		vols, err := m.scanPool(ctx, p)
		if err != nil {
			m.log.Error("scanning pool failed; keeping its previous state", "pool", p.cfg.Name, "err", err)
			failed[p.cfg.Name] = true
			continue
		}
		for _, v := range vols {
			found[v.info.ID] = v
		}
	}
	m.mu.Lock()
	for id, v := range m.volumes {
		// Volumes an operation of ours is changing stay as they were;
		// the operation updates them.
		if _, busy := m.pending[id]; busy || failed[v.info.Pool] {
			found[id] = v
		}
	}
	m.checkBackingsLocked(found)
	for id := range m.checked {
		if _, ok := found[id]; !ok {
			delete(m.checked, id) // gone: a volume of that name later is checked anew
		}
	}
	old := m.volumes
	m.volumes = found
	var events []Event
	for id, v := range found {
		info := v.info
		if o, ok := old[id]; !ok {
			events = append(events, Event{Kind: EventVolumeAdded, Volume: &info})
		} else if o.info != v.info {
			events = append(events, Event{Kind: EventVolumeChanged, Volume: &info})
		}
	}
	for id := range old {
		if _, ok := found[id]; !ok {
			events = append(events, Event{Kind: EventVolumeRemoved, VolumeID: id})
		}
	}
	m.mu.Unlock()
	for _, e := range events {
		m.emit(e)
	}
}

// checkBackingsLocked flags overlays over managed volumes whose header no
// longer names the backing volume's path (e.g. an LV activated by loop
// under another loop number after a reboot): qemu would read the wrong
// device.
func (m *Manager) checkBackingsLocked(vols map[string]*volume) {
	for _, v := range vols {
		if v.problem != "" || v.notHere || !isVolumeID(v.meta.BackingName) {
			continue
		}
		b, ok := vols[v.meta.BackingName]
		switch {
		case !ok:
			v.problem = fmt.Sprintf("its backing volume %s is missing", v.meta.BackingName)
		case b.backingPath != v.info.BackingName:
			v.problem = fmt.Sprintf("its header names backing %q, but its backing volume %q (%s) is now at %q", v.info.BackingName, b.info.Name, b.info.ID, b.backingPath)
		}
		if v.problem != "" {
			v.info.Problem = v.problem
			m.log.Error("volume has a problem", "volume", v.info.Name, "pool", v.info.Pool, "id", v.info.ID, "problem", v.problem)
		}
	}
}

// Close refuses new mutating calls (ErrBusy), cancels the running jobs
// and waits for them and for the calls already in progress; a cancelled
// import removes its half-made volume, so the devices hold only complete
// volumes afterwards. Subscriber channels are closed. Close is idempotent.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	m.jobCancel()
	m.jobWG.Wait()
	m.opWG.Wait()
	m.subs.closeAll()
	return nil
}

// beginOp admits a mutating call (op names it in the error) unless Close
// has begun; the caller runs done when it returns. Admission and the
// closed flag share m.mu, so a call is either refused or waited for by
// Close, never started behind its back.
func (m *Manager) beginOp(op string) (done func(), err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errShuttingDown(op)
	}
	m.opWG.Add(1)
	return m.opWG.Done, nil
}

// beginVolumeOp admits a mutating call on volume id (beginOp) and returns
// a copy of the volume and its pool.
func (m *Manager) beginVolumeOp(op, id string) (volume, *pool, func(), error) {
	done, err := m.beginOp(op)
	if err != nil {
		return volume{}, nil, nil, err
	}
	v, p, err := m.lookup(id)
	if err != nil {
		done()
		return volume{}, nil, nil, err
	}
	return v, p, done, nil
}

// errShuttingDown is what a mutating call gets once Close has begun.
func errShuttingDown(op string) error {
	return fmt.Errorf("%w: %s refused: volagent is shutting down", ErrBusy, op)
}

func (m *Manager) isClosed() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closed
}

// Pools lists the opened pools in configuration order, with their current
// capacity and free space (a pool whose figures cannot be read shows 0).
func (m *Manager) Pools() []PoolInfo {
	var out []PoolInfo
	for _, p := range m.pools {
		if !p.opened.Load() {
			continue
		}
		out = append(out, m.poolInfo(context.Background(), p, false))
	}
	return out
}

// Pool returns one pool; ErrNotFound if no opened pool has that name.
func (m *Manager) Pool(name string) (PoolInfo, error) {
	p, err := m.openedPool(name)
	if err != nil {
		return PoolInfo{}, err
	}
	return m.poolInfo(context.Background(), p, false), nil
}

func (m *Manager) openedPool(name string) (*pool, error) {
	p, ok := m.poolByName[name]
	if !ok || !p.opened.Load() {
		return nil, fmt.Errorf("%w: pool %q: no such pool is configured and loaded", ErrNotFound, name)
	}
	return p, nil
}

// poolChanged tells subscribers a pool's free space changed.
func (m *Manager) poolChanged(p *pool) {
	m.poolInfo(context.Background(), p, true)
}

// poolInfo reads a pool's figures and brings its fill state up to date
// (poolfill.go). It sends EventPoolChanged when emit is set, and also
// when the fill state changed, so that subscribers follow a change a
// reader found.
func (m *Manager) poolInfo(ctx context.Context, p *pool, emit bool) PoolInfo {
	info := PoolInfo{Name: p.cfg.Name, Type: p.cfg.Type, Policy: p.cfg.Policy, Shared: p.cfg.Shared}
	m.fillMu.Lock()
	defer m.fillMu.Unlock()
	capacity, free, err := m.poolSpace(ctx, p)
	if err != nil {
		m.log.Warn("pool space unknown", "pool", p.cfg.Name, "err", err)
	}
	info.Capacity, info.Free = capacity, free
	var changed bool
	info.SpaceNeeded, info.SpaceLow, changed = m.updateFill(p, free, err == nil)
	if emit || changed {
		m.emit(Event{Kind: EventPoolChanged, Pool: &info})
	}
	return info
}

// Volumes lists the complete volumes, sorted by pool, then name.
func (m *Manager) Volumes() []VolumeInfo {
	m.mu.Lock()
	out := make([]VolumeInfo, 0, len(m.volumes))
	for _, v := range m.volumes {
		out = append(out, v.info)
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Pool != out[j].Pool {
			return out[i].Pool < out[j].Pool
		}
		return out[i].Name < out[j].Name
	})
	return out
}

// Volume returns one complete volume; ErrNotFound otherwise (a volume
// still being made is not found).
func (m *Manager) Volume(id string) (VolumeInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.volumes[id]
	if !ok {
		return VolumeInfo{}, fmt.Errorf("%w: volume %q", ErrNotFound, id)
	}
	return v.info, nil
}

// lookup returns a copy of a complete volume and its pool.
func (m *Manager) lookup(id string) (volume, *pool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.volumes[id]
	if !ok {
		if op, busy := m.pending[id]; busy {
			return volume{}, nil, fmt.Errorf("%w: volume %q is not complete (%s in progress)", ErrNotFound, id, op)
		}
		return volume{}, nil, fmt.Errorf("%w: volume %q", ErrNotFound, id)
	}
	return *v, m.poolByName[v.info.Pool], nil
}

// opLock returns the lock serialising operations on volume id.
func (m *Manager) opLock(id string) *sync.Mutex {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.opLocks[id]
	if !ok {
		l = &sync.Mutex{}
		m.opLocks[id] = l
	}
	return l
}

// gateFor is the Gate backing files are opened through for pool p: its
// backing roots, plus every managed volume's backing path (device or
// loop-pool file).
func (m *Manager) gateFor(p *pool) *qcow2.Gate {
	roots := append([]string{}, p.cfg.BackingRoots...)
	m.mu.Lock()
	for _, v := range m.volumes {
		if v.backingPath != "" {
			roots = append(roots, v.backingPath)
		}
		if v.info.DevicePath != "" && v.info.DevicePath != v.backingPath {
			roots = append(roots, v.info.DevicePath)
		}
	}
	m.mu.Unlock()
	return &qcow2.Gate{AllowedRoots: roots}
}

// Inspect judges an image the caller opened, with qcow2.Inspect and no
// backing roots: the backing name is reported, never checked against the
// host or opened. Errors: ErrInvalidArgument for a format other than
// "qcow2" or "raw"; ErrFailed for an I/O error. A refused image is a
// Report with Verdict "refused", not an error.
func (m *Manager) Inspect(ctx context.Context, r io.ReaderAt, size int64, name, format string) (*qcow2.Report, error) {
	if _, err := qcow2.ParseFormat(format); err != nil {
		return nil, fmt.Errorf("%w: format: %w", ErrInvalidArgument, err)
	}
	if size < 0 {
		return nil, fmt.Errorf("%w: size %d: must not be negative", ErrInvalidArgument, size)
	}
	rep, err := qcow2.Inspect(r, size, name, format, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: inspecting %s: %w", ErrFailed, name, err)
	}
	return rep, nil
}
