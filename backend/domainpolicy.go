package backend

// The no-probing policy for libvirt domains. CheckDomain is pure logic over
// a domain's XML and the images its disks name: the qemu hook runs it (in
// the daemon, or locally when told to) before a domain starts, and the
// libvirt integration runs it on running domains whose disks change.

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/qcow2"
)

// Violation and warning codes of a DomainReport besides the
// qcow2.FieldError codes ("data-file", "backing-format-missing", ...).
const (
	CodeDriverTypeMissing     = "driver-type-missing"     // a disk without <driver type>: libvirt would probe
	CodeDriverTypeUnsupported = "driver-type-unsupported" // a format volagent cannot walk
	CodeBackingStoreMismatch  = "backing-store-mismatch"  // the XML's <backingStore> disagrees with the headers
	CodeBackingStoreFormat    = "backing-store-format-missing"
	CodeSourceUnreadable      = "source-unreadable" // the disk's image cannot be opened or read
	CodeHeaderInRaw           = "header-in-raw"     // a raw image starts with an image header
	CodeNotChecked            = "not-checked"       // a disk kind the policy cannot follow (a warning)
	CodeChain                 = "chain"             // the chain loops or is too deep (as qcow2.ErrChain)
	// CodeVolumeUnresolved: a <disk type='volume'> whose pool and volume
	// the daemon could not turn into a path through libvirt.
	CodeVolumeUnresolved = "volume-unresolved"
	// CodeNetworkChain: a qcow2 network disk whose <backingStore> chain is
	// not complete and explicit (volagent cannot read its headers).
	CodeNetworkChain = "network-chain-incomplete"
)

// maxDomainXML bounds the domain XML CheckDomain accepts; real ones are a
// few KiB.
const maxDomainXML = 16 << 20

// DomainPolicyOptions are what CheckDomain judges backing files against.
type DomainPolicyOptions struct {
	// AllowedRoots are the directories backing files may lie under.
	AllowedRoots []string
	// ManagedDevices are the device paths (and loop-pool files) of
	// volagent's volumes: allowed as backing files, and marked in the
	// report so the hook knows which domains use volagent.
	ManagedDevices []string
	// AllowHeaderInRaw makes a raw image that starts with an image header
	// a warning instead of a violation. By default it is a violation:
	// libvirt's QEMU driver turns a disk without <driver type> into
	// type='raw' before the hook sees it, so a qcow2 used that way shows
	// up only as a raw disk with a qcow2 header; and any tool that probes
	// would misread such a disk (a guest can write the header itself).
	AllowHeaderInRaw bool
	// ResolveVolume turns a <disk type='volume'> (a libvirt storage pool
	// and volume) into the volume's path. libvirt runs the qemu hook
	// before it translates pool volumes, so the hook's XML has no path;
	// the daemon resolves it through its own libvirt connection. Nil, or
	// an error, makes such a disk a violation: it cannot be checked.
	ResolveVolume func(pool, volume string) (string, error)
}

// DomainReport is CheckDomain's verdict on one domain. The JSON field names
// are stable: the D-Bus method returns this document.
type DomainReport struct {
	Domain     string            `json:"domain"`
	UUID       string            `json:"uuid,omitempty"`
	Disks      []DiskReport      `json:"disks"`
	Violations []DomainViolation `json:"violations"`
	// Warnings are findings that do not refuse the domain: a disk kind
	// not followed, a raw image with a header when that is allowed.
	Warnings []DomainViolation `json:"warnings"`
}

// DiskReport is what was found for one disk.
type DiskReport struct {
	Target  string      `json:"target"` // e.g. "vda"; the source when the XML has no target
	Type    string      `json:"type"`   // the <disk type>: file, block, network, ...
	Source  string      `json:"source,omitempty"`
	Format  string      `json:"format,omitempty"` // the <driver type>, as written
	Managed bool        `json:"managed"`          // a volagent volume
	Chain   []ChainLink `json:"chain"`            // as the headers record it, top first
}

// ChainLink is one image of a disk's chain.
type ChainLink struct {
	Path        string `json:"path"`                   // as qemu names it
	Resolved    string `json:"resolved,omitempty"`     // symlink-free, for backing files
	Format      string `json:"format"`                 // given by the XML (top) or the parent's header
	BackingName string `json:"backing-name,omitempty"` // as recorded in this image
}

// DomainViolation is one finding, tied to a disk and an image.
type DomainViolation struct {
	Disk    string `json:"disk"`
	Image   string `json:"image,omitempty"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Allowed reports whether the domain breaks no rule (warnings aside).
func (r *DomainReport) Allowed() bool { return len(r.Violations) == 0 }

// UsesManagedVolumes reports whether any disk is a volagent volume.
func (r *DomainReport) UsesManagedVolumes() bool {
	for _, d := range r.Disks {
		if d.Managed {
			return true
		}
	}
	return false
}

// domainXML is the part of a libvirt domain definition the policy reads.
type domainXML struct {
	Name  string    `xml:"name"`
	UUID  string    `xml:"uuid"`
	Disks []diskXML `xml:"devices>disk"`
}

type diskXML struct {
	Type   string `xml:"type,attr"`
	Device string `xml:"device,attr"`
	Driver *struct {
		Type string `xml:"type,attr"`
	} `xml:"driver"`
	Source       *sourceXML       `xml:"source"`
	BackingStore *backingStoreXML `xml:"backingStore"`
	Target       *struct {
		Dev string `xml:"dev,attr"`
	} `xml:"target"`
	ReadOnly  *struct{} `xml:"readonly"`
	Shareable *struct{} `xml:"shareable"`
}

type sourceXML struct {
	File     string `xml:"file,attr"`
	Dev      string `xml:"dev,attr"`
	Dir      string `xml:"dir,attr"`
	Protocol string `xml:"protocol,attr"`
	Name     string `xml:"name,attr"`
	Pool     string `xml:"pool,attr"`
	Volume   string `xml:"volume,attr"`
}

// backingStoreXML is one <backingStore> level. An empty element (no type,
// no source) ends the chain explicitly; a missing element leaves the rest
// to libvirt's detection.
type backingStoreXML struct {
	Type   string `xml:"type,attr"`
	Format *struct {
		Type string `xml:"type,attr"`
	} `xml:"format"`
	Source       *sourceXML       `xml:"source"`
	BackingStore *backingStoreXML `xml:"backingStore"`
}

func (b *backingStoreXML) empty() bool { return b.Type == "" && b.Source == nil && b.Format == nil }

// path is the local path a source names ("" for network and volume sources).
func (s *sourceXML) path() string {
	if s == nil {
		return ""
	}
	if s.File != "" {
		return s.File
	}
	return s.Dev
}

// ParseDomainDisks returns the domain's name and the local paths of its
// disks' sources (file and block disks), without opening anything. The
// hook uses it when the daemon cannot be asked.
func ParseDomainDisks(domain []byte) (name string, sources []string, err error) {
	d, err := parseDomain(domain)
	if err != nil {
		return "", nil, err
	}
	for _, disk := range d.Disks {
		if p := disk.Source.path(); p != "" {
			sources = append(sources, p)
		}
	}
	return d.Name, sources, nil
}

// DomainDisk is one <disk> of a domain, as the libvirt integration and
// the daemon's in-use checks need it.
type DomainDisk struct {
	Target string // e.g. "vda"
	Type   string // the <disk type>: file, block, volume, network, ...
	Device string // disk, cdrom, floppy, lun
	Format string // the <driver type>, as written
	Path   string // the file or dev source; "" for volume and network disks
	Pool   string // a volume disk's storage pool and volume
	Volume string
	// Backing are the local paths of the disk's explicit <backingStore>
	// levels, top first (a running domain's live XML lists the chain
	// libvirt opened).
	Backing []string
	// ReadOnly and Shareable are <readonly/> and <shareable/>: how qemu
	// locks the disk's image (a cdrom is read-only whatever the XML says).
	ReadOnly, Shareable bool
}

// DiskLayers is a domain's disk with the local images qemu opens for it,
// top first.
type DiskLayers struct {
	DomainDisk
	Layers []string
}

// DomainDiskLayers parses a domain XML into its disks, each with its
// layers: the chain the policy read for it (rep's, when there is a
// report), else the disk's source and its explicit <backingStore> levels.
// A disk with neither (network disks, unresolved volumes) has none.
func DomainDiskLayers(domainXML []byte, rep *DomainReport) ([]DiskLayers, error) {
	_, disks, err := DomainDisks(domainXML)
	if err != nil {
		return nil, err
	}
	chains := map[string][]string{}
	if rep != nil {
		for _, d := range rep.Disks {
			for _, l := range d.Chain {
				chains[d.Target] = append(chains[d.Target], l.Path)
			}
		}
	}
	out := make([]DiskLayers, 0, len(disks))
	for _, d := range disks {
		layers, ok := chains[d.Target]
		if !ok && d.Path != "" {
			layers = append([]string{d.Path}, d.Backing...)
		}
		out = append(out, DiskLayers{DomainDisk: d, Layers: layers})
	}
	return out, nil
}

// DomainDisks parses a domain XML (with the policy's one parser) into its
// name and disks, without opening anything.
func DomainDisks(domain []byte) (name string, disks []DomainDisk, err error) {
	d, err := parseDomain(domain)
	if err != nil {
		return "", nil, err
	}
	for _, x := range d.Disks {
		dd := DomainDisk{Type: x.Type, Device: x.Device, Path: x.Source.path(),
			ReadOnly: x.ReadOnly != nil || x.Device == "cdrom", Shareable: x.Shareable != nil}
		if x.Target != nil {
			dd.Target = x.Target.Dev
		}
		if x.Driver != nil {
			dd.Format = x.Driver.Type
		}
		if x.Source != nil {
			dd.Pool, dd.Volume = x.Source.Pool, x.Source.Volume
		}
		for bs, n := x.BackingStore, 0; bs != nil && n < qcow2.MaxChainDepth; bs, n = bs.BackingStore, n+1 {
			if p := bs.Source.path(); p != "" {
				dd.Backing = append(dd.Backing, p)
			}
		}
		disks = append(disks, dd)
	}
	return d.Name, disks, nil
}

func parseDomain(domain []byte) (*domainXML, error) {
	if len(domain) > maxDomainXML {
		return nil, fmt.Errorf("%w: domain XML of %d bytes: at most %d are accepted", ErrInvalidArgument, len(domain), maxDomainXML)
	}
	var d domainXML
	dec := xml.NewDecoder(bytes.NewReader(domain))
	if err := dec.Decode(&d); err != nil {
		return nil, fmt.Errorf("%w: domain XML: %w", ErrInvalidArgument, err)
	}
	return &d, nil
}

// CheckDomain judges a libvirt domain definition against the no-probing
// policy. For every disk with a local source (<disk type='file'|'block'>):
//   - the <driver type> is explicit and "raw" or "qcow2";
//   - the image is opened read-only (it is the domain's own disk) and its
//     header judged by qcow2.ReadHeader: every qcow2 in the chain records
//     its backing format, has no external data file, and names no json: or
//     protocol backing;
//   - backing files are opened only through a qcow2.Gate with
//     opts.AllowedRoots and opts.ManagedDevices, each read as the format its
//     parent records (never probed);
//   - an explicit <backingStore> chain matches the headers (path and format);
//   - a raw image that starts with an image header is a violation (a
//     warning with opts.AllowHeaderInRaw).
//
// The error is non-nil only when the XML cannot be parsed (ErrInvalidArgument);
// every verdict, including unreadable images, is in the report.
func CheckDomain(domain []byte, opts DomainPolicyOptions) (*DomainReport, error) {
	d, err := parseDomain(domain)
	if err != nil {
		return nil, err
	}
	rep := &DomainReport{Domain: d.Name, UUID: d.UUID, Disks: []DiskReport{}, Violations: []DomainViolation{}, Warnings: []DomainViolation{}}
	gate := &qcow2.Gate{AllowedRoots: append(append([]string{}, opts.AllowedRoots...), opts.ManagedDevices...)}
	managed := managedSet(opts.ManagedDevices)
	for i, disk := range d.Disks {
		rep.checkDisk(i, disk, gate, managed, opts.AllowHeaderInRaw, opts.ResolveVolume)
	}
	return rep, nil
}

// managedSet maps each managed path, as given and symlink-resolved, so a
// disk naming /dev/vg/lv matches a volume listed as /dev/dm-3 and back.
func managedSet(paths []string) map[string]bool {
	set := map[string]bool{}
	for _, p := range paths {
		if p == "" {
			continue
		}
		set[filepath.Clean(p)] = true
		if real, err := filepath.EvalSymlinks(p); err == nil {
			set[real] = true
		}
	}
	return set
}

func isManaged(set map[string]bool, path string) bool {
	if set[path] {
		return true
	}
	real, err := qcow2.ResolvePath(path) // as the kernel walks it: never cleaned first
	return err == nil && set[real]
}

func (r *DomainReport) violation(disk, image, code, format string, args ...any) {
	r.Violations = append(r.Violations, DomainViolation{Disk: disk, Image: image, Code: code, Message: fmt.Sprintf(format, args...)})
}

func (r *DomainReport) warning(disk, image, code, format string, args ...any) {
	r.Warnings = append(r.Warnings, DomainViolation{Disk: disk, Image: image, Code: code, Message: fmt.Sprintf(format, args...)})
}

func (r *DomainReport) fieldViolations(disk, image string, err error) {
	for _, fe := range qcow2.Violations(err) {
		r.Violations = append(r.Violations, DomainViolation{Disk: disk, Image: image, Code: fe.Code(), Message: fmt.Sprintf("%s: %v", image, fe)})
	}
}

func (r *DomainReport) checkDisk(index int, disk diskXML, gate *qcow2.Gate, managed map[string]bool, allowHeaderInRaw bool, resolve func(pool, volume string) (string, error)) {
	dr := DiskReport{Type: disk.Type, Chain: []ChainLink{}}
	if disk.Target != nil {
		dr.Target = disk.Target.Dev
	}
	if disk.Driver != nil {
		dr.Format = disk.Driver.Type
	}
	src := disk.Source
	dr.Source = src.path()
	if dr.Target == "" {
		dr.Target = dr.Source
	}
	if dr.Target == "" {
		dr.Target = fmt.Sprintf("disk[%d]", index)
	}
	name := dr.Target
	defer func() { r.Disks = append(r.Disks, dr) }()

	if src == nil || (dr.Source == "" && src.Protocol == "" && src.Volume == "" && src.Dir == "") {
		return // an empty drive (a cdrom without media): nothing is opened
	}
	switch dr.Format {
	case "":
		r.violation(name, dr.Source, CodeDriverTypeMissing,
			"disk %s (source %q) has no <driver type>: libvirt would guess its format from the content; give type='raw' or type='qcow2'", name, dr.Source)
		return
	case "raw", "qcow2":
	default:
		r.violation(name, dr.Source, CodeDriverTypeUnsupported,
			"disk %s: <driver type=%q>: volagent checks only raw and qcow2 chains", name, dr.Format)
		return
	}
	switch disk.Type {
	case "file", "block":
	case "volume":
		// libvirt translates pool volumes after the hook ran: the daemon
		// asks libvirt for the path and checks that.
		if resolve == nil {
			r.violation(name, "", CodeVolumeUnresolved,
				"disk %s: <source pool=%q volume=%q>: the storage volume cannot be resolved to a path here (the volagent daemon resolves it through libvirt); it cannot be checked", name, src.Pool, src.Volume)
			return
		}
		path, err := resolve(src.Pool, src.Volume)
		if err != nil || path == "" {
			r.violation(name, "", CodeVolumeUnresolved,
				"disk %s: <source pool=%q volume=%q>: libvirt cannot tell the volume's path (%v); it cannot be checked", name, src.Pool, src.Volume, err)
			return
		}
		dr.Source = path
	case "network":
		r.checkNetworkChain(name, dr.Format, disk.BackingStore)
		return
	default:
		r.warning(name, "", CodeNotChecked, "disk %s: <disk type=%q> has no local image to check", name, disk.Type)
		return
	}
	if dr.Source == "" {
		r.violation(name, "", CodeSourceUnreadable, "disk %s: <disk type=%q> has no source path", name, disk.Type)
		return
	}
	dr.Managed = isManaged(managed, dr.Source)
	chain, complete := r.walkChain(name, dr.Source, dr.Format, gate, allowHeaderInRaw)
	dr.Chain = chain
	if disk.BackingStore != nil {
		r.compareBackingStore(name, chain, complete, disk.BackingStore)
	}
}

// checkNetworkChain judges a network disk, whose images volagent cannot
// read: its format is explicit (checked before), and a qcow2 needs the
// whole chain in the XML, each level with its format, ending in a raw
// image or in a qcow2 followed by an empty <backingStore/>. Without it
// libvirt or qemu would take the backing from the header.
func (r *DomainReport) checkNetworkChain(disk, format string, bs *backingStoreXML) {
	for level := 1; format == "qcow2"; level, bs = level+1, bs.BackingStore {
		if level > qcow2.MaxChainDepth {
			r.violation(disk, "", CodeChain, "disk %s: the <backingStore> chain has more than %d levels", disk, qcow2.MaxChainDepth)
			return
		}
		if bs == nil {
			r.violation(disk, "", CodeNetworkChain,
				"disk %s: a qcow2 network disk needs its whole chain in the XML: level %d has no <backingStore> (give the backing with <format type>, or <backingStore/> for none); volagent cannot read the header over the network", disk, level)
			return
		}
		if bs.empty() {
			return
		}
		format = ""
		if bs.Format != nil {
			format = bs.Format.Type
		}
		switch format {
		case "raw", "qcow2":
		case "":
			r.violation(disk, bs.Source.path(), CodeBackingStoreFormat,
				"disk %s: <backingStore> level %d has no <format type>: libvirt would guess it", disk, level)
			return
		default:
			r.violation(disk, bs.Source.path(), CodeDriverTypeUnsupported,
				"disk %s: <backingStore> level %d has format %q: volagent allows only raw and qcow2", disk, level, format)
			return
		}
	}
}

// walkChain reads the headers of the disk's chain, top first, with
// qcow2's one chain walker (loop and depth limits included). complete says
// the walk reached the bottom image (no refusal stopped it).
func (r *DomainReport) walkChain(disk, path, format string, gate *qcow2.Gate, allowHeaderInRaw bool) (chain []ChainLink, complete bool) {
	err := qcow2.WalkChain(path, format, gate, func(l *qcow2.Layer) error {
		defer l.File.Close() // the domain's own files: only their headers are read
		link := ChainLink{Path: l.Path, Resolved: l.Resolved, Format: l.Format}
		if l.Header != nil {
			link.BackingName = l.Header.BackingFile
		}
		chain = append(chain, link)
		if l.Format == "raw" && !r.judgeRaw(disk, l, allowHeaderInRaw) {
			return errStopWalk
		}
		return nil
	})
	switch {
	case err == nil:
		return chain, true
	case errors.Is(err, errStopWalk):
		return chain, false // already reported
	}
	image := path // the image the error concerns: the last one reached
	if len(chain) > 0 {
		image = chain[len(chain)-1].Path
	}
	switch {
	case len(chain) == 0:
		r.violation(disk, path, CodeSourceUnreadable, "disk %s: %v", disk, err)
	case errors.Is(err, qcow2.ErrChain):
		r.violation(disk, image, CodeChain, "disk %s: %s: %v", disk, image, err)
	case qcow2.IsRefusal(err):
		r.fieldViolations(disk, image, err)
	default:
		r.violation(disk, image, CodeSourceUnreadable, "disk %s: %v", disk, err)
	}
	return chain, false
}

// errStopWalk ends a chain walk whose verdict is already in the report.
var errStopWalk = errors.New("walk stopped")

// judgeRaw reports a raw image that starts with an image header; false
// when the image cannot be read (reported).
func (r *DomainReport) judgeRaw(disk string, l *qcow2.Layer, allowHeaderInRaw bool) bool {
	head := make([]byte, qcow2.DetectSize)
	n, err := l.File.ReadAt(head, 0)
	if err != nil && err != io.EOF {
		r.violation(disk, l.Path, CodeSourceUnreadable, "reading %s: %v", l.Path, err)
		return false
	}
	if found := qcow2.DetectImageHeader(head[:n]); found != "" {
		report := r.violation
		if allowHeaderInRaw {
			report = r.warning
		}
		report(disk, l.Path, CodeHeaderInRaw,
			"%s is used as raw but starts with a %s header: the disk's <driver type> is missing (libvirt then assumes raw) or wrong, or the guest wrote the header; any tool that guesses formats would misread it",
			l.Path, found)
	}
	return true
}

// compareBackingStore checks the XML's explicit chain against the one the
// headers record: each level's path and format must match, an empty
// <backingStore/> must be where the recorded chain ends, and a level
// without <format> would make libvirt probe.
func (r *DomainReport) compareBackingStore(disk string, chain []ChainLink, complete bool, bs *backingStoreXML) {
	for level := 1; bs != nil; level, bs = level+1, bs.BackingStore {
		if bs.empty() {
			if level < len(chain) {
				r.violation(disk, chain[level-1].Path, CodeBackingStoreMismatch,
					"disk %s: the XML says %s has no backing file, but its header records %q (%s)",
					disk, chain[level-1].Path, chain[level].Path, chain[level].Format)
			}
			return
		}
		xmlPath := bs.Source.path()
		var xmlFormat string
		if bs.Format != nil {
			xmlFormat = bs.Format.Type
		}
		if xmlFormat == "" {
			r.violation(disk, xmlPath, CodeBackingStoreFormat,
				"disk %s: <backingStore> level %d (%q) has no <format type>: libvirt would guess it", disk, level, xmlPath)
		}
		if level >= len(chain) {
			if !complete {
				return // the walk stopped earlier; that is already reported
			}
			r.violation(disk, xmlPath, CodeBackingStoreMismatch,
				"disk %s: the XML names backing %q at level %d, but the headers record a chain of %d image(s)", disk, xmlPath, level, len(chain))
			return
		}
		got := chain[level]
		if bs.Type != "file" && bs.Type != "block" || !samePath(xmlPath, got) {
			r.violation(disk, xmlPath, CodeBackingStoreMismatch,
				"disk %s: the XML names backing %q (type %q) at level %d, but %s records %q",
				disk, xmlPath, bs.Type, level, chain[level-1].Path, got.Path)
		}
		if xmlFormat != "" && xmlFormat != got.Format {
			r.violation(disk, xmlPath, CodeBackingStoreMismatch,
				"disk %s: the XML gives backing %q format %q, but %s records format %q",
				disk, xmlPath, xmlFormat, chain[level-1].Path, got.Format)
		}
	}
}

// samePath reports whether the XML's path names the recorded backing:
// equal as written, or the same file once walked as the kernel walks it
// (a lexical clean would equate "l/../x" with "x" through a symlink l).
func samePath(xmlPath string, link ChainLink) bool {
	if xmlPath == "" {
		return false
	}
	if xmlPath == link.Path {
		return true
	}
	real, err := qcow2.ResolvePath(xmlPath)
	return err == nil && link.Resolved != "" && real == link.Resolved
}

// Lines returns one line per violation, for the hook's stderr (libvirt
// shows it in the error of `virsh start`).
func (r *DomainReport) Lines() []string {
	var out []string
	for _, v := range r.Violations {
		out = append(out, fmt.Sprintf("domain %q disk %s: [%s] %s", r.Domain, v.Disk, v.Code, v.Message))
	}
	return out
}

// ConfigManagesPath reports whether path is, by its name alone, a device
// or file of one of cfg's pools, and which: /dev/VG/* and /dev/mapper/VG-*
// for LVM pools, files under the directory of loop pools, and loop devices
// whose backing file is under a loop pool's directory or, for LVM pools
// with loop activation, a block device (an LV mapped by loop). It touches
// only sysfs; the hook uses it when the daemon cannot be asked.
func ConfigManagesPath(cfg *Config, path string) (pool string, ok bool) {
	if cfg == nil || path == "" {
		return "", false
	}
	candidates := []string{filepath.Clean(path)}
	if real, err := filepath.EvalSymlinks(path); err == nil && real != candidates[0] {
		candidates = append(candidates, real)
	}
	loopBacking := ""
	for _, c := range candidates {
		if b := hostblk.LoopBackingFile(c); b != "" {
			loopBacking = b
		}
	}
	for _, pc := range cfg.Pools {
		for _, c := range candidates {
			switch pc.Type {
			case PoolLVM:
				vg := pc.VolumeGroup
				dmPrefix := "/dev/mapper/" + strings.ReplaceAll(vg, "-", "--") + "-"
				if strings.HasPrefix(c, "/dev/"+vg+"/") || (strings.HasPrefix(c, dmPrefix) && !strings.HasPrefix(c[len(dmPrefix):], "-")) {
					return pc.Name, true
				}
			case PoolLoop:
				if strings.HasPrefix(c, pc.Directory+"/") {
					return pc.Name, true
				}
			}
		}
		if loopBacking == "" {
			continue
		}
		switch {
		case pc.Type == PoolLoop && strings.HasPrefix(loopBacking, pc.Directory+"/"):
			return pc.Name, true
		case pc.Type == PoolLVM && pc.Activation == "loop" && isBlockDevice(loopBacking):
			return pc.Name, true
		}
	}
	return "", false
}

func isBlockDevice(path string) bool {
	var st unix.Stat_t
	return unix.Stat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK
}

// DomainPolicyOptions returns the options the Manager's pools imply: every
// pool's backing roots, and every managed volume's device and backing
// path as managed devices.
func (m *Manager) DomainPolicyOptions() DomainPolicyOptions {
	var opts DomainPolicyOptions
	for _, pc := range m.cfg.Pools {
		opts.AllowedRoots = append(opts.AllowedRoots, pc.BackingRoots...)
	}
	m.mu.Lock()
	for _, v := range m.volumes {
		if v.info.DevicePath != "" {
			opts.ManagedDevices = append(opts.ManagedDevices, v.info.DevicePath)
		}
		if v.backingPath != "" && v.backingPath != v.info.DevicePath {
			opts.ManagedDevices = append(opts.ManagedDevices, v.backingPath)
		}
	}
	m.mu.Unlock()
	sort.Strings(opts.ManagedDevices)
	return opts
}

// CheckDomain is the daemon side of the qemu hook (D-Bus
// Manager.CheckDomain) and of the audit of running domains: it judges the
// domain with the Manager's pools, and decides whether it may start. A
// domain with violations is refused when any configured pool enforces the
// policy (or none is configured); when every pool is in audit mode it is
// allowed, and each violation is logged and sent as EventPolicyViolation
// either way. The error wraps ErrInvalidArgument for XML that cannot be
// parsed.
func (m *Manager) CheckDomain(ctx context.Context, domain []byte) (allowed bool, report *DomainReport, err error) {
	if err := ctx.Err(); err != nil {
		return false, nil, fmt.Errorf("%w: %w", ErrCancelled, err)
	}
	opts := m.DomainPolicyOptions()
	if d := m.domainsAPI(); d != nil {
		opts.ResolveVolume = func(pool, volume string) (string, error) { return d.ResolveVolume(ctx, pool, volume) }
	}
	report, err = CheckDomain(domain, opts)
	if err != nil {
		return false, nil, err
	}
	m.SignalDomainViolations(report)
	return report.Allowed() || !m.enforcesDomainPolicy(), report, nil
}

// SignalDomainViolations logs each violation of report and sends it as
// EventPolicyViolation (subject "domain NAME disk TARGET").
func (m *Manager) SignalDomainViolations(report *DomainReport) {
	for _, v := range report.Violations {
		subject := fmt.Sprintf("domain %s disk %s", report.Domain, v.Disk)
		m.log.Warn("domain policy violation", "domain", report.Domain, "disk", v.Disk, "image", v.Image, "code", v.Code, "violation", v.Message)
		m.emit(Event{Kind: EventPolicyViolation, Violation: &Violation{Subject: subject, Code: v.Code, Message: v.Message}})
	}
}

func (m *Manager) enforcesDomainPolicy() bool {
	if len(m.cfg.Pools) == 0 {
		return true
	}
	for _, pc := range m.cfg.Pools {
		if pc.Policy != PolicyAudit {
			return true
		}
	}
	return false
}
