package virt

import (
	"context"
	"fmt"

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

// parseDisks reads the disks of a domain XML libvirt gave us, with the
// backend's one domain XML parser.
func parseDisks(domainXML string) (name string, disks []backend.DomainDisk, err error) {
	return backend.DomainDisks([]byte(domainXML))
}

// diskPath is the local path of a disk, resolving a <disk type='volume'>
// through its storage pool; "" when it has none.
func diskPath(conn *libvirt.Connect, d backend.DomainDisk) string {
	if d.Path != "" || d.Pool == "" || d.Volume == "" {
		return d.Path
	}
	path, _ := volumePath(conn, d.Pool, d.Volume)
	return path
}

// volumePath is a storage volume's path.
func volumePath(conn *libvirt.Connect, pool, volume string) (string, error) {
	p, err := conn.LookupStoragePoolByName(pool)
	if err != nil {
		return "", fmt.Errorf("storage pool %q: %w", pool, err)
	}
	defer p.Free()
	vol, err := p.LookupStorageVolByName(volume)
	if err != nil {
		return "", fmt.Errorf("storage pool %q: volume %q: %w", pool, volume, err)
	}
	defer vol.Free()
	path, err := vol.GetPath()
	if err != nil {
		return "", fmt.Errorf("storage pool %q: volume %q: path: %w", pool, volume, err)
	}
	return path, nil
}
