package dbusapi

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"
)

// InspectLimits bound what callers of Inspect, which anyone may call, can
// make the root daemon do. The zero value means the defaults.
type InspectLimits struct {
	// PerCaller is how many Inspect calls one UID may have in flight
	// (DefaultInspectPerCaller); more are refused with Error.Busy at once.
	PerCaller int
	// Global is how many Inspect calls run at a time (DefaultInspectGlobal);
	// a call waits up to QueueWait for a turn, then gets Error.Busy.
	Global    int
	QueueWait time.Duration
	// ReadTimeout bounds the time one call spends reading the caller's
	// descriptor (DefaultInspectReadTimeout): a file that never answers
	// (FUSE, a hung network file system) fails the call with a timeout
	// instead of holding the daemon. Its turn stays taken until the read
	// returns, so one user's hung files never take more than PerCaller.
	ReadTimeout time.Duration
}

// Defaults for InspectLimits. PerCaller is well below Global, so that one
// user cannot take every turn; a header read takes at most a few MiB.
const (
	DefaultInspectPerCaller   = 2
	DefaultInspectGlobal      = 8
	DefaultInspectQueueWait   = 2 * time.Second
	DefaultInspectReadTimeout = 5 * time.Second
)

func (l InspectLimits) withDefaults() InspectLimits {
	if l.PerCaller <= 0 {
		l.PerCaller = DefaultInspectPerCaller
	}
	if l.Global <= 0 {
		l.Global = DefaultInspectGlobal
	}
	if l.QueueWait <= 0 {
		l.QueueWait = DefaultInspectQueueWait
	}
	if l.ReadTimeout <= 0 {
		l.ReadTimeout = DefaultInspectReadTimeout
	}
	return l
}

// inspectGate counts Inspect calls per UID and in all.
type inspectGate struct {
	limits InspectLimits
	turns  chan struct{} // one token per running call
	mu     sync.Mutex
	byUID  map[uint32]int
}

func newInspectGate(l InspectLimits) *inspectGate {
	l = l.withDefaults()
	return &inspectGate{limits: l, turns: make(chan struct{}, l.Global), byUID: map[uint32]int{}}
}

// enter takes a turn for uid, or returns Error.Busy. The caller must call
// the returned release exactly once.
func (g *inspectGate) enter(uid uint32) (release func(), derr *dbus.Error) {
	g.mu.Lock()
	if g.byUID[uid] >= g.limits.PerCaller {
		g.mu.Unlock()
		return nil, dbus.NewError(ErrorBusy, []any{fmt.Sprintf(
			"Inspect: UID %d already has %d Inspect calls in flight, the most one user may have; wait for them to finish",
			uid, g.limits.PerCaller)})
	}
	g.byUID[uid]++
	g.mu.Unlock()
	leave := func() {
		g.mu.Lock()
		if g.byUID[uid]--; g.byUID[uid] <= 0 {
			delete(g.byUID, uid)
		}
		g.mu.Unlock()
	}
	timer := time.NewTimer(g.limits.QueueWait)
	defer timer.Stop()
	select {
	case g.turns <- struct{}{}:
	case <-timer.C:
		leave()
		return nil, dbus.NewError(ErrorBusy, []any{fmt.Sprintf(
			"Inspect: the daemon is already inspecting %d images and none finished within %s; try again",
			g.limits.Global, g.limits.QueueWait)})
	}
	var once sync.Once
	return func() { once.Do(func() { <-g.turns; leave() }) }, nil
}

// ErrReadTimeout is the cause of a read from a caller's descriptor that did
// not answer before the call's deadline.
var ErrReadTimeout = errors.New("the file did not answer in time")

// deadlineReader reads a caller's file until a deadline. A read still
// blocked then keeps running on its own goroutine (a read blocked in the
// kernel cannot be taken back) and may still fill p later: callers stop
// at the first error. afterReads runs once no read is in flight.
type deadlineReader struct {
	f        *os.File
	deadline time.Time
	wg       sync.WaitGroup
}

func (r *deadlineReader) ReadAt(p []byte, off int64) (int, error) {
	var n int
	err := r.do(func() (err error) { n, err = r.f.ReadAt(p, off); return err })
	if errors.Is(err, ErrReadTimeout) {
		return 0, fmt.Errorf("reading %d bytes at offset %d of the descriptor: %w", len(p), off, err)
	}
	return n, err
}

// do runs fn, an operation on the caller's file, on its own goroutine and
// waits for it until the deadline.
func (r *deadlineReader) do(fn func() error) error {
	left := time.Until(r.deadline)
	if left <= 0 {
		return ErrReadTimeout
	}
	done := make(chan error, 1)
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		done <- fn()
	}()
	timer := time.NewTimer(left)
	defer timer.Stop()
	select {
	case err := <-done:
		return err
	case <-timer.C:
		return fmt.Errorf("%w (a FUSE or network file that hangs?)", ErrReadTimeout)
	}
}

// afterReads calls fn once no read is in flight.
func (r *deadlineReader) afterReads(fn func()) {
	go func() { r.wg.Wait(); fn() }()
}

var _ io.ReaderAt = (*deadlineReader)(nil)
