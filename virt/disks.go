package virt

import (
	"bytes"
	"context"
	"encoding/xml"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"
	"libvirt.org/go/libvirt"

	"github.com/volagent/volagent/backend"
)

// Volumes is what the libvirt integration needs of the backend;
// *backend.Manager implements it.
type Volumes interface {
	PoolSettings(name string) (backend.PoolConfig, error)
	Volume(id string) (backend.VolumeInfo, error)
	VolumeByDevice(path string) (backend.VolumeInfo, bool)
	CreateOverlay(ctx context.Context, c backend.Caller, req backend.OverlayRequest) (backend.VolumeInfo, error)
	Delete(ctx context.Context, c backend.Caller, id string) error
	GrowVolume(ctx context.Context, c backend.Caller, id string, newDeviceSize int64) (backend.VolumeInfo, error)
	SignalPolicyViolation(subject, code, message string)
}

// domainDisk is one <disk> of a domain, as much as the integration needs.
type domainDisk struct {
	Type   string // file, block, volume, network, ...
	Format string // <driver type>
	Target string // e.g. "vda"
	Path   string // file or dev source
	Pool   string // volume source
	Volume string
}

type disksXML struct {
	Name  string `xml:"name"`
	Disks []struct {
		Type   string `xml:"type,attr"`
		Driver struct {
			Type string `xml:"type,attr"`
		} `xml:"driver"`
		Source struct {
			File   string `xml:"file,attr"`
			Dev    string `xml:"dev,attr"`
			Pool   string `xml:"pool,attr"`
			Volume string `xml:"volume,attr"`
		} `xml:"source"`
		Target struct {
			Dev string `xml:"dev,attr"`
		} `xml:"target"`
	} `xml:"devices>disk"`
}

// parseDisks reads the disks of a domain XML libvirt gave us.
func parseDisks(domainXML string) (name string, disks []domainDisk, err error) {
	var d disksXML
	if err := xml.NewDecoder(bytes.NewReader([]byte(domainXML))).Decode(&d); err != nil {
		return "", nil, fmt.Errorf("domain XML: %w", err)
	}
	for _, x := range d.Disks {
		path := x.Source.File
		if path == "" {
			path = x.Source.Dev
		}
		disks = append(disks, domainDisk{Type: x.Type, Format: x.Driver.Type, Target: x.Target.Dev, Path: path, Pool: x.Source.Pool, Volume: x.Source.Volume})
	}
	return d.Name, disks, nil
}

// diskPath is the local path of a disk, resolving a <disk type='volume'>
// through its storage pool; "" when it has none.
func diskPath(conn *libvirt.Connect, d domainDisk) string {
	if d.Path != "" || d.Pool == "" || d.Volume == "" {
		return d.Path
	}
	pool, err := conn.LookupStoragePoolByName(d.Pool)
	if err != nil {
		return ""
	}
	defer pool.Free()
	vol, err := pool.LookupStorageVolByName(d.Volume)
	if err != nil {
		return ""
	}
	defer vol.Free()
	path, err := vol.GetPath()
	if err != nil {
		return ""
	}
	return path
}

// sameDevice reports whether a disk path and a volume's device are one
// block device (the same device number, whatever the names: /dev/loopN,
// /dev/VG/LV, /dev/mapper/VG-LV, /dev/dm-N, links, other nodes) or one
// file (the same inode).
func sameDevice(path, device string) bool {
	if path == "" || device == "" {
		return false
	}
	var a, b unix.Stat_t
	if unix.Stat(path, &a) != nil || unix.Stat(device, &b) != nil {
		return samePath(path, device)
	}
	if a.Mode&unix.S_IFMT == unix.S_IFBLK && b.Mode&unix.S_IFMT == unix.S_IFBLK {
		return a.Rdev == b.Rdev
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

// samePath reports whether a disk path names the file or device target,
// directly or through symlinks.
func samePath(path, target string) bool {
	if path == "" || target == "" {
		return false
	}
	if filepath.Clean(path) == filepath.Clean(target) {
		return true
	}
	real, err := filepath.EvalSymlinks(path)
	return err == nil && real == filepath.Clean(target)
}
