package backend

// Background checks. Load reads of each volume only its qcow2 header and
// refcount structures (qcow2.AllocationEnd: a few reads whatever the
// image's size), so the daemon answers within a second of starting even
// over a thousand large volumes. The full qcow2.Check of every volume runs
// afterwards (StartBackgroundChecks), one volume at a time, at idle I/O
// priority; a volume found corrupt gets its Problem then, and subscribers
// an EventVolumeChanged. Volumes this Manager made (CreateOverlay,
// Import) are not checked: it wrote them.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sort"
	"time"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/qcow2"
)

// checkRetry is how long the checker waits before it tries again a volume
// another operation held.
const checkRetry = time.Second

// checkInUseRetry is how often the volumes a running guest holds are
// tried again: their check waits until the guest lets go.
const checkInUseRetry = time.Minute

// StartBackgroundChecks starts the background checker: every volume Load
// or Rescan found is checked once. Close stops it. Calling it again does
// nothing.
func (m *Manager) StartBackgroundChecks() {
	m.mu.Lock()
	if m.checkerStarted || m.closed {
		m.mu.Unlock()
		return
	}
	m.checkerStarted = true
	m.jobWG.Add(1)
	m.mu.Unlock()
	go m.runChecks()
}

// wakeChecker tells the checker that Load or Rescan found volumes.
func (m *Manager) wakeChecker() {
	select {
	case m.checkWake <- struct{}{}:
	default:
	}
}

// BackgroundChecksPending is how many volumes still wait for their full
// check.
func (m *Manager) BackgroundChecksPending() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.uncheckedLocked())
}

// uncheckedLocked lists the volumes waiting for their check, by ID.
func (m *Manager) uncheckedLocked() []string {
	var ids []string
	for id, v := range m.volumes {
		if v.notHere {
			continue // a shared pool's volume not active here: no device
		}
		if _, done := m.checked[id]; !done {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	return ids
}

func (m *Manager) runChecks() {
	defer m.jobWG.Done()
	// Idle I/O priority is per thread: this goroutine keeps its thread,
	// which ends with it.
	runtime.LockOSThread()
	if err := hostblk.SetThreadIdleIOPriority(); err != nil {
		m.log.Warn("background checks run at normal I/O priority", "err", err)
	}
	start, checked := time.Now(), 0
	reported := false
	for {
		m.mu.Lock()
		ids := m.uncheckedLocked()
		m.mu.Unlock()
		busy, inUse := false, false
		for _, id := range ids {
			if m.jobCtx.Err() != nil {
				return
			}
			switch m.checkOne(id) {
			case checkBusy:
				busy = true
			case checkInUse:
				inUse = true
			case checkDone:
				checked++
			}
		}
		if len(ids) > 0 && !busy && !inUse && !reported {
			m.log.Info("background checks finished", "volumes", checked, "seconds", time.Since(start).Seconds())
			reported = true
		}
		var retry <-chan time.Time
		switch {
		case busy:
			retry = time.After(checkRetry)
		case inUse:
			retry = time.After(checkInUseRetry)
		}
		select {
		case <-m.jobCtx.Done():
			return
		case <-m.checkWake:
			reported = false
		case <-retry:
		}
	}
}

type checkOutcome int

const (
	checkDone  checkOutcome = iota
	checkBusy               // another operation holds the volume: later
	checkInUse              // a guest or another process holds the image: much later
	checkGone               // the volume went away
)

// checkOne runs the full check of one volume, unless another operation
// holds it (the check would see its writes half done).
func (m *Manager) checkOne(id string) checkOutcome {
	lock := m.opLock(id)
	if !lock.TryLock() {
		return checkBusy
	}
	defer lock.Unlock()
	v, _, err := m.lookup(id)
	if err != nil {
		return checkGone
	}
	problem, end, inUse := checkDevice(m.jobCtx, v.info.DevicePath)
	if inUse {
		return checkInUse // a guest or a writer has it: its metadata may be mid-change
	}
	if m.jobCtx.Err() != nil {
		return checkGone // closing: the check was cut short
	}
	m.mu.Lock()
	m.checked[id] = problem
	stored, ok := m.volumes[id]
	changed := false
	if ok && stored.problem == "" {
		if problem != "" {
			stored.problem, stored.info.Problem = problem, problem
			changed = true
		} else if end > 0 && end != stored.info.HighestAllocated {
			stored.info.HighestAllocated = end
			changed = true
		}
	}
	var info VolumeInfo
	if ok {
		info = stored.info
	}
	m.mu.Unlock()
	if !ok {
		return checkGone
	}
	if problem != "" {
		m.log.Error("volume has a problem", "pool", info.Pool, "volume", info.Name, "id", id, "problem", problem)
	}
	if changed {
		m.emit(Event{Kind: EventVolumeChanged, Volume: &info})
	}
	return checkDone
}

// checkDevice runs qcow2.Check on a volume's device under qemu-img's
// reader locks; problem is "" when the image is sound (leaks are
// harmless: what an interrupted write leaves at worst), end its
// ImageEndOffset. inUse: another process (a running guest, a writer)
// holds the image, whose metadata may change under the check; it is
// checked later.
func checkDevice(ctx context.Context, dev string) (problem string, end int64, inUse bool) {
	if dev == "" {
		return "", 0, false // readVolume said so already
	}
	d, err := hostblk.OpenDevice(dev, hostblk.OpenOptions{})
	if err != nil {
		return fmt.Sprintf("its device cannot be opened for its check: %v", err), 0, false
	}
	defer d.Close()
	lock, err := hostblk.LockImage(d.File(), hostblk.ReaderLocks)
	switch {
	case errors.Is(err, hostblk.ErrImageInUse):
		return "", 0, true
	case err != nil:
		return fmt.Sprintf("its device cannot be locked for its check: %v", err), 0, false
	}
	defer lock.Release()
	size, err := d.Size()
	if err != nil {
		return fmt.Sprintf("its device size cannot be read: %v", err), 0, false
	}
	res, err := qcow2.Check(ctxReader{ctx, d.File()}, size)
	if err != nil {
		return fmt.Sprintf("checking its qcow2 metadata failed: %v", err), 0, false
	}
	if res.Corruptions > 0 || res.CheckErrors > 0 {
		return fmt.Sprintf("its qcow2 metadata has %d corruptions and %d check errors (run Check for details)", res.Corruptions, res.CheckErrors), res.ImageEndOffset, false
	}
	return "", res.ImageEndOffset, false
}

// ctxReader stops a long check when ctx ends (Close does not wait for it).
type ctxReader struct {
	ctx context.Context
	r   io.ReaderAt
}

func (c ctxReader) ReadAt(p []byte, off int64) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.ReadAt(p, off)
}
