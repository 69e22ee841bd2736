package backend

// Pool fill: does each pool have the space its running domains' next
// growth takes? A thin volume a running domain writes grows by a chunk at
// its block threshold (package virt sizes the chunk: the pool's
// chunk_size, or more for a guest that writes fast). A pool whose free
// space is below the sum of those chunks will fail a growth, and the
// guest pauses out of space; volagent says so before that happens: the
// PoolInfo fields SpaceNeeded and SpaceLow, a warning in the log when a
// pool becomes low and a note when it recovers.
//
// The libvirt integration reports the chunks (NoteGrowthNeeds at domain
// start, resume, hot-plug, stop and after every growth; SetGrowthNeeds
// at its periodic pass over the running domains). The state is
// recomputed wherever the pool's free space is read (poolInfo): after
// every growth, create, delete, import and resize, and at that periodic
// pass for the pools that need space, so that space an admin adds or
// takes outside volagent is seen too.

import (
	"fmt"
	"slices"

	"github.com/volagent/volagent/internal/bytesize"
	"github.com/volagent/volagent/qcow2"
)

// poolFill is a pool's fill state as last reported.
type poolFill struct {
	needed int64
	low    bool
}

// NoteGrowthNeeds records the next growth of the volumes running domain
// domain writes (one GrowthNeed per volagent disk); none: the domain
// stopped or uses no thin volume. The pools whose need changed are read
// again in the background, and their changes sent as EventPoolChanged.
func (m *Manager) NoteGrowthNeeds(domain string, needs []GrowthNeed) {
	m.mu.Lock()
	if len(needs) == 0 {
		delete(m.growth, domain)
	} else {
		if m.growth == nil {
			m.growth = map[string][]GrowthNeed{}
		}
		m.growth[domain] = slices.Clone(needs)
	}
	m.mu.Unlock()
	m.recheckFill(false)
}

// SetGrowthNeeds replaces the growth needs of every running domain (by
// domain name), as the libvirt integration reads them at its periodic
// pass, and reads again, in the background, the free space of every pool
// that needs space or was low: space added to a volume group or freed in
// a directory is seen within one pass.
func (m *Manager) SetGrowthNeeds(byDomain map[string][]GrowthNeed) {
	growth := make(map[string][]GrowthNeed, len(byDomain))
	for d, needs := range byDomain {
		if len(needs) > 0 {
			growth[d] = slices.Clone(needs)
		}
	}
	m.mu.Lock()
	m.growth = growth
	m.mu.Unlock()
	m.recheckFill(true)
}

// recheckFill reads again the pools whose need differs from the one last
// reported, and with all, also those that need space or were low. It
// runs in the background: an LVM pool's free space costs an lvm command,
// not to be paid on the path of a libvirt event.
func (m *Manager) recheckFill(all bool) {
	needs := map[string]int64{}
	m.mu.Lock()
	for _, p := range m.pools {
		if p.opened.Load() {
			needs[p.cfg.Name] = m.spaceNeededLocked(p.cfg.Name)
		}
	}
	m.mu.Unlock()
	var todo []*pool
	m.fillMu.Lock()
	for _, p := range m.pools {
		need, ok := needs[p.cfg.Name]
		f := m.fill[p.cfg.Name]
		if ok && (need != f.needed || all && (need > 0 || f.low)) {
			todo = append(todo, p)
		}
	}
	m.fillMu.Unlock()
	if len(todo) == 0 {
		return
	}
	done, err := m.beginOp("pool fill check")
	if err != nil {
		return // shutting down
	}
	go func() {
		defer done()
		for _, p := range todo {
			m.poolChanged(p)
		}
	}()
}

// spaceNeededLocked is what the next growth of pool's volumes that
// running domains use takes: for each volume, the largest chunk a domain
// reported for it, at most what it can still grow. Called with m.mu.
func (m *Manager) spaceNeededLocked(pool string) int64 {
	chunks := map[string]int64{}
	for _, needs := range m.growth {
		for _, n := range needs {
			chunks[n.Volume] = max(chunks[n.Volume], n.Chunk)
		}
	}
	var total int64
	for id, chunk := range chunks {
		v, ok := m.volumes[id]
		if !ok || v.info.Pool != pool {
			continue
		}
		if g := nextGrowth(v.info, v.clusterSize, chunk); g > 0 {
			total = min(total+g, 1<<62) // no overflow, whatever a caller reports
		}
	}
	return total
}

// nextGrowth is what a volume's device grows by next, growing by chunk:
// the chunk, at most what separates the device from the largest size the
// image can reach (qcow2.MaxImageSize: every guest cluster allocated,
// with its metadata); 0 for a volume that is not thin (raw, or a device
// that holds the whole image already).
func nextGrowth(info VolumeInfo, clusterSize, chunk int64) int64 {
	if info.Format != "qcow2" || clusterSize <= 0 || chunk <= 0 || info.VirtualSize <= 0 {
		return 0
	}
	limit, err := qcow2.MaxImageSize(qcow2.CreateOptions{VirtualSize: roundUp(info.VirtualSize, 512), ClusterSize: int(clusterSize)})
	if err != nil {
		return 0
	}
	room := roundUp(limit, sizeAlignment) - info.DeviceSize
	if room <= 0 {
		return 0
	}
	return min(chunk, room)
}

// updateFill brings pool p's fill state up to date with free (known:
// whether it could be read; an unknown free space keeps the last verdict)
// and logs the change when p becomes low or recovers. Called with
// m.fillMu, which keeps the log lines and the events in one order.
func (m *Manager) updateFill(p *pool, free int64, known bool) (needed int64, low, changed bool) {
	m.mu.Lock()
	needed = m.spaceNeededLocked(p.cfg.Name)
	m.mu.Unlock()
	was := m.fill[p.cfg.Name]
	low = was.low
	if known {
		low = free < needed
	}
	if m.fill == nil {
		m.fill = map[string]poolFill{}
	}
	m.fill[p.cfg.Name] = poolFill{needed: needed, low: low}
	switch {
	case low && !was.low:
		m.log.Warn(fmt.Sprintf("pool %q is low on space: %s free, the running domains' next growth needs %s; %s, or a guest pauses when its volume cannot grow",
			p.cfg.Name, bytesize.Format(free), bytesize.Format(needed), fillAdvice(p)),
			"pool", p.cfg.Name, "free", free, "needed", needed)
	case !low && was.low:
		m.log.Info(fmt.Sprintf("pool %q has space again: %s free, the running domains' next growth needs %s",
			p.cfg.Name, bytesize.Format(free), bytesize.Format(needed)),
			"pool", p.cfg.Name, "free", free, "needed", needed)
	}
	return needed, low, needed != was.needed || low != was.low
}

// fillAdvice says how an admin gives pool p more space.
func fillAdvice(p *pool) string {
	if p.cfg.Type == PoolLVM {
		return fmt.Sprintf("extend volume group %q (vgextend) or free extents in it", p.cfg.VolumeGroup)
	}
	return fmt.Sprintf("free space in the filesystem of %s", p.cfg.Directory)
}
