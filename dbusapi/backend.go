// Package dbusapi exports volagent's backend on D-Bus as
// org.volagent.VolAgent1, in the style of UDisks2: one Manager object with
// org.freedesktop.DBus.ObjectManager, and one object per pool, volume and
// job, with properties that follow the backend's events.
//
// The adapter is thin: it validates what callers send (names, paths,
// options, the call's signature against the introspection XML), checks
// that the caller may do it, calls the Backend, and maps the backend's
// error kinds one to one to org.volagent.VolAgent1.Error.* names.
//
// The introspection XML org.volagent.VolAgent1.xml in this directory is the
// canonical definition of the API: it is embedded, served, and every
// incoming call is checked against it; packaging/dbus holds a byte-identical
// copy for installation (a test keeps them equal).
package dbusapi

import (
	"context"
	"io"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/qcow2"
)

// Backend is what the adapter needs of the daemon's logic; *backend.Manager
// implements it. Tests can substitute a fake.
type Backend interface {
	Pools() []backend.PoolInfo
	Volumes() []backend.VolumeInfo
	Volume(id string) (backend.VolumeInfo, error)
	Jobs() []backend.JobInfo
	Job(id uint64) (backend.JobInfo, error)

	CreateOverlay(ctx context.Context, c backend.Caller, req backend.OverlayRequest) (backend.VolumeInfo, error)
	Import(ctx context.Context, c backend.Caller, req backend.ImportRequest) (backend.JobInfo, error)
	DeleteWith(ctx context.Context, c backend.Caller, id string, opts backend.DeleteOptions) error
	Resize(ctx context.Context, c backend.Caller, id string, virtualSize int64) error
	Write(ctx context.Context, c backend.Caller, id string, offset int64, data []byte) error
	Check(ctx context.Context, id string) (*qcow2.CheckResult, error)
	// Activate and Deactivate change where a shared pool's volume is
	// active (lvmlockd's LV lock).
	Activate(ctx context.Context, c backend.Caller, id string, shared bool) error
	Deactivate(ctx context.Context, c backend.Caller, id string) error
	Inspect(ctx context.Context, r io.ReaderAt, size int64, name, format string) (*qcow2.Report, error)
	Rescan(ctx context.Context) error
	CancelJob(c backend.Caller, id uint64) error
	// CheckDomain judges a libvirt domain's XML against the no-probing
	// policy (the qemu hook's question). It reads the header of every
	// image the XML names, so the adapter lets only root call it.
	CheckDomain(ctx context.Context, domainXML []byte) (allowed bool, report *backend.DomainReport, err error)
	// MigrationRefusal lists the disks on shared pools' volumes, which
	// refuse a live migration (CheckDomain's option operation "migrate").
	MigrationRefusal(domainXML []byte, report *backend.DomainReport) []backend.DomainViolation
	// ActivateForDomain activates here the shared pools' volumes of a
	// domain about to start (CheckDomain's operation "prepare" or
	// "restore"); what another host holds comes back as violations.
	ActivateForDomain(ctx context.Context, domainXML []byte) []backend.DomainViolation

	Subscribe() (<-chan backend.Event, func())
}
