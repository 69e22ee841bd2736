package virt

// Thin provisioning of overlays used by running domains. An overlay's
// device starts at its pool's initial size; qemu allocates clusters past
// the end of what it has written, so the device must grow before qemu
// writes past its end. For every disk of a running domain on a volagent
// qcow2 volume, a block threshold (virDomainSetBlockThreshold, qemu's
// write threshold on the host device node) is set half a chunk below the
// device's end; when qemu's writes cross it, the BLOCK_THRESHOLD event
// grows the device by the pool's chunk and the threshold is set again.
//
// qemu needs nothing more: a host_device node has a variable length, so
// qemu re-reads the device size, and qcow2 allocates past the end it knew
// without asking (no block_resize, which would change the guest size).
//
// If qemu outruns the growth, its write fails with ENOSPC; with the disk's
// error policy (qemu's default werror=enospc, libvirt's error_policy
// 'stop' or 'enospace') a guest write pauses the domain and qemu keeps the
// request, so IO_ERROR_REASON "enospc" grows the device and resumes the
// domain, and the request is retried: no guest write is lost. (Writes
// made through the HMP qemu-io command bypass the guest device's error
// policy: they fail instead of pausing.)
//
// DisableThresholds leaves only that second path: no threshold is set, and
// every growth costs the domain a pause.
//
// The controller also reports how far each such disk's image reaches to
// the backend (NoteAllocation, when Volumes has it): libvirt's allocation
// of the disk (virDomainGetBlockInfo: qemu's highest written offset) at
// every threshold event, start, resume and hot-plug, and every
// AllocationInterval while the domain runs, so a volume's HighestAllocated
// follows the guest's writes.
//
// And it reports what each running domain's volumes grow by next (the
// chunk of each volagent disk; NoteGrowthNeeds, when Volumes has it) at
// the same moments and when the domain stops, and all of them at every
// AllocationInterval (SetGrowthNeeds): the backend warns when a pool's
// free space falls below that.

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"libvirt.org/go/libvirt"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/hostblk"
)

// ThinController keeps the devices of volagent volumes ahead of the
// writes of the domains that use them.
type ThinController struct {
	vols Volumes
	log  *slog.Logger

	mu           sync.Mutex
	conn         *Conn
	noThresholds bool
	interval     time.Duration
	polling      bool
	stop         chan struct{}
	stopOnce     sync.Once
	growth       map[string]*growthState // by volume ID
}

// growthLead is how long one growth must last a guest writing at its
// recent rate. A growth takes well under a second (one truncate or one
// lvextend, and LOOP_SET_CAPACITY); the rest is a margin for bursts.
const growthLead = 2 * time.Second

// growthState is what the controller saw of a volume's writes: where and
// when the last threshold was crossed, and the recent write rate.
type growthState struct {
	at       time.Time
	written  int64
	rate     float64 // bytes per second
	maxChunk int64   // the largest chunk it grew by
}

// minRateWindow is the shortest interval a write rate is measured over.
// Threshold crossings and allocation reads both feed observe, and one of
// each can come milliseconds apart with tens of MiB between what they
// report (the threshold's offset, the image's end a moment later): over
// such an interval that is a rate of GiB/s, and a growth of tens of GiB
// for a guest writing at 200 MiB/s.
const minRateWindow = time.Second

// observe records that the guest wrote up to written at now (a threshold
// crossing, or an allocation read). The rate follows an acceleration at
// once and halves at each observation once the guest slows down. An
// observation sooner than minRateWindow after the last one counted only
// moves nothing: the next one measures over the longer interval.
func (t *ThinController) observe(id string, written int64, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.growth == nil {
		t.growth = map[string]*growthState{}
	}
	g, ok := t.growth[id]
	if !ok {
		t.growth[id] = &growthState{at: now, written: written}
		return
	}
	dt := now.Sub(g.at)
	if dt < minRateWindow {
		return
	}
	if written > g.written {
		g.rate = max(float64(written-g.written)/dt.Seconds(), g.rate/2)
	}
	g.at, g.written = now, written
}

// chunkFor is what volume id grows by: the pool's chunk, or as many
// chunks as the guest writes in growthLead at its recent rate (so the
// threshold, half a chunk below the end, leaves it growthLead/2 of
// writing while the device grows), whichever is larger.
func (t *ThinController) chunkFor(id string, poolChunk int64) int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	g, ok := t.growth[id]
	if !ok || poolChunk <= 0 {
		return poolChunk
	}
	need := int64(g.rate * growthLead.Seconds())
	chunk := max(poolChunk, (need+poolChunk-1)/poolChunk*poolChunk)
	g.maxChunk = max(g.maxChunk, chunk)
	return chunk
}

// largestChunk is the largest chunk volume id has grown by (0 if none).
func (t *ThinController) largestChunk(id string) int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if g, ok := t.growth[id]; ok {
		return g.maxChunk
	}
	return 0
}

// DefaultAllocationInterval is how often the controller reads the
// allocation of the volagent disks of running domains.
const DefaultAllocationInterval = 5 * time.Second

// allocationSink is what the controller reports allocations to;
// backend.Manager implements it.
type allocationSink interface {
	NoteAllocation(id string, allocation int64)
}

// growthSink is what the controller reports the next growth of running
// domains' volumes to; backend.Manager implements it.
type growthSink interface {
	NoteGrowthNeeds(domain string, needs []backend.GrowthNeed)
	SetGrowthNeeds(byDomain map[string][]backend.GrowthNeed)
}

// growthNeeds are the next growths of a domain's thin disks.
func growthNeeds(disks []thinDisk) []backend.GrowthNeed {
	needs := make([]backend.GrowthNeed, 0, len(disks))
	for _, d := range disks {
		needs = append(needs, backend.GrowthNeed{Volume: d.volume.ID, Chunk: d.chunk})
	}
	return needs
}

// NewThinController makes a ThinController; log (optional) gets what it
// does.
func NewThinController(vols Volumes, log *slog.Logger) *ThinController {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &ThinController{vols: vols, log: log, interval: DefaultAllocationInterval, stop: make(chan struct{})}
}

// SetAllocationInterval changes how often running domains' allocations are
// read (DefaultAllocationInterval); call it before Bind.
func (t *ThinController) SetAllocationInterval(d time.Duration) {
	t.mu.Lock()
	t.interval = d
	t.mu.Unlock()
}

// Bind tells the controller which connection domains are looked up on,
// and starts reading allocations every AllocationInterval.
func (t *ThinController) Bind(c *Conn) {
	t.mu.Lock()
	t.conn = c
	start := !t.polling && t.interval > 0
	t.polling = true
	interval := t.interval
	t.mu.Unlock()
	if _, ok := t.vols.(allocationSink); ok && start {
		go t.pollAllocations(interval)
	}
}

// Close stops the allocation reads. Idempotent.
func (t *ThinController) Close() {
	t.stopOnce.Do(func() { close(t.stop) })
}

// pollAllocations reads the allocation of every running domain's volagent
// disks every interval, until Close.
func (t *ThinController) pollAllocations(interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-t.stop:
			return
		case <-tick.C:
		}
		t.mu.Lock()
		c := t.conn
		t.mu.Unlock()
		_ = c.Do(func(conn *libvirt.Connect) error {
			doms, err := conn.ListAllDomains(libvirt.CONNECT_LIST_DOMAINS_ACTIVE)
			if err != nil {
				return err
			}
			byDomain := map[string][]backend.GrowthNeed{}
			for i := range doms {
				name, disks := t.thinDisks(conn, &doms[i])
				t.noteAllocations(&doms[i], disks)
				if name != "" {
					byDomain[name] = growthNeeds(disks)
				}
				doms[i].Free()
			}
			if sink, ok := t.vols.(growthSink); ok {
				sink.SetGrowthNeeds(byDomain)
			}
			return nil
		})
	}
}

// noteAllocations tells the backend how far each disk's image reaches, as
// libvirt reports it.
func (t *ThinController) noteAllocations(dom *libvirt.Domain, disks []thinDisk) {
	sink, ok := t.vols.(allocationSink)
	if !ok {
		return
	}
	for _, d := range disks {
		info, err := dom.GetBlockInfo(d.target, 0)
		if err != nil {
			t.log.Debug("thin provisioning: block info", "disk", d.target, "volume", d.volume.ID, "err", err)
			continue
		}
		if info.Allocation > 0 {
			sink.NoteAllocation(d.volume.ID, int64(info.Allocation))
			// A rate known before the first crossing sizes the first
			// growth (and the threshold after it) for a fast guest.
			t.observe(d.volume.ID, int64(info.Allocation), time.Now())
		}
	}
}

// DisableThresholds turns the block thresholds off: volumes grow only when
// a domain pauses out of space (ENOSPC under a 'stop' or 'enospace' error
// policy), and then the domain is resumed. Thresholds already set on a
// domain (by an earlier controller) still grow its volume when crossed,
// but are not set again. It exists to exercise the ENOSPC path alone;
// call it before Bind.
func (t *ThinController) DisableThresholds() {
	t.mu.Lock()
	t.noThresholds = true
	t.mu.Unlock()
}

func (t *ThinController) thresholdsDisabled() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.noThresholds
}

// Handlers returns h with the controller's handlers added (chained after
// h's): thresholds are set on every running domain at each (re)connection
// (qemu keeps them across a libvirtd restart, but one may have fired
// unseen), when a domain starts or resumes and when a disk is hot-plugged.
func (t *ThinController) Handlers(h Handlers) Handlers {
	connected, lifecycle, added, crossed, ioerr := h.Connected, h.DomainLifecycle, h.DeviceAdded, h.BlockThreshold, h.IOError
	h.Connected = func(conn *libvirt.Connect, gen uint64) {
		if connected != nil {
			connected(conn, gen)
		}
		doms, err := conn.ListAllDomains(libvirt.CONNECT_LIST_DOMAINS_ACTIVE)
		if err != nil {
			t.log.Warn("thin provisioning: listing running domains failed", "err", err)
			return
		}
		for i := range doms {
			t.arm(conn, &doms[i], "")
			doms[i].Free()
		}
	}
	h.DomainLifecycle = func(domain string, event libvirt.DomainEventType, detail int) {
		if lifecycle != nil {
			lifecycle(domain, event, detail)
		}
		switch event {
		case libvirt.DOMAIN_EVENT_STARTED, libvirt.DOMAIN_EVENT_RESUMED:
			t.withDomain(domain, func(conn *libvirt.Connect, dom *libvirt.Domain) { t.arm(conn, dom, "") })
		case libvirt.DOMAIN_EVENT_STOPPED:
			if sink, ok := t.vols.(growthSink); ok {
				sink.NoteGrowthNeeds(domain, nil) // its volumes no longer grow
			}
		}
	}
	h.DeviceAdded = func(domain, alias string) {
		if added != nil {
			added(domain, alias)
		}
		t.withDomain(domain, func(conn *libvirt.Connect, dom *libvirt.Domain) { t.arm(conn, dom, "") })
	}
	h.BlockThreshold = func(domain, dev, path string, threshold, excess uint64) {
		if crossed != nil {
			crossed(domain, dev, path, threshold, excess)
		}
		t.onThreshold(domain, dev, path, threshold+excess)
	}
	h.IOError = func(domain, srcPath, devAlias string, action libvirt.DomainEventIOErrorAction, reason string) {
		if ioerr != nil {
			ioerr(domain, srcPath, devAlias, action, reason)
		}
		if reason == "enospc" {
			t.onENOSPC(domain, srcPath)
		}
	}
	return h
}

// ThresholdFor is where the threshold goes on a device of deviceSize
// bytes growing by chunk: half a chunk below the end (so the growth has
// the time qemu takes to write half a chunk), but never below half the
// device.
func ThresholdFor(deviceSize, chunk int64) int64 {
	return max(deviceSize-chunk/2, deviceSize/2)
}

func (t *ThinController) withDomain(name string, fn func(*libvirt.Connect, *libvirt.Domain)) {
	t.mu.Lock()
	c := t.conn
	t.mu.Unlock()
	if c == nil {
		return
	}
	err := c.Do(func(conn *libvirt.Connect) error {
		dom, err := conn.LookupDomainByName(name)
		if err != nil {
			return err
		}
		defer dom.Free()
		fn(conn, dom)
		return nil
	})
	if err != nil {
		t.log.Warn("thin provisioning: domain not reachable", "domain", name, "err", err)
	}
}

// thinDisk is a disk of a running domain on a volagent volume.
type thinDisk struct {
	target string
	volume backend.VolumeInfo
	chunk  int64
}

// thinDisks lists the domain's disks on volagent qcow2 volumes.
func (t *ThinController) thinDisks(conn *libvirt.Connect, dom *libvirt.Domain) (string, []thinDisk) {
	xml, err := dom.GetXMLDesc(0)
	if err != nil {
		t.log.Warn("thin provisioning: domain XML", "err", err)
		return "", nil
	}
	name, disks, err := parseDisks(xml)
	if err != nil {
		t.log.Warn("thin provisioning: domain XML", "err", err)
		return "", nil
	}
	var out []thinDisk
	for _, d := range disks {
		if d.Target == "" || d.Format != "qcow2" {
			continue
		}
		v, ok := t.vols.VolumeByDevice(diskPath(conn, d))
		if !ok || v.Format != "qcow2" {
			continue
		}
		settings, err := t.vols.PoolSettings(v.Pool)
		if err != nil {
			continue
		}
		out = append(out, thinDisk{target: d.Target, volume: v, chunk: t.chunkFor(v.ID, settings.ChunkSize)})
	}
	return name, out
}

// arm sets the threshold on the domain's volagent disks (only target,
// when given), unless thresholds are disabled.
func (t *ThinController) arm(conn *libvirt.Connect, dom *libvirt.Domain, target string) {
	name, disks := t.thinDisks(conn, dom)
	t.noteAllocations(dom, disks)
	if sink, ok := t.vols.(growthSink); ok && name != "" {
		sink.NoteGrowthNeeds(name, growthNeeds(disks))
	}
	if t.thresholdsDisabled() {
		return
	}
	for _, d := range disks {
		if target != "" && d.target != target {
			continue
		}
		size := deviceSize(d.volume)
		threshold := ThresholdFor(size, d.chunk)
		if err := dom.SetBlockThreshold(d.target, uint64(threshold), 0); err != nil {
			t.log.Warn("thin provisioning: setting the block threshold failed", "domain", name, "disk", d.target, "volume", d.volume.ID, "threshold", threshold, "err", err)
			continue
		}
		t.log.Debug("block threshold set", "domain", name, "disk", d.target, "volume", d.volume.ID, "device_size", size, "threshold", threshold)
	}
}

// deviceSize is the device's size now (the backend's figure if the device
// cannot be asked).
func deviceSize(v backend.VolumeInfo) int64 {
	if info, err := hostblk.Inspect(v.DevicePath); err == nil {
		return info.Size
	}
	return v.DeviceSize
}

// grow grows the volume's device by whole chunks until the threshold it
// gets is past written, and returns the new size; a device whose
// threshold is past written already is left as it is (grown false).
func (t *ThinController) grow(v backend.VolumeInfo, written int64) (size int64, grown bool, err error) {
	settings, err := t.vols.PoolSettings(v.Pool)
	if err != nil {
		return 0, false, err
	}
	chunk := t.chunkFor(v.ID, settings.ChunkSize)
	current := deviceSize(v)
	size = current
	for ThresholdFor(size, chunk) <= written {
		size += chunk
	}
	if size == current {
		return current, false, nil
	}
	g, err := t.vols.GrowVolume(context.Background(), backend.Caller{UID: 0}, v.ID, size)
	if err != nil {
		return 0, false, err
	}
	return g.DeviceSize, true, nil
}

func (t *ThinController) onThreshold(domain, dev, path string, written uint64) {
	v, ok := t.vols.VolumeByDevice(path)
	if !ok {
		return
	}
	if sink, ok := t.vols.(allocationSink); ok {
		sink.NoteAllocation(v.ID, int64(written)) // qemu wrote that far
	}
	t.observe(v.ID, int64(written), time.Now())
	// libvirt reports one crossing of a disk's top image twice, as "vda"
	// and "vda[1]": the second finds the device grown past the write
	// already and must not grow it by another chunk.
	began := time.Now()
	size, grown, err := t.grow(v, int64(written))
	took := time.Since(began)
	if err != nil {
		// qemu will hit the end: the ENOSPC pause retries the growth.
		t.log.Error("thin provisioning: growing a volume failed", "domain", domain, "disk", dev, "volume", v.ID, "err", err)
		t.vols.SignalPolicyViolation("volume "+v.Pool+"/"+v.Name, "grow-failed", err.Error())
		return
	}
	if grown {
		// took is from the event to the new size being visible to qemu
		// (its host_device node reads the size on every length query).
		t.log.Info("volume grown at its block threshold", "domain", domain, "disk", dev, "volume", v.ID, "written", written, "device_size", size, "grow_ms", float64(took.Microseconds())/1000)
	} else {
		t.log.Debug("block threshold crossed; the volume has grown past it already", "domain", domain, "disk", dev, "volume", v.ID, "written", written, "device_size", size)
	}
	// The event names the disk ("vda") or an image of its chain
	// ("vda[1]"); the threshold goes back on the disk.
	target, _, _ := strings.Cut(dev, "[")
	t.withDomain(domain, func(conn *libvirt.Connect, dom *libvirt.Domain) { t.arm(conn, dom, target) })
}

// onENOSPC grows a volume a paused domain ran out of, then resumes the
// domain (qemu retries the failed request).
func (t *ThinController) onENOSPC(domain, path string) {
	v, ok := t.vols.VolumeByDevice(path)
	if !ok {
		return
	}
	t.withDomain(domain, func(conn *libvirt.Connect, dom *libvirt.Domain) {
		state, reason, err := dom.GetState()
		if err != nil {
			t.log.Warn("thin provisioning: domain state", "domain", domain, "err", err)
			return
		}
		if state != libvirt.DOMAIN_PAUSED || libvirt.DomainPausedReason(reason) != libvirt.DOMAIN_PAUSED_IOERROR {
			return // resumed already (one pause sends an event per failed request)
		}
		// Every byte of the device may be written: one chunk more at least.
		size, _, err := t.grow(v, deviceSize(v))
		if err != nil {
			t.log.Error("thin provisioning: domain paused out of space, and growing its volume failed", "domain", domain, "volume", v.ID, "err", err)
			t.vols.SignalPolicyViolation("volume "+v.Pool+"/"+v.Name, "grow-failed", err.Error())
			return
		}
		if err := dom.Resume(); err != nil {
			t.log.Error("thin provisioning: resuming a domain after growing its volume failed", "domain", domain, "err", err)
			return
		}
		t.log.Info("domain resumed after its volume grew", "domain", domain, "volume", v.ID, "device_size", size)
		t.arm(conn, dom, "")
	})
}
