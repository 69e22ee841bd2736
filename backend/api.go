// Package backend is the daemon's logic: pools, volumes, jobs and policy,
// built on qcow2 (the format) and hostblk (the host's block devices). The
// D-Bus adapter and the libvirt integration sit thin over it.
//
// State is never kept in a database of its own: every start (and every
// Rescan) rebuilds it from what is on the devices — LV tags on LVM pools,
// the loop pool's per-file metadata, and the qcow2 headers — so it cannot
// disagree with them. Every mutating operation is ordered so that a crash
// at any moment leaves either a finished volume, or a volume marked as
// in-progress that the next Load removes.
package backend

import (
	"errors"
	"slices"
	"time"

	"github.com/volagent/volagent/qcow2"
)

// Error kinds. Every error a Manager method returns is of one of them
// (Kind), with a message a person can act on, and keeps its cause wrapped
// too: errors.Is matches the kind, the qcow2 violation (qcow2.ErrDataFile,
// ...) and context.Canceled alike. The D-Bus adapter maps the kind one to
// one to org.volagent.VolAgent1.Error.<Name>.
var (
	ErrFailed          = errors.New("failed")
	ErrNotAuthorized   = errors.New("not authorized")
	ErrInvalidArgument = errors.New("invalid argument")
	ErrNotFound        = errors.New("not found")
	ErrBusy            = errors.New("busy")
	ErrNoSpace         = errors.New("no space")
	ErrPolicyViolation = errors.New("policy violation")
	ErrCancelled       = errors.New("cancelled")
)

// kinds lists the error kinds, for Kind.
var kinds = []error{ErrFailed, ErrNotAuthorized, ErrInvalidArgument, ErrNotFound, ErrBusy, ErrNoSpace, ErrPolicyViolation, ErrCancelled}

// Kind returns the error kind err was returned as, or nil if it carries
// none. Errors keep their cause wrapped beside their kind (fmt.Errorf with
// "%w: ...: %w"), and a cause may carry a kind of its own (a Failed whose
// cause was Busy one call down); the kind is the outermost one, found
// first walking the wrap tree depth first in order, as errors.Is walks it.
// Dispatch on Kind, not on errors.Is of one kind, when that matters.
func Kind(err error) error {
	for err != nil {
		for _, k := range kinds {
			if err == k {
				return k
			}
		}
		switch u := err.(type) {
		case interface{ Unwrap() error }:
			err = u.Unwrap()
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				if k := Kind(e); k != nil {
					return k
				}
			}
			return nil
		default:
			return nil
		}
	}
	return nil
}

// ViolationCodes returns the stable codes of the qcow2 violations err
// carries (qcow2.FieldError.Code: "data-file", "backing-name", ...), each
// once, in the order found; nil if it carries none.
func ViolationCodes(err error) []string {
	var codes []string
	for _, v := range qcow2.Violations(err) {
		if c := v.Code(); !slices.Contains(codes, c) {
			codes = append(codes, c)
		}
	}
	return codes
}

// PoolType is how a pool stores its volumes.
type PoolType string

const (
	PoolLVM  PoolType = "lvm"  // logical volumes of one volume group
	PoolLoop PoolType = "loop" // files in a directory, each attached as a loop device
)

// PolicyMode says what happens to an image that breaks the policy.
type PolicyMode string

const (
	PolicyEnforce PolicyMode = "enforce" // refuse it
	PolicyAudit   PolicyMode = "audit"   // allow it, log and signal the violation
)

// Role is what a volume is for.
type Role string

const (
	RoleBase    Role = "base"    // a raw or qcow2 image others are overlays of (made by Import)
	RoleOverlay Role = "overlay" // a qcow2 overlay with an explicit backing (made by CreateOverlay)
)

// PoolInfo describes a pool as clients see it.
type PoolInfo struct {
	Name     string
	Type     PoolType
	Capacity int64 // bytes the pool can hold in all
	Free     int64 // bytes still unallocated
	Policy   PolicyMode
	// SpaceNeeded is what the next growth of the thin volumes running
	// domains use in the pool takes, in bytes: for each, the chunk its
	// device grows by next, at most what it can still grow (poolfill.go).
	SpaceNeeded int64
	// SpaceLow is Free < SpaceNeeded: a guest may pause when its volume
	// cannot grow.
	SpaceLow bool
	// Shared is true for an LVM pool on a volume group shared with other
	// hosts (lvmlockd).
	Shared bool
}

// GrowthNeed is the next growth of one volume a running domain writes:
// the chunk its device grows by at the next block threshold, as the
// libvirt integration sizes it (the pool's chunk, more for a fast guest).
type GrowthNeed struct {
	Volume string // the volume's ID
	Chunk  int64  // bytes
}

// VolumeInfo describes a volume as clients see it.
type VolumeInfo struct {
	ID               string // opaque, stable across restarts, valid in a D-Bus object path
	Name             string
	Pool             string
	DevicePath       string // the block device the volume is used through
	Format           string // "qcow2" or "raw"
	VirtualSize      int64  // bytes the guest sees
	DeviceSize       int64  // bytes of the block device (thin overlays grow it)
	HighestAllocated int64  // end of the image's highest allocated cluster (qcow2)
	BackingName      string // as recorded in the image; "" for none
	BackingFormat    string // as recorded in the image; "" for none
	Role             Role
	// Problem is why the volume cannot be used safely, "" when it can: a
	// qcow2 header volagent refuses, corruption found by a check at load,
	// a backing that is no longer where the header says. Such volumes are
	// listed so an admin can see and delete them, never silently dropped.
	Problem string
	// Origin is OverlayRequest.Origin of the request that made the
	// volume, "" for none.
	Origin string
	// ActiveOn is where a shared pool's volume is active: "" nowhere,
	// ActiveLocal on this host, else the other hosts' names (the [hosts]
	// table, or "host_id N"), comma-separated. Volumes of other pools are
	// always ActiveLocal.
	ActiveOn string
}

// OverlayRequest asks for a new qcow2 overlay. Exactly one of BackingPath
// and BackingVolume is set. The backing format is never guessed: it is
// given, or taken from a volume volagent manages.
type OverlayRequest struct {
	Pool          string
	Name          string
	BackingPath   string // an absolute path under the pool's backing roots
	BackingFormat string // "raw" or "qcow2"; required with BackingPath
	BackingVolume string // the ID of a managed volume to use as backing
	VirtualSize   int64  // 0: the backing's virtual size
	ClusterSize   int    // 0: 64 KiB
	// Origin is recorded with the volume and reported in
	// VolumeInfo.Origin: who asked, in the caller's terms (the request
	// watcher's claim on a request file). At most 64 bytes of
	// [a-zA-Z0-9:._-].
	Origin string
}

// ImportRequest asks for a new base volume filled from Source.
type ImportRequest struct {
	Pool         string
	Name         string
	Source       SourceFile // read through; never probed
	SourceFormat string     // "raw" or "qcow2"
	VirtualSize  int64      // 0: the source's virtual size
}

// SourceFile is what Import reads: a file descriptor passed by a client, or
// a file the admin command opened.
type SourceFile interface {
	ReadAt(p []byte, off int64) (int, error)
	Stat() (size int64, err error)
	Close() error
}

// JobState is where a job is in its life.
type JobState string

const (
	JobRunning   JobState = "running"
	JobSucceeded JobState = "succeeded"
	JobFailed    JobState = "failed"
	JobCancelled JobState = "cancelled"
)

// JobInfo is a snapshot of a long operation.
type JobInfo struct {
	ID         uint64
	Operation  string // "import", "zero-fill"
	Volume     string // the volume's ID
	State      JobState
	Progress   float64 // 0..1
	Bytes      int64   // done so far
	TotalBytes int64
	Rate       float64 // bytes per second, recent
	StartedBy  uint32  // Unix UID of the caller
	StartedAt  time.Time
	Cancelable bool
	Message    string // the error when failed or cancelled
}

// EventKind names what changed.
type EventKind string

const (
	EventVolumeAdded     EventKind = "volume-added"
	EventVolumeRemoved   EventKind = "volume-removed"
	EventVolumeChanged   EventKind = "volume-changed"
	EventPoolChanged     EventKind = "pool-changed"
	EventJobAdded        EventKind = "job-added"
	EventJobProgress     EventKind = "job-progress"
	EventJobCompleted    EventKind = "job-completed"
	EventPolicyViolation EventKind = "policy-violation"
	// EventLeaseLost: a shared pool's lease storage stopped (Lost) or
	// started again to answer on this host.
	EventLeaseLost EventKind = "lease-lost"
)

// Event is sent to subscribers when state changes. Exactly the field that
// matches Kind is set.
type Event struct {
	Kind      EventKind
	Volume    *VolumeInfo
	VolumeID  string // for EventVolumeRemoved
	Pool      *PoolInfo
	Job       *JobInfo
	Violation *Violation
	Lease     *LeaseEvent // for EventLeaseLost
}

// LeaseEvent is a shared pool's lease storage lost or back.
type LeaseEvent struct {
	Pool    string
	Lost    bool
	Message string
}

// Violation is one policy violation found in an image.
type Violation struct {
	Subject string // the image or domain it was found in
	Code    string // qcow2.FieldError.Code(), e.g. "data-file"
	Message string
}

// Caller identifies who asked, for authorization and job ownership.
type Caller struct {
	UID uint32
}
