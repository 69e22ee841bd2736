package dbusapi

// FAKE BACKEND, for the adapter's own tests only. It keeps a little state
// in memory and emits the events a real Manager emits, so that these tests
// exercise the D-Bus side (signatures, authorization, signals, errors,
// file descriptors) fast and deterministically. The real backend is
// exercised end to end by cmd/volagent's tests against `volagentd`.

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/qcow2"
)

type fakeBackend struct {
	mu       sync.Mutex
	pools    []backend.PoolInfo
	volumes  map[string]backend.VolumeInfo
	jobs     map[uint64]*fakeJob
	nextJob  uint64
	mutating int // calls that reached a mutating method
	subs     []chan backend.Event
	failWith error // when set, every mutating method returns it

	// importStep gates each 1 KiB step of an import job, so tests
	// control progress; nil runs freely.
	importStep chan struct{}
}

type fakeJob struct {
	info   backend.JobInfo
	cancel context.CancelFunc
	data   []byte // what the import read from the caller's descriptor
}

func newFakeBackend() *fakeBackend {
	return &fakeBackend{
		pools:   []backend.PoolInfo{{Name: "fast", Type: backend.PoolLoop, Capacity: 1 << 30, Free: 1 << 29, Policy: backend.PolicyEnforce}},
		volumes: map[string]backend.VolumeInfo{},
		jobs:    map[uint64]*fakeJob{},
		nextJob: 1,
	}
}

func (f *fakeBackend) emit(e backend.Event) {
	for _, ch := range f.subs {
		select {
		case ch <- e:
		default:
		}
	}
}

func (f *fakeBackend) Subscribe() (<-chan backend.Event, func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch := make(chan backend.Event, 256)
	f.subs = append(f.subs, ch)
	return ch, func() {}
}

func (f *fakeBackend) Pools() []backend.PoolInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]backend.PoolInfo(nil), f.pools...)
}

func (f *fakeBackend) Volumes() []backend.VolumeInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []backend.VolumeInfo
	for _, v := range f.volumes {
		out = append(out, v)
	}
	return out
}

func (f *fakeBackend) Volume(id string) (backend.VolumeInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.volumes[id]
	if !ok {
		return v, fmt.Errorf("%w: volume %q", backend.ErrNotFound, id)
	}
	return v, nil
}

func (f *fakeBackend) Jobs() []backend.JobInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []backend.JobInfo
	for _, j := range f.jobs {
		out = append(out, j.info)
	}
	return out
}

func (f *fakeBackend) Job(id uint64) (backend.JobInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	j, ok := f.jobs[id]
	if !ok {
		return backend.JobInfo{}, fmt.Errorf("%w: job %d", backend.ErrNotFound, id)
	}
	return j.info, nil
}

// begin counts a mutating call and returns the injected failure, if any.
func (f *fakeBackend) begin() error {
	f.mutating++
	return f.failWith
}

func (f *fakeBackend) poolExists(name string) bool {
	for _, p := range f.pools {
		if p.Name == name {
			return true
		}
	}
	return false
}

func (f *fakeBackend) CreateOverlay(_ context.Context, _ backend.Caller, req backend.OverlayRequest) (backend.VolumeInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(); err != nil {
		return backend.VolumeInfo{}, err
	}
	if !f.poolExists(req.Pool) {
		return backend.VolumeInfo{}, fmt.Errorf("%w: pool %q is not configured", backend.ErrNotFound, req.Pool)
	}
	id := backend.VolumeID(req.Pool, req.Name)
	if _, dup := f.volumes[id]; dup {
		return backend.VolumeInfo{}, fmt.Errorf("%w: volume %q exists in pool %q", backend.ErrBusy, req.Name, req.Pool)
	}
	bname, bformat := req.BackingPath, req.BackingFormat
	if req.BackingVolume != "" {
		b := f.volumes[req.BackingVolume]
		bname, bformat = b.DevicePath, b.Format
	}
	v := backend.VolumeInfo{ID: id, Name: req.Name, Pool: req.Pool, DevicePath: "/dev/fake/" + req.Name,
		Format: "qcow2", VirtualSize: max(req.VirtualSize, 1<<20), DeviceSize: 1 << 20, HighestAllocated: 3 << 16,
		BackingName: bname, BackingFormat: bformat, Role: backend.RoleOverlay}
	f.volumes[id] = v
	f.emit(backend.Event{Kind: backend.EventVolumeAdded, Volume: &v})
	return v, nil
}

func (f *fakeBackend) Import(_ context.Context, c backend.Caller, req backend.ImportRequest) (backend.JobInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(); err != nil {
		return backend.JobInfo{}, err
	}
	if !f.poolExists(req.Pool) {
		return backend.JobInfo{}, fmt.Errorf("%w: pool %q is not configured", backend.ErrNotFound, req.Pool)
	}
	size, err := req.Source.Stat()
	if err != nil {
		return backend.JobInfo{}, fmt.Errorf("%w: %v", backend.ErrFailed, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	j := &fakeJob{cancel: cancel, info: backend.JobInfo{ID: f.nextJob, Operation: "import", Volume: backend.VolumeID(req.Pool, req.Name),
		State: backend.JobRunning, TotalBytes: size, StartedBy: c.UID, StartedAt: time.Now(), Cancelable: true}}
	f.nextJob++
	f.jobs[j.info.ID] = j
	info := j.info
	f.emit(backend.Event{Kind: backend.EventJobAdded, Job: &info})
	go f.runImport(ctx, j, req)
	return info, nil
}

func (f *fakeBackend) runImport(ctx context.Context, j *fakeJob, req backend.ImportRequest) {
	defer req.Source.Close()
	finish := func(state backend.JobState, msg string) {
		f.mu.Lock()
		defer f.mu.Unlock()
		j.info.State, j.info.Message, j.info.Cancelable = state, msg, false
		if state == backend.JobSucceeded {
			v := backend.VolumeInfo{ID: j.info.Volume, Name: req.Name, Pool: req.Pool, DevicePath: "/dev/fake/" + req.Name,
				Format: req.SourceFormat, VirtualSize: j.info.TotalBytes, Role: backend.RoleBase}
			f.volumes[v.ID] = v
			f.emit(backend.Event{Kind: backend.EventVolumeAdded, Volume: &v})
		}
		info := j.info
		f.emit(backend.Event{Kind: backend.EventJobCompleted, Job: &info})
	}
	f.mu.Lock()
	step, total := f.importStep, j.info.TotalBytes
	f.mu.Unlock()
	buf := make([]byte, 1024)
	var off int64
	for off < total {
		if step != nil {
			select {
			case <-step:
			case <-ctx.Done():
			}
		}
		if ctx.Err() != nil {
			finish(backend.JobCancelled, "cancelled by the caller")
			return
		}
		n, err := req.Source.ReadAt(buf, off)
		if n == 0 && err != nil && err != io.EOF {
			finish(backend.JobFailed, err.Error())
			return
		}
		f.mu.Lock()
		j.data = append(j.data, buf[:n]...)
		off += int64(n)
		j.info.Bytes = off
		j.info.Progress = float64(off) / float64(j.info.TotalBytes)
		info := j.info
		f.emit(backend.Event{Kind: backend.EventJobProgress, Job: &info})
		f.mu.Unlock()
		if err == io.EOF {
			break
		}
	}
	finish(backend.JobSucceeded, "")
}

func (f *fakeBackend) DeleteWith(ctx context.Context, c backend.Caller, id string, _ backend.DeleteOptions) error {
	return f.Delete(ctx, c, id)
}

func (f *fakeBackend) Delete(_ context.Context, _ backend.Caller, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(); err != nil {
		return err
	}
	if _, ok := f.volumes[id]; !ok {
		return fmt.Errorf("%w: volume %q", backend.ErrNotFound, id)
	}
	delete(f.volumes, id)
	f.emit(backend.Event{Kind: backend.EventVolumeRemoved, VolumeID: id})
	return nil
}

func (f *fakeBackend) Resize(_ context.Context, _ backend.Caller, id string, size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(); err != nil {
		return err
	}
	v, ok := f.volumes[id]
	if !ok {
		return fmt.Errorf("%w: volume %q", backend.ErrNotFound, id)
	}
	if size < v.VirtualSize {
		return fmt.Errorf("%w: size %d is smaller than the current %d; shrinking is refused", backend.ErrInvalidArgument, size, v.VirtualSize)
	}
	v.VirtualSize = size
	f.volumes[id] = v
	return nil
}

func (f *fakeBackend) Write(_ context.Context, _ backend.Caller, id string, offset int64, data []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(); err != nil {
		return err
	}
	v, ok := f.volumes[id]
	if !ok {
		return fmt.Errorf("%w: volume %q", backend.ErrNotFound, id)
	}
	v.HighestAllocated = max(v.HighestAllocated, offset+int64(len(data)))
	f.volumes[id] = v
	return nil
}

func (f *fakeBackend) Check(_ context.Context, id string) (*qcow2.CheckResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.volumes[id]; !ok {
		return nil, fmt.Errorf("%w: volume %q", backend.ErrNotFound, id)
	}
	return &qcow2.CheckResult{Leaks: 1, ImageEndOffset: 1 << 18, TotalClusters: 16}, nil
}

func (f *fakeBackend) Inspect(_ context.Context, r io.ReaderAt, size int64, name, format string) (*qcow2.Report, error) {
	return qcow2.Inspect(r, size, name, format, nil)
}

func (f *fakeBackend) Rescan(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.begin()
}

func (f *fakeBackend) CancelJob(_ backend.Caller, id uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(); err != nil {
		return err
	}
	j, ok := f.jobs[id]
	if !ok {
		return fmt.Errorf("%w: job %d", backend.ErrNotFound, id)
	}
	j.cancel()
	return nil
}

func (f *fakeBackend) mutatingCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mutating
}

// CheckDomain judges with the real policy, with no backing roots, and
// counts as a mutating call (so refused callers can be shown not to
// reach it).
func (f *fakeBackend) CheckDomain(_ context.Context, domainXML []byte) (bool, *backend.DomainReport, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(); err != nil {
		return false, nil, err
	}
	rep, err := backend.CheckDomain(domainXML, backend.DomainPolicyOptions{})
	if err != nil {
		return false, nil, err
	}
	return rep.Allowed(), rep, nil
}

// Activate and Deactivate: the fake has no shared pools.
func (f *fakeBackend) Activate(_ context.Context, _ backend.Caller, id string, _ bool) error {
	return fmt.Errorf("%w: volume %q: the fake has no shared pools", backend.ErrInvalidArgument, id)
}

func (f *fakeBackend) Deactivate(_ context.Context, _ backend.Caller, id string) error {
	return fmt.Errorf("%w: volume %q: the fake has no shared pools", backend.ErrInvalidArgument, id)
}

func (f *fakeBackend) MigrationRefusal([]byte, *backend.DomainReport) []backend.DomainViolation {
	return nil
}

func (f *fakeBackend) ActivateForDomain(context.Context, []byte) []backend.DomainViolation {
	return nil
}
