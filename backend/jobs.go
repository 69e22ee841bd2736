package backend

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"
)

// Job bookkeeping limits.
const (
	// keepFinishedJobs is how many finished jobs stay listed so clients
	// can read their result after the completion signal.
	keepFinishedJobs = 100
	// progressInterval bounds how often a job sends EventJobProgress.
	progressInterval = 200 * time.Millisecond
)

// job is one long operation.
type job struct {
	mu     sync.Mutex
	info   JobInfo
	err    error // why it failed, with its kind (info.Message is its text)
	cancel context.CancelFunc
	done   chan struct{}

	lastEmit  time.Time
	rateBytes int64     // Bytes at rateTime
	rateTime  time.Time // when the rate was last measured
}

// jobTable holds running jobs and the most recent finished ones.
type jobTable struct {
	next     uint64
	byID     map[uint64]*job
	finished []uint64 // IDs in completion order, oldest first
}

// startJob registers a running job and returns it with its context, which
// Close and CancelJob cancel.
func (m *Manager) startJob(op, volumeID string, c Caller, total int64) (*job, context.Context) {
	ctx, cancel := context.WithCancel(m.jobCtx)
	j := &job{cancel: cancel, done: make(chan struct{})}
	m.mu.Lock()
	if m.jobs.byID == nil {
		m.jobs.byID = map[uint64]*job{}
	}
	m.jobs.next++
	now := time.Now()
	j.info = JobInfo{ID: m.jobs.next, Operation: op, Volume: volumeID, State: JobRunning, TotalBytes: total,
		StartedBy: c.UID, StartedAt: now, Cancelable: true}
	j.rateTime = now
	m.jobs.byID[j.info.ID] = j
	m.mu.Unlock()
	info := j.snapshot()
	m.emit(Event{Kind: EventJobAdded, Job: &info})
	return j, ctx
}

func (j *job) snapshot() JobInfo {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.info
}

// progress records bytes done and sends a progress event at most every
// progressInterval. The rate is measured over the last interval or more.
func (m *Manager) progress(j *job, done int64) {
	j.mu.Lock()
	now := time.Now()
	j.info.Bytes = done
	if j.info.TotalBytes > 0 {
		j.info.Progress = min(float64(done)/float64(j.info.TotalBytes), 1)
	}
	if dt := now.Sub(j.rateTime); dt >= progressInterval {
		j.info.Rate = float64(done-j.rateBytes) / dt.Seconds()
		j.rateBytes, j.rateTime = done, now
	}
	send := now.Sub(j.lastEmit) >= progressInterval
	if send {
		j.lastEmit = now
	}
	info := j.info
	j.mu.Unlock()
	if send {
		m.emit(Event{Kind: EventJobProgress, Job: &info})
	}
}

// finishJob records the result and keeps the job listed among the last
// keepFinishedJobs finished ones.
func (m *Manager) finishJob(j *job, state JobState, message string) {
	j.mu.Lock()
	j.info.State = state
	j.info.Message = message
	j.info.Cancelable = false
	if state == JobSucceeded {
		j.info.Progress = 1
	}
	info := j.info
	j.mu.Unlock()
	j.cancel()
	m.mu.Lock()
	m.jobs.finished = append(m.jobs.finished, info.ID)
	for len(m.jobs.finished) > keepFinishedJobs {
		delete(m.jobs.byID, m.jobs.finished[0])
		m.jobs.finished = m.jobs.finished[1:]
	}
	m.mu.Unlock()
	close(j.done)
	m.emit(Event{Kind: EventJobCompleted, Job: &info})
}

// Jobs lists the running jobs and the last finished ones, by ID.
func (m *Manager) Jobs() []JobInfo {
	m.mu.Lock()
	jobs := make([]*job, 0, len(m.jobs.byID))
	for _, j := range m.jobs.byID {
		jobs = append(jobs, j)
	}
	m.mu.Unlock()
	out := make([]JobInfo, 0, len(jobs))
	for _, j := range jobs {
		out = append(out, j.snapshot())
	}
	sort.Slice(out, func(a, b int) bool { return out[a].ID < out[b].ID })
	return out
}

// Job returns one job; ErrNotFound if it never existed or finished too
// long ago to be kept.
func (m *Manager) Job(id uint64) (JobInfo, error) {
	j, err := m.job(id)
	if err != nil {
		return JobInfo{}, err
	}
	return j.snapshot(), nil
}

func (m *Manager) job(id uint64) (*job, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, ok := m.jobs.byID[id]
	if !ok {
		return nil, fmt.Errorf("%w: job %d (finished jobs are kept for the last %d only)", ErrNotFound, id, keepFinishedJobs)
	}
	return j, nil
}

// CancelJob asks a running job to stop; it returns at once (the job ends
// with state JobCancelled shortly after; a cancelled import removes its
// volume). Errors: ErrNotFound; ErrNotAuthorized unless c is root or
// started the job; ErrInvalidArgument if the job already finished.
func (m *Manager) CancelJob(c Caller, id uint64) error {
	j, err := m.job(id)
	if err != nil {
		return err
	}
	info := j.snapshot()
	if c.UID != 0 && c.UID != info.StartedBy {
		return fmt.Errorf("%w: job %d was started by UID %d; only it or root may cancel it (caller UID %d)", ErrNotAuthorized, id, info.StartedBy, c.UID)
	}
	if info.State != JobRunning {
		return fmt.Errorf("%w: job %d already finished (%s)", ErrInvalidArgument, id, info.State)
	}
	j.cancel()
	return nil
}

// waitJob waits for a job to finish (tests, Close).
func (m *Manager) waitJob(ctx context.Context, id uint64) (JobInfo, error) {
	j, err := m.job(id)
	if err != nil {
		return JobInfo{}, err
	}
	select {
	case <-j.done:
		return j.snapshot(), nil
	case <-ctx.Done():
		return JobInfo{}, fmt.Errorf("%w: waiting for job %d: %w", ErrCancelled, id, ctx.Err())
	}
}
