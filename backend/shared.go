package backend

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/volagent/volagent/hostblk"
)

// Shared pools: an LVM pool whose volume group several hosts see, shared
// through lvmlockd with sanlock leases (PoolConfig.Shared). volagent keeps
// no cluster state of its own: lvmlockd's locks decide who may activate
// what, and the sanlock leases on the VG's lvmlock LV say who holds them.
//
//   - A volume is active exclusively (lvchange -aey) on the host that made
//     it, writes it, or runs a domain on it; shared (-asy) where it is a
//     base that overlays read. A volume not active here is listed from
//     LVM (name, size, tags) with ActiveOn naming the host that holds it.
//   - Create and delete change the VG's metadata under lvmlockd's VG lock;
//     delete takes the LV's exclusive lock first, so it is refused while
//     another host has the volume active.
//   - Every host sees the others' changes: a watcher polls the VG's
//     sequence number and rescans the pool when it moves.

// ActiveLocal is VolumeInfo.ActiveOn for a volume active on this host.
const ActiveLocal = "local"

// sharedState is what a shared pool keeps at run time. Guarded by mu.
type sharedState struct {
	hostID  int    // this host's sanlock host_id (lvmlocal.conf)
	lockDev string // the lvmlock LV's device

	mu    sync.Mutex
	seqno uint64
	// failures counts the watcher's polls that failed in a row.
	failures int
	// lost is set while this host cannot renew or reach its leases (the
	// reason), "" otherwise: writes are refused meanwhile.
	lost string
}

func (s *sharedState) lostReason() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lost
}

// lockStartTimeout bounds the start of a lockspace: sanlock needs tens of
// seconds (its host_id lease), more on slow storage.
const lockStartTimeout = 5 * time.Minute

// openShared checks the host's lvmlockd set-up for a shared pool and
// starts the VG's lockspace, waiting until it is started. Errors name
// what is missing and where to set it.
func (m *Manager) openShared(ctx context.Context, p *pool) error {
	name, vg := p.cfg.Name, p.cfg.VolumeGroup
	use, err := m.lvm.LVMConfig(ctx, "global/use_lvmlockd")
	if err != nil {
		return fmt.Errorf("%w: pool %q: reading lvm's global/use_lvmlockd: %w", ErrFailed, name, err)
	}
	if use != "1" {
		return fmt.Errorf("%w: pool %q is shared, but lvm is not set up for lvmlockd: set use_lvmlockd = 1 in the global section of /etc/lvm/lvm.conf (it is %s), start lvmlockd and sanlock, then restart volagent", ErrFailed, name, use)
	}
	hid, err := m.lvm.LVMConfig(ctx, "local/host_id")
	if err != nil {
		return fmt.Errorf("%w: pool %q: reading lvm's local/host_id: %w", ErrFailed, name, err)
	}
	id := 0
	if _, err := fmt.Sscan(hid, &id); err != nil || id < 1 || id > MaxHostID {
		return fmt.Errorf("%w: pool %q is shared, but this host has no sanlock host_id: set host_id (1 to %d, unique among the hosts sharing the storage) in the local section of /etc/lvm/lvmlocal.conf (it is %q)", ErrFailed, name, MaxHostID, hid)
	}
	st, err := m.lvm.SharedVGStatus(ctx, vg)
	if errors.Is(err, hostblk.ErrVGNotFound) {
		return fmt.Errorf("%w: pool %q: volume group %q does not exist (create it on one host with vgcreate --shared, or fix volume_group)", ErrNotFound, name, vg)
	}
	if err != nil {
		return fmt.Errorf("%w: pool %q: %w", ErrFailed, name, err)
	}
	if st.LockType != p.cfg.LockType {
		what := "is not shared"
		if st.LockType != "" {
			what = fmt.Sprintf("has lock type %q", st.LockType)
		}
		return fmt.Errorf("%w: pool %q: volume group %q %s, the configuration says lock_type %q (vgcreate --shared --locktype %s, or vgchange --locktype)", ErrInvalidArgument, name, vg, what, p.cfg.LockType, p.cfg.LockType)
	}
	m.log.Info("starting the lockspace of a shared volume group (sanlock: tens of seconds)", "pool", name, "volume_group", vg, "host_id", id)
	start := time.Now()
	sctx, cancel := context.WithTimeout(ctx, lockStartTimeout)
	defer cancel()
	// lvmlockd may refuse the first start while the lvmlock LV's device
	// node is still being made (udev): a second try finds it.
	err = m.lvm.LockStart(sctx, vg)
	if err != nil && sctx.Err() == nil {
		m.log.Warn("starting the lockspace failed; trying once more", "pool", name, "volume_group", vg, "err", err)
		err = m.lvm.LockStart(sctx, vg)
	}
	if err != nil {
		return fmt.Errorf("%w: pool %q: starting the lockspace of volume group %q (vgchange --lockstart): %w (are lvmlockd and sanlock running? see journalctl -u lvmlockd -u sanlock)", ErrFailed, name, vg, err)
	}
	m.log.Info("lockspace started", "pool", name, "volume_group", vg, "host_id", id, "seconds", time.Since(start).Seconds())
	p.shared = &sharedState{hostID: id, lockDev: hostblk.LockDevice(vg), seqno: st.Seqno}
	return nil
}

// hostName is how messages and ActiveOn name sanlock host id: its name
// in the [hosts] table, else "host_id N".
func (m *Manager) hostName(id int) string {
	if n, ok := m.cfg.Hosts[id]; ok {
		return n
	}
	return fmt.Sprintf("host_id %d", id)
}

// sharedHostsScanned is how many host ids a lease read looks at for shared
// holders at least (a sector each): more when [hosts] or this host's id
// go higher.
const sharedHostsScanned = 64

// maxHostID is the highest host id whose shared holds are read.
func (m *Manager) maxHostID(p *pool) int {
	n := max(sharedHostsScanned, p.shared.hostID)
	for id := range m.cfg.Hosts {
		n = max(n, id)
	}
	return n
}

// remoteHolders names the other hosts holding an LV's lease, "" for none.
func (m *Manager) remoteHolders(p *pool, lk hostblk.LVLock) (string, error) {
	if lk.LeaseOffset < 0 {
		return "", nil
	}
	h, err := hostblk.ReadLeaseHolders(p.shared.lockDev, lk.LeaseOffset, m.maxHostID(p))
	if err != nil {
		return "", err
	}
	var names []string
	for _, id := range h.Hosts() {
		if id != p.shared.hostID {
			names = append(names, m.hostName(id))
		}
	}
	return strings.Join(names, ","), nil
}

// lvState is where a shared pool's LV is active (ActiveLocal, the other
// holders' names, or "") and whether this host created it.
type lvState struct {
	where    string
	madeHere bool
}

// sharedLocks lists a shared pool's LVs by name with where they are
// active and who made them.
func (m *Manager) sharedLocks(ctx context.Context, p *pool) (map[string]lvState, error) {
	lks, err := m.lvm.LVLocks(ctx, p.cfg.VolumeGroup)
	if err != nil {
		return nil, err
	}
	self, _ := os.Hostname()
	out := map[string]lvState{}
	for _, lk := range lks {
		st := lvState{where: ActiveLocal, madeHere: lk.Host != "" && lk.Host == self}
		if !lk.ActiveHere() {
			st.where, err = m.remoteHolders(p, lk)
			if err != nil {
				m.log.Warn("cannot read a volume's lease", "pool", p.cfg.Name, "volume", lk.Name, "err", err)
				st.where = "unknown"
			}
		}
		out[lk.Name] = st
	}
	return out, nil
}

// lockRefusal turns lvm's refusal of an LV lock into an ErrBusy that names
// the host holding it.
func (m *Manager) lockRefusal(ctx context.Context, p *pool, name, what string, cause error) error {
	if errors.Is(cause, hostblk.ErrLockspace) {
		return fmt.Errorf("%w: pool %q: cannot %s volume %q: the lockspace of volume group %q is not usable on this host (see journalctl -u lvmlockd -u sanlock): %w", ErrFailed, p.cfg.Name, what, name, p.cfg.VolumeGroup, cause)
	}
	if !errors.Is(cause, hostblk.ErrLockedElsewhere) {
		return fmt.Errorf("%w: pool %q: cannot %s volume %q: %w", ErrFailed, p.cfg.Name, what, name, cause)
	}
	holder := "another host"
	if lks, err := m.lvm.LVLocks(context.WithoutCancel(ctx), p.cfg.VolumeGroup); err == nil {
		for _, lk := range lks {
			if lk.Name != name {
				continue
			}
			// The other holders, also when it is active here (shared, and
			// the exclusive lock was asked).
			if where, err := m.remoteHolders(p, lk); err == nil && where != "" {
				holder = where
			}
		}
	}
	return fmt.Errorf("%w: pool %q: cannot %s volume %q: it is active on %s (deactivate it there with `volagent volumes deactivate`, or, if that host is dead, wait until its sanlock lease expires): %w",
		ErrBusy, p.cfg.Name, what, name, holder, cause)
}

// holdLock activates a shared pool's volume on this host with mode for an
// operation (what names it in errors) and returns what undoes it: a
// volume that was not active here is deactivated again. A no-op for
// other pools.
func (m *Manager) holdLock(ctx context.Context, p *pool, v *volume, mode hostblk.LockMode, what string) (func(), error) {
	if p.shared == nil {
		return func() {}, nil
	}
	if reason := p.shared.lostReason(); reason != "" && mode == hostblk.LockExclusive {
		return nil, fmt.Errorf("%w: pool %q: cannot %s volume %q: %s", ErrFailed, p.cfg.Name, what, v.info.Name, reason)
	}
	wasHere := v.info.ActiveOn == ActiveLocal
	if wasHere && mode == hostblk.LockShared {
		return func() {}, nil // any activation here reads
	}
	if _, err := m.lvm.ActivateMode(ctx, p.cfg.VolumeGroup, v.info.Name, mode); err != nil {
		return nil, m.lockRefusal(ctx, p, v.info.Name, what, err)
	}
	if wasHere {
		return func() {}, nil
	}
	return func() {
		if err := p.act.Deactivate(context.WithoutCancel(ctx), p.cfg.VolumeGroup, v.info.Name); err != nil && !errors.Is(err, hostblk.ErrLVNotFound) {
			m.log.Error("could not deactivate a volume after using it; it stays active here", "pool", p.cfg.Name, "volume", v.info.Name, "err", err)
		}
	}, nil
}

// lockForChange takes a shared pool's volume's exclusive lock for a change
// (holdLock) and, when its header was not read here (it was active
// elsewhere), reads it, so the change is checked against the image as it
// is. A no-op for other pools.
func (m *Manager) lockForChange(ctx context.Context, p *pool, v *volume, what string) (func(), error) {
	release, err := m.holdLock(ctx, p, v, hostblk.LockExclusive, what)
	if err != nil || p.shared == nil || !v.notHere {
		return release, err
	}
	fresh := m.readVolume(p, v.info.Name, hostblk.LVPath(p.cfg.VolumeGroup, v.info.Name), "", v.meta)
	if fresh.problem != "" {
		release()
		return nil, fmt.Errorf("%w: volume %q (%s) cannot be changed: %s", ErrFailed, v.info.Name, v.info.ID, fresh.problem)
	}
	// It stays as it was before (not here) for holdLock's release.
	fresh.info.ActiveOn, fresh.notHere = v.info.ActiveOn, v.notHere
	*v = *fresh
	return release, nil
}

// Activate activates a volume of a shared pool on this host: exclusively
// (for a domain here to use it, or to write it), or shared (a base that
// overlays on several hosts read). Results: ErrBusy when another host
// holds it in a conflicting mode (the message names that host);
// ErrInvalidArgument for a volume of a pool that is not shared (always
// active); ErrNotFound; ErrFailed.
func (m *Manager) Activate(ctx context.Context, c Caller, id string, shared bool) error {
	v, p, done, err := m.beginVolumeOp("Activate", id)
	if err != nil {
		return err
	}
	defer done()
	if p.shared == nil {
		return fmt.Errorf("%w: volume %q: pool %q is not shared; its volumes are always active", ErrInvalidArgument, v.info.Name, p.cfg.Name)
	}
	lock := m.opLock(id)
	lock.Lock()
	defer lock.Unlock()
	mode, what := hostblk.LockExclusive, "activate exclusively"
	if shared {
		mode, what = hostblk.LockShared, "activate shared"
	}
	if reason := p.shared.lostReason(); reason != "" {
		return fmt.Errorf("%w: pool %q: cannot %s volume %q: %s", ErrFailed, p.cfg.Name, what, v.info.Name, reason)
	}
	if _, err := m.lvm.ActivateMode(ctx, p.cfg.VolumeGroup, v.info.Name, mode); err != nil {
		return m.lockRefusal(ctx, p, v.info.Name, what, err)
	}
	m.refreshShared(p, &v)
	m.log.Info("volume activated", "pool", p.cfg.Name, "volume", v.info.Name, "mode", string(mode), "uid", c.UID)
	// What it reads must be here too: its backing volume, shared.
	return m.ensureBackingActive(ctx, v.meta.BackingName)
}

// ensureBackingActive activates a shared pool's volume id shared on this
// host unless it is active here already, so that an overlay here can read
// it. "" and volumes of other pools are left alone.
func (m *Manager) ensureBackingActive(ctx context.Context, id string) error {
	if !isVolumeID(id) {
		return nil
	}
	b, p, err := m.lookup(id)
	if err != nil || p.shared == nil || b.info.ActiveOn == ActiveLocal {
		return nil // a missing backing is the caller's to report
	}
	if _, err := m.lvm.ActivateMode(ctx, p.cfg.VolumeGroup, b.info.Name, hostblk.LockShared); err != nil {
		return m.lockRefusal(ctx, p, b.info.Name, "activate shared (as a backing)", err)
	}
	m.refreshShared(p, &b)
	m.log.Info("backing volume activated shared", "pool", p.cfg.Name, "volume", b.info.Name)
	return nil
}

// refuseIfLeaseLost refuses to make a volume in a shared pool whose lease
// storage does not answer.
func (p *pool) refuseIfLeaseLost(what string) error {
	if p.shared == nil {
		return nil
	}
	if reason := p.shared.lostReason(); reason != "" {
		return fmt.Errorf("%w: pool %q: cannot %s: %s", ErrFailed, p.cfg.Name, what, reason)
	}
	return nil
}

// Deactivate deactivates a volume of a shared pool on this host, releasing
// its lock so that another host may activate it. ErrBusy while it is in
// use here (a domain, qemu, an operation, an overlay over it that is
// active here).
func (m *Manager) Deactivate(ctx context.Context, c Caller, id string) error {
	v, p, done, err := m.beginVolumeOp("Deactivate", id)
	if err != nil {
		return err
	}
	defer done()
	if p.shared == nil {
		return fmt.Errorf("%w: volume %q: pool %q is not shared; its volumes stay active", ErrInvalidArgument, v.info.Name, p.cfg.Name)
	}
	lock := m.opLock(id)
	lock.Lock()
	defer lock.Unlock()
	if v.info.ActiveOn != ActiveLocal {
		return nil
	}
	m.mu.Lock()
	busy := ""
	for _, other := range m.volumes {
		if other.info.ActiveOn == ActiveLocal && (other.meta.BackingName == id || other.info.BackingName != "" && other.info.BackingName == v.backingPath) {
			busy = fmt.Sprintf("overlay %q, active here, reads it", other.info.Name)
		}
	}
	m.mu.Unlock()
	if busy != "" {
		return fmt.Errorf("%w: volume %q (%s): %s: deactivate that first", ErrBusy, v.info.Name, id, busy)
	}
	if err := m.refuseIfDomainsUse(ctx, &v, "deactivate", true); err != nil {
		return err
	}
	if err := m.checkNotInUse(ctx, &v); err != nil {
		return err
	}
	if err := p.act.Deactivate(ctx, p.cfg.VolumeGroup, v.info.Name); err != nil {
		return fmt.Errorf("%w: pool %q: deactivating volume %q: %w", ErrFailed, p.cfg.Name, v.info.Name, err)
	}
	m.refreshShared(p, &v)
	m.log.Info("volume deactivated", "pool", p.cfg.Name, "volume", v.info.Name, "uid", c.UID)
	return nil
}

// refreshShared re-reads one volume of a shared pool after its activation
// changed, and tells subscribers.
func (m *Manager) refreshShared(p *pool, v *volume) {
	where := ""
	if locks, err := m.sharedLocks(context.Background(), p); err == nil {
		where = locks[v.info.Name].where
	}
	nv := m.sharedVolume(p, v.info.Name, v.meta, int64(0), where, v)
	m.mu.Lock()
	if _, ok := m.volumes[nv.info.ID]; ok {
		m.volumes[nv.info.ID] = nv
	}
	m.mu.Unlock()
	info := nv.info
	m.emit(Event{Kind: EventVolumeChanged, Volume: &info})
	m.wakeChecker()
}

// sharedVolume builds a shared pool's volume: read from its device when it
// is active here; otherwise from what LVM says (size, tags) and what an
// earlier read of its header found (prev), with where it is active.
func (m *Manager) sharedVolume(p *pool, name string, meta hostblk.VolumeMeta, lvSize int64, where string, prev *volume) *volume {
	dev := hostblk.LVPath(p.cfg.VolumeGroup, name)
	if where == ActiveLocal {
		v := m.readVolume(p, name, dev, "", meta)
		v.info.ActiveOn = ActiveLocal
		return v
	}
	v := &volume{
		info: VolumeInfo{ID: VolumeID(p.cfg.Name, name), Name: name, Pool: p.cfg.Name, DevicePath: dev, Role: Role(meta.Role), Origin: meta.Origin,
			DeviceSize: lvSize, ActiveOn: where},
		meta: meta, backingPath: dev, notHere: true,
	}
	if prev != nil && prev.info.Format != "" {
		// What the header said when it was last read here; it changes
		// only by resize, which needs the volume active.
		v.info.Format, v.info.VirtualSize, v.info.HighestAllocated = prev.info.Format, prev.info.VirtualSize, prev.info.HighestAllocated
		v.info.BackingName, v.info.BackingFormat = prev.info.BackingName, prev.info.BackingFormat
		if lvSize == 0 {
			v.info.DeviceSize = prev.info.DeviceSize
		}
	}
	return v
}

// sharedPollInterval is how often the watcher reads shared VGs' sequence
// numbers; a change on another host shows here within about that (plus
// the rescan). sharedRescanEvery rescans anyway (activations on other
// hosts change leases, not the VG's metadata).
// sharedLostAfter failed polls in a row mean the lease storage is lost:
// one failure may be a lock another command of this host holds, or a
// slow lvm; three take a few seconds, well inside lvmlockd's deadline
// (8 x sanlock's I/O timeout: 80 s by default).
const (
	sharedPollInterval = time.Second
	sharedRescanEvery  = 5
	sharedPollTimeout  = 8 * time.Second
	sharedLostAfter    = 3
)

// WatchSharedPools follows the shared pools until ctx ends: it rescans a
// pool when its VG's sequence number moves (another host made, removed,
// grew or tagged a volume) and every few seconds (activations elsewhere),
// and raises the alarm when this host's lease storage stops answering
// (EventLeaseLost): writes are refused until it answers again.
func (m *Manager) WatchSharedPools(ctx context.Context) {
	var pools []*pool
	for _, p := range m.pools {
		if p.shared != nil {
			pools = append(pools, p)
		}
	}
	if len(pools) == 0 {
		return
	}
	t := time.NewTicker(sharedPollInterval)
	defer t.Stop()
	for tick := 1; ; tick++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, p := range pools {
			pctx, cancel := context.WithTimeout(ctx, sharedPollTimeout)
			st, err := m.lvm.SharedVGStatus(pctx, p.cfg.VolumeGroup)
			timedOut := pctx.Err() != nil
			cancel()
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				// Lost locks, I/O errors, no answer: the same to a host
				// that must not write without its leases, once they
				// last. The next answer clears it.
				p.shared.mu.Lock()
				p.shared.failures++
				n := p.shared.failures
				p.shared.mu.Unlock()
				m.log.Warn("reading a shared volume group failed", "pool", p.cfg.Name, "failures_in_a_row", n, "err", err)
				if n >= sharedLostAfter || errors.Is(err, hostblk.ErrLockspace) {
					m.leaseTrouble(p, err, timedOut)
				}
				continue
			}
			m.leaseBack(p)
			p.shared.mu.Lock()
			moved := st.Seqno != p.shared.seqno
			p.shared.seqno = st.Seqno
			p.shared.mu.Unlock()
			if moved || tick%sharedRescanEvery == 0 {
				m.scanMu.Lock()
				m.scanLocked(ctx, p)
				m.scanMu.Unlock()
			}
		}
	}
}

// leaseTrouble records that p's lease storage does not answer: writes
// stop, and the journal and D-Bus say so once.
func (m *Manager) leaseTrouble(p *pool, err error, timedOut bool) {
	reason := fmt.Sprintf("this host has lost access to the leases of volume group %q (lvm: %v); volagent writes nothing to the pool until they answer again, and lvmlockd will deactivate its volumes here when the lease expires", p.cfg.VolumeGroup, err)
	if timedOut {
		reason = fmt.Sprintf("the storage of volume group %q (its sanlock leases) has not answered for %s; volagent writes nothing to the pool until it answers again, and lvmlockd will deactivate its volumes here if the lease expires", p.cfg.VolumeGroup, sharedPollTimeout)
	}
	p.shared.mu.Lock()
	first := p.shared.lost == ""
	p.shared.lost = reason
	p.shared.mu.Unlock()
	if first {
		m.log.Error("LEASE STORAGE LOST: stop the domains using this pool's volumes on this host, or expect lvmlockd to deactivate them", "pool", p.cfg.Name, "volume_group", p.cfg.VolumeGroup, "err", err)
		m.emit(Event{Kind: EventLeaseLost, Lease: &LeaseEvent{Pool: p.cfg.Name, Lost: true, Message: reason}})
	}
}

// leaseBack clears leaseTrouble once the storage answers again.
func (m *Manager) leaseBack(p *pool) {
	p.shared.mu.Lock()
	was := p.shared.lost
	p.shared.lost = ""
	p.shared.failures = 0
	p.shared.mu.Unlock()
	if was != "" {
		m.log.Warn("lease storage answers again", "pool", p.cfg.Name, "volume_group", p.cfg.VolumeGroup)
		m.emit(Event{Kind: EventLeaseLost, Lease: &LeaseEvent{Pool: p.cfg.Name, Lost: false, Message: "the lease storage answers again"}})
	}
}

// MigrationRefusal says why a domain must not be live-migrated: it has
// disks (or backing images) on volumes of a shared pool. Migration needs
// each volume active on both hosts, then exclusive on the destination;
// volagent does not do that hand-over yet, and an exclusive volume left
// on the source while the destination writes would corrupt it. One
// violation (code CodeSharedMigration) per disk; none when the domain may
// migrate. The chains come from the policy's report when there is one,
// else from the XML.
func MigrationRefusal(cfg *Config, domainXML []byte, rep *DomainReport) []DomainViolation {
	if cfg == nil {
		return nil
	}
	shared := false
	for _, pc := range cfg.Pools {
		shared = shared || pc.Shared
	}
	if !shared {
		return nil
	}
	disks, err := DomainDiskLayers(domainXML, rep)
	if err != nil {
		return nil // the policy reports the XML
	}
	var out []DomainViolation
	for _, d := range disks {
		for _, path := range d.Layers {
			if pool := sharedPoolOf(cfg, path); pool != "" {
				out = append(out, DomainViolation{Disk: d.Target, Image: path, Code: CodeSharedMigration,
					Message: fmt.Sprintf("%s is a volume of shared pool %q: live migration is refused (its LV lock would have to be shared by both hosts during the migration, then exclusive on the destination, and volagent does not hand it over); shut the domain down, deactivate its volumes here (volagent volumes deactivate), and start it on the other host", path, pool)})
				break
			}
		}
	}
	return out
}

// CodeSharedMigration is the violation code of a live migration refused
// because of a shared pool's volume.
const CodeSharedMigration = "shared-pool-migration"

// MigrationRefusal is MigrationRefusal with the daemon's configuration.
func (m *Manager) MigrationRefusal(domainXML []byte, rep *DomainReport) []DomainViolation {
	return MigrationRefusal(m.cfg, domainXML, rep)
}

// sharedPoolOf names the shared pool whose volume path is, by any name on
// its way through symlinks (/dev/VG/LV, a request link) or by its
// device-mapper name; "" for none.
func sharedPoolOf(cfg *Config, path string) string {
	if path == "" {
		return ""
	}
	names := linkChain(path)
	dm := hostblk.DeviceMapperName(path)
	for _, pc := range cfg.Pools {
		if !pc.Shared {
			continue
		}
		dmPrefix := strings.ReplaceAll(pc.VolumeGroup, "-", "--") + "-"
		if dm != "" && strings.HasPrefix(dm, dmPrefix) && !strings.HasPrefix(dm[len(dmPrefix):], "-") {
			return pc.Name
		}
		for _, n := range names {
			if p, ok := ConfigManagesPath(&Config{Pools: []PoolConfig{pc}}, n); ok {
				return p
			}
		}
	}
	return ""
}

// sharedVolumeOf names the shared pool and volume whose device path is,
// by any name on its way through symlinks (/dev/VG/LV, a request link):
// ok false for none. The volume need not be active (its /dev/VG/LV link
// may dangle).
func sharedVolumeOf(cfg *Config, path string) (pool, name string, ok bool) {
	names := linkChain(path)
	for _, pc := range cfg.Pools {
		if !pc.Shared {
			continue
		}
		prefix := "/dev/" + pc.VolumeGroup + "/"
		for _, n := range names {
			n = filepath.Clean(n)
			if rest, found := strings.CutPrefix(n, prefix); found && rest != "" && !strings.Contains(rest, "/") {
				return pc.Name, rest, true
			}
		}
	}
	return "", "", false
}

// ActivateForDomain activates on this host the shared pools' volumes a
// domain about to start here uses: each disk exclusively (shared for a
// <shareable/> or read-only disk), and its backing volume shared. What
// cannot be activated (another host holds it) is returned as a violation
// naming that host (code CodeSharedBusy), so the domain is refused before
// qemu opens anything. Volumes stay active here after the domain stops,
// until `volagent volumes deactivate`.
func (m *Manager) ActivateForDomain(ctx context.Context, domainXML []byte) []DomainViolation {
	_, disks, err := DomainDisks(domainXML)
	if err != nil {
		return nil // the policy reports the XML
	}
	var out []DomainViolation
	for _, d := range disks {
		poolName, name, ok := sharedVolumeOf(m.cfg, d.Path)
		if !ok {
			continue
		}
		v, p, err := m.lookup(VolumeID(poolName, name))
		if err != nil || p.shared == nil {
			continue // not a volume volagent knows: the policy says what it is
		}
		mode := hostblk.LockExclusive
		if d.ReadOnly || d.Shareable {
			mode = hostblk.LockShared
		}
		err = nil
		if v.info.ActiveOn != ActiveLocal || mode == hostblk.LockExclusive {
			_, err = m.lvm.ActivateMode(ctx, p.cfg.VolumeGroup, name, mode)
		}
		if err == nil {
			m.refreshShared(p, &v)
			err = m.ensureBackingActive(ctx, v.meta.BackingName)
		} else {
			err = m.lockRefusal(ctx, p, name, "activate for the domain", err)
		}
		if err != nil {
			out = append(out, DomainViolation{Disk: d.Target, Image: d.Path, Code: CodeSharedBusy, Message: err.Error()})
			continue
		}
		m.log.Info("volume activated for a domain", "pool", poolName, "volume", name, "disk", d.Target, "mode", string(mode))
	}
	return out
}

// CodeSharedBusy is the violation code of a domain disk on a shared pool's
// volume that this host cannot activate (another host holds it).
const CodeSharedBusy = "shared-volume-busy"

// linkChain is path and every name its symlinks lead through, one link at
// a time (at most 16), the last one dangling or not.
func linkChain(path string) []string {
	names := []string{path}
	for p, i := path, 0; i < 16; i++ {
		t, err := os.Readlink(p)
		if err != nil {
			break
		}
		if !filepath.IsAbs(t) {
			t = filepath.Join(filepath.Dir(p), t)
		}
		names = append(names, t)
		p = t
	}
	return names
}
