package virt

import (
	"context"
	"fmt"

	"libvirt.org/go/libvirt"

	"github.com/volagent/volagent/backend"
)

// Domains is backend.Domains over a Conn: the Manager's view of libvirt's
// domains (for Delete, Resize and Write of volumes they use) and storage
// volumes (for CheckDomain of <disk type='volume'>).
type Domains struct{ c *Conn }

// NewDomains makes the backend's view of libvirt over c.
func NewDomains(c *Conn) *Domains { return &Domains{c: c} }

var _ backend.Domains = (*Domains)(nil)

// stateNames are libvirt's domain states as virsh domstate names them.
var stateNames = map[libvirt.DomainState]string{
	libvirt.DOMAIN_NOSTATE:     "no state",
	libvirt.DOMAIN_RUNNING:     "running",
	libvirt.DOMAIN_BLOCKED:     "idle",
	libvirt.DOMAIN_PAUSED:      "paused",
	libvirt.DOMAIN_SHUTDOWN:    "in shutdown",
	libvirt.DOMAIN_SHUTOFF:     "shut off",
	libvirt.DOMAIN_CRASHED:     "crashed",
	libvirt.DOMAIN_PMSUSPENDED: "pmsuspended",
}

// ListDomains lists every domain with its state and XML (live for an
// active domain, the definition for an inactive one).
func (d *Domains) ListDomains(ctx context.Context) ([]backend.DomainState, error) {
	var out []backend.DomainState
	err := d.c.Do(func(conn *libvirt.Connect) error {
		doms, err := conn.ListAllDomains(0)
		if err != nil {
			return fmt.Errorf("listing domains: %w", err)
		}
		defer func() {
			for i := range doms {
				doms[i].Free()
			}
		}()
		for i := range doms {
			name, err := doms[i].GetName()
			if err != nil {
				return err
			}
			state, _, err := doms[i].GetState()
			if err != nil {
				return fmt.Errorf("domain %q: state: %w", name, err)
			}
			xml, err := doms[i].GetXMLDesc(0)
			if err != nil {
				return fmt.Errorf("domain %q: XML: %w", name, err)
			}
			active, err := doms[i].IsActive()
			if err != nil {
				return fmt.Errorf("domain %q: %w", name, err)
			}
			s, ok := stateNames[state]
			if !ok {
				s = fmt.Sprintf("state %d", state)
			}
			out = append(out, backend.DomainState{Name: name, State: s, Active: active, XML: []byte(xml)})
		}
		return nil
	})
	return out, err
}

// ResolveVolume is a storage volume's path.
func (d *Domains) ResolveVolume(ctx context.Context, pool, volume string) (string, error) {
	var path string
	err := d.c.Do(func(conn *libvirt.Connect) error {
		var err error
		path, err = volumePath(conn, pool, volume)
		return err
	})
	return path, err
}

// DiskAllocation is virDomainGetBlockInfo's allocation of a disk.
func (d *Domains) DiskAllocation(ctx context.Context, domain, disk string) (int64, error) {
	var alloc int64
	err := d.withDomain(domain, func(dom *libvirt.Domain) error {
		info, err := dom.GetBlockInfo(disk, 0)
		if err != nil {
			return fmt.Errorf("domain %q disk %s: block info: %w", domain, disk, err)
		}
		alloc = int64(info.Allocation)
		return nil
	})
	return alloc, err
}

// BlockResize is virDomainBlockResize, in bytes.
func (d *Domains) BlockResize(ctx context.Context, domain, disk string, size int64) error {
	return d.withDomain(domain, func(dom *libvirt.Domain) error {
		if err := dom.BlockResize(disk, uint64(size), libvirt.DOMAIN_BLOCK_RESIZE_BYTES); err != nil {
			return fmt.Errorf("domain %q disk %s: block resize to %d bytes: %w", domain, disk, size, err)
		}
		return nil
	})
}

func (d *Domains) withDomain(name string, fn func(*libvirt.Domain) error) error {
	return d.c.Do(func(conn *libvirt.Connect) error {
		dom, err := conn.LookupDomainByName(name)
		if err != nil {
			return fmt.Errorf("domain %q: %w", name, err)
		}
		defer dom.Free()
		return fn(dom)
	})
}
