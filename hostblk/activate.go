package hostblk

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
)

// ActivationMode is how a pool's LVs become block devices. It is always
// configured explicitly: guessing from the kernel would silently change
// device paths if device-mapper appeared or disappeared.
type ActivationMode string

const (
	// ActivationDeviceMapper is LVM's own activation: lvchange -ay, the LV
	// is /dev/VG/LV.
	ActivationDeviceMapper ActivationMode = "device-mapper"
	// ActivationLoop maps a linear LV with a loop device over its physical
	// volume, for kernels without device-mapper. LVs must be created with
	// CreateOptions.Contiguous.
	ActivationLoop ActivationMode = "loop"
)

// ParseActivationMode parses a configuration value; the empty string is an
// error, not a default.
func ParseActivationMode(s string) (ActivationMode, error) {
	switch m := ActivationMode(s); m {
	case ActivationDeviceMapper, ActivationLoop:
		return m, nil
	}
	return "", fmt.Errorf("activation mode %q: want %q or %q", s, ActivationDeviceMapper, ActivationLoop)
}

// ErrNotActive means an LV has no block device: it is not activated.
var ErrNotActive = errors.New("logical volume is not active")

// ErrNotLoopMappable means loop activation cannot map the LV: it is not one
// linear, contiguous run of extents on one physical volume.
var ErrNotLoopMappable = errors.New("logical volume cannot be activated by loop")

// Activator makes LVs usable as block devices. All methods are safe for
// concurrent use.
type Activator interface {
	// Mode is the activation this Activator implements.
	Mode() ActivationMode
	// Activate makes LV vg/lv a block device and returns its path.
	// Activating an active LV returns its existing device.
	Activate(ctx context.Context, vg, lv string) (string, error)
	// ActivateAll is Activate for the LVs lvs of vg (rows of
	// LVM.LogicalVolumes), with a fixed number of lvm commands however
	// many LVs there are: a pool of a thousand volumes starts in a second,
	// not in the minutes a command per LV takes. It returns one result
	// per LV name.
	ActivateAll(ctx context.Context, vg string, lvs []LV) map[string]Activation
	// DevicePath returns the block device of an active LV, or ErrNotActive.
	// It works across restarts of the process: it looks at the system, not
	// at memory.
	DevicePath(ctx context.Context, vg, lv string) (string, error)
	// Refresh makes an active LV's device show the LV's current size, after
	// LVM.ExtendLV. An inactive LV is left alone.
	Refresh(ctx context.Context, vg, lv string) error
	// Deactivate removes the LV's block device. An inactive LV is not an
	// error.
	Deactivate(ctx context.Context, vg, lv string) error
}

// Activation is one LV's outcome of Activator.ActivateAll: its block
// device, or why it has none.
type Activation struct {
	Path string
	Err  error
}

// NewActivator returns the Activator for mode. It checks that lvm is set up
// to match: loop activation needs lvm.NoDeviceMapper (so LVM never tries to
// talk to device-mapper), device-mapper activation needs it unset.
func NewActivator(mode ActivationMode, lvm *LVM) (Activator, error) {
	if lvm == nil {
		return nil, fmt.Errorf("new activator %q: LVM is nil", mode)
	}
	switch mode {
	case ActivationDeviceMapper:
		if lvm.NoDeviceMapper {
			return nil, fmt.Errorf("device-mapper activation with LVM.NoDeviceMapper set: lvm would not activate anything")
		}
		return &dmActivator{lvm: lvm}, nil
	case ActivationLoop:
		if !lvm.NoDeviceMapper {
			return nil, fmt.Errorf("loop activation needs LVM.NoDeviceMapper set, so lvm runs with --driverloaded n")
		}
		return &loopActivator{lvm: lvm}, nil
	}
	_, err := ParseActivationMode(string(mode))
	return nil, err
}

// dmActivator is LVM's own device-mapper activation.
type dmActivator struct{ lvm *LVM }

func (a *dmActivator) Mode() ActivationMode { return ActivationDeviceMapper }

func (a *dmActivator) Activate(ctx context.Context, vg, lv string) (string, error) {
	if err := validateNames(vg, lv); err != nil {
		return "", err
	}
	if err := a.lvm.runVG(ctx, vg, "lvchange", "--activate", "y", "--", vg+"/"+lv); err != nil {
		return "", err
	}
	return dmPath(vg, lv), nil
}

// ActivateAll passes the LVs the listing shows inactive to one lvchange.
// Should it fail, each is activated alone, so that every LV gets its own
// error and one bad LV does not keep the others down.
func (a *dmActivator) ActivateAll(ctx context.Context, vg string, lvs []LV) map[string]Activation {
	res := make(map[string]Activation, len(lvs))
	var inactive []string
	for _, lv := range lvs {
		if err := validateNames(vg, lv.Name); err != nil {
			res[lv.Name] = Activation{Err: err}
			continue
		}
		switch {
		case lvActive(lv.Attr):
			res[lv.Name] = Activation{Path: dmPath(vg, lv.Name)}
		default:
			inactive = append(inactive, lv.Name)
		}
	}
	if len(inactive) == 0 {
		return res
	}
	args := []string{"--activate", "y", "--"}
	for _, name := range inactive {
		args = append(args, vg+"/"+name)
	}
	if err := a.lvm.runVG(ctx, vg, "lvchange", args...); err == nil {
		for _, name := range inactive {
			res[name] = Activation{Path: dmPath(vg, name)}
		}
		return res
	}
	for _, name := range inactive {
		path, err := a.Activate(ctx, vg, name)
		res[name] = Activation{Path: path, Err: err}
	}
	return res
}

// lvActive tells from lv_attr whether an LV is active: its fifth
// character is the state, 'a' for active.
func lvActive(attr string) bool { return len(attr) >= 5 && attr[4] == 'a' }

func (a *dmActivator) DevicePath(ctx context.Context, vg, lv string) (string, error) {
	info, err := a.lvm.LogicalVolume(ctx, vg, lv)
	if err != nil {
		return "", err
	}
	if !lvActive(info.Attr) {
		return "", fmt.Errorf("%s/%s (lv_attr %q): %w", vg, lv, info.Attr, ErrNotActive)
	}
	return dmPath(vg, lv), nil
}

func (a *dmActivator) Refresh(ctx context.Context, vg, lv string) error {
	if err := validateNames(vg, lv); err != nil {
		return err
	}
	// lvextend already resizes an active LV; --refresh reloads the table
	// in case that was interrupted.
	return a.lvm.runVG(ctx, vg, "lvchange", "--refresh", "--", vg+"/"+lv)
}

func (a *dmActivator) Deactivate(ctx context.Context, vg, lv string) error {
	if err := validateNames(vg, lv); err != nil {
		return err
	}
	return a.lvm.runVG(ctx, vg, "lvchange", "--activate", "n", "--", vg+"/"+lv)
}

func dmPath(vg, lv string) string { return "/dev/" + vg + "/" + lv }

// LVPath is the device of LV vg/lv under device-mapper activation,
// /dev/VG/LV, whether or not it is active now.
func LVPath(vg, lv string) string { return dmPath(vg, lv) }

// loopActivator activates an LV as a loop device over its physical volume,
// starting at the LV's first extent and limited to its size. It keeps no
// state: the loop device of an LV is the one whose backing file is the PV
// and whose offset is the LV's offset, which sysfs shows after a restart.
type loopActivator struct {
	lvm *LVM
	// mu serialises activations so two callers cannot attach two loop
	// devices for the same LV.
	mu sync.Mutex
	// mapped remembers where each LV this activator found or activated
	// starts (vg/lv -> mapping): an extension of a contiguous LV keeps its
	// start, so RefreshSize needs no lvm command.
	mapped map[string]LoopMapping
}

// SizeRefresher is an Activator that can make an LV's device show a size
// the caller knows (the LV that LVM.ExtendLV returned) without asking
// LVM again: one lvm command less on the growth path of a running guest.
type SizeRefresher interface {
	RefreshSize(ctx context.Context, vg, lv string, size uint64) error
}

func (a *loopActivator) remember(vg, lv string, m LoopMapping) {
	if a.mapped == nil {
		a.mapped = map[string]LoopMapping{}
	}
	a.mapped[vg+"/"+lv] = m
}

// RefreshSize is Refresh for an LV of size bytes. Without a remembered
// mapping it is Refresh.
func (a *loopActivator) RefreshSize(ctx context.Context, vg, lv string, size uint64) error {
	a.mu.Lock()
	m, ok := a.mapped[vg+"/"+lv]
	a.mu.Unlock()
	if !ok {
		return a.Refresh(ctx, vg, lv)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	l, found, err := findLoop(m)
	if err != nil || !found {
		return err
	}
	if err := SetLoopSizeLimit(l.Path, size); err != nil {
		return fmt.Errorf("refresh %s/%s: %w", vg, lv, err)
	}
	m.Size = size
	a.remember(vg, lv, m)
	return nil
}

func (a *loopActivator) Mode() ActivationMode { return ActivationLoop }

// LoopMapping is where an LV's bytes are on its physical volume.
type LoopMapping struct {
	PV     string
	Offset uint64 // bytes from the start of the PV device
	Size   uint64 // bytes
}

// LoopMappingOf computes where LV vg/lv lies on its physical volume. It
// fails with ErrNotLoopMappable unless the LV is linear and its extents
// are one contiguous run on one PV (adjacent segments are merged).
func LoopMappingOf(ctx context.Context, lvm *LVM, vg, lv string) (LoopMapping, error) {
	segs, err := lvm.Segments(ctx, vg, lv)
	if err != nil {
		return LoopMapping{}, err
	}
	layout, err := readVGLayout(ctx, lvm, vg)
	if err != nil {
		return LoopMapping{}, err
	}
	return layout.mapping(vg, lv, segs)
}

// vgLayout is what mapping an LV needs of its volume group besides the
// LV's segments: the extent size and where each PV's extents start.
type vgLayout struct {
	extentSize uint64
	pvs        []PV
}

func readVGLayout(ctx context.Context, lvm *LVM, vg string) (vgLayout, error) {
	info, err := lvm.VolumeGroup(ctx, vg)
	if err != nil {
		return vgLayout{}, err
	}
	pvs, err := lvm.PhysicalVolumes(ctx, vg)
	if err != nil {
		return vgLayout{}, err
	}
	return vgLayout{extentSize: info.ExtentSize, pvs: pvs}, nil
}

// mapping is LoopMappingOf for an LV whose segments are segs.
func (g vgLayout) mapping(vg, lv string, segs []Segment) (LoopMapping, error) {
	if len(segs) == 0 {
		return LoopMapping{}, fmt.Errorf("%s/%s has no segments: %w", vg, lv, ErrNotLoopMappable)
	}
	segs = slices.Clone(segs)
	sort.Slice(segs, func(i, j int) bool { return segs[i].LVStartExtent < segs[j].LVStartExtent })
	var first, last PERange
	var extents uint64
	for i, seg := range segs {
		if seg.Type != "linear" || len(seg.Ranges) != 1 {
			return LoopMapping{}, fmt.Errorf("%s/%s segment %d: type %q over %d ranges, need one linear range: %w",
				vg, lv, i, seg.Type, len(seg.Ranges), ErrNotLoopMappable)
		}
		r := seg.Ranges[0]
		if r.End-r.Start+1 != seg.Extents {
			return LoopMapping{}, fmt.Errorf("%s/%s segment %d: %d extents but range %s:%d-%d: %w",
				vg, lv, i, seg.Extents, r.PV, r.Start, r.End, ErrNotLoopMappable)
		}
		if i == 0 {
			first = r
		} else if r.PV != last.PV || r.Start != last.End+1 {
			return LoopMapping{}, fmt.Errorf("%s/%s has %d segments and segment %d (%s:%d-%d) does not follow %s:%d-%d; "+
				"create LVs for loop activation with CreateOptions.Contiguous: %w",
				vg, lv, len(segs), i, r.PV, r.Start, r.End, last.PV, last.Start, last.End, ErrNotLoopMappable)
		}
		last = r
		extents += seg.Extents
	}
	for _, pv := range g.pvs {
		if pv.Name == first.PV {
			return LoopMapping{
				PV:     pv.Name,
				Offset: pv.PEStart + first.Start*g.extentSize,
				Size:   extents * g.extentSize,
			}, nil
		}
	}
	return LoopMapping{}, fmt.Errorf("%s/%s: physical volume %s not found in volume group %s", vg, lv, first.PV, vg)
}

// findLoop returns the loop device mapping m, if any.
func findLoop(m LoopMapping) (LoopDevice, bool, error) {
	loops, err := FindLoops(m.PV)
	if err != nil {
		return LoopDevice{}, false, err
	}
	for _, l := range loops {
		if l.Offset == m.Offset {
			return l, true, nil
		}
	}
	return LoopDevice{}, false, nil
}

func (a *loopActivator) Activate(ctx context.Context, vg, lv string) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	path, err := a.activate(ctx, vg, lv)
	if err != nil {
		return "", fmt.Errorf("activate %s/%s by loop: %w", vg, lv, err)
	}
	return path, nil
}

func (a *loopActivator) activate(ctx context.Context, vg, lv string) (string, error) {
	m, err := LoopMappingOf(ctx, a.lvm, vg, lv)
	if err != nil {
		return "", err
	}
	path, err := a.existing(vg, lv, m)
	if err != nil || path != "" {
		return path, err
	}
	pv, err := Inspect(m.PV)
	if err != nil {
		return "", err
	}
	return attachLV(m, pv.LogicalBlockSize)
}

// ActivateAll maps every LV from three lvm commands (the VG's segments,
// the VG, its PVs) and attaches the loop devices that are missing several
// at a time.
func (a *loopActivator) ActivateAll(ctx context.Context, vg string, lvs []LV) map[string]Activation {
	a.mu.Lock()
	defer a.mu.Unlock()
	res := make(map[string]Activation, len(lvs))
	fail := func(lv string, err error) {
		res[lv] = Activation{Err: fmt.Errorf("activate %s/%s by loop: %w", vg, lv, err)}
	}
	segs, err := a.lvm.SegmentsOfVG(ctx, vg)
	var layout vgLayout
	if err == nil {
		layout, err = readVGLayout(ctx, a.lvm, vg)
	}
	if err != nil {
		for _, lv := range lvs {
			fail(lv.Name, err)
		}
		return res
	}
	type attach struct {
		name       string
		m          LoopMapping
		sectorSize int
	}
	var todo []attach
	sectorSizes := map[string]int{} // by PV: one look at each
	for _, lv := range lvs {
		m, err := layout.mapping(vg, lv.Name, segs[lv.Name])
		var path string
		if err == nil {
			path, err = a.existing(vg, lv.Name, m)
		}
		if err == nil && path == "" {
			if _, ok := sectorSizes[m.PV]; !ok {
				var pv DeviceInfo
				pv, err = Inspect(m.PV)
				sectorSizes[m.PV] = pv.LogicalBlockSize
			}
		}
		switch {
		case err != nil:
			fail(lv.Name, err)
		case path != "":
			res[lv.Name] = Activation{Path: path}
		default:
			todo = append(todo, attach{lv.Name, m, sectorSizes[m.PV]})
		}
	}
	paths := make([]string, len(todo))
	errs := make([]error, len(todo))
	inParallel(len(todo), func(i int) {
		paths[i], errs[i] = attachLV(todo[i].m, todo[i].sectorSize)
	})
	for i, t := range todo {
		if errs[i] != nil {
			fail(t.name, errs[i])
		} else {
			res[t.name] = Activation{Path: paths[i]}
		}
	}
	return res
}

// existing remembers mapping m of LV vg/lv and returns the loop device
// already mapping it, "" if there is none. Called with a.mu held.
func (a *loopActivator) existing(vg, lv string, m LoopMapping) (string, error) {
	a.remember(vg, lv, m)
	l, ok, err := findLoop(m)
	if err != nil || !ok {
		return "", err
	}
	if l.SizeLimit != m.Size {
		// The LV was extended while it was not refreshed (e.g. the
		// daemon crashed between lvextend and Refresh).
		if err := SetLoopSizeLimit(l.Path, m.Size); err != nil {
			return "", err
		}
	}
	return l.Path, nil
}

// attachLV attaches a loop device for mapping m with the PV's logical
// block size, which the LV keeps, as under device-mapper.
func attachLV(m LoopMapping, sectorSize int) (string, error) {
	l, err := AttachLoop(m.PV, LoopOptions{
		Offset:     m.Offset,
		SizeLimit:  m.Size,
		SectorSize: uint32(sectorSize),
	})
	if err != nil {
		return "", err
	}
	return l.Path, nil
}

func (a *loopActivator) DevicePath(ctx context.Context, vg, lv string) (string, error) {
	m, err := LoopMappingOf(ctx, a.lvm, vg, lv)
	if err != nil {
		return "", err
	}
	l, ok, err := findLoop(m)
	if err != nil {
		return "", err
	}
	if !ok {
		return "", fmt.Errorf("%s/%s (no loop device on %s at offset %d): %w", vg, lv, m.PV, m.Offset, ErrNotActive)
	}
	return l.Path, nil
}

func (a *loopActivator) Refresh(ctx context.Context, vg, lv string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	m, err := LoopMappingOf(ctx, a.lvm, vg, lv)
	if err != nil {
		return fmt.Errorf("refresh %s/%s: %w", vg, lv, err)
	}
	a.remember(vg, lv, m)
	l, ok, err := findLoop(m)
	if err != nil || !ok {
		return err
	}
	if err := SetLoopSizeLimit(l.Path, m.Size); err != nil {
		return fmt.Errorf("refresh %s/%s: %w", vg, lv, err)
	}
	return nil
}

func (a *loopActivator) Deactivate(ctx context.Context, vg, lv string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	m, err := LoopMappingOf(ctx, a.lvm, vg, lv)
	if err != nil {
		return fmt.Errorf("deactivate %s/%s: %w", vg, lv, err)
	}
	delete(a.mapped, vg+"/"+lv)
	l, ok, err := findLoop(m)
	if err != nil || !ok {
		return err
	}
	return DetachLoop(l.Path)
}
