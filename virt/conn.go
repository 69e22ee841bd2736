// Package virt is volagent's libvirt integration: a connection that
// survives libvirt daemon restarts, and the audit of running domains
// against the no-probing policy (hot-plugged disks pass no hook).
//
// libvirt's event callbacks run on the one default event loop goroutine;
// they only record what happened and hand work to goroutines of this
// package, so a slow check never stalls libvirt's keepalive.
package virt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"libvirt.org/go/libvirt"
)

// DefaultURI is the system QEMU driver.
const DefaultURI = "qemu:///system"

// ErrDisconnected is returned by Do while no connection is up.
var ErrDisconnected = errors.New("not connected to libvirt")

// Options configure a Conn.
type Options struct {
	URI string // DefaultURI when empty
	// KeepAliveInterval and KeepAliveCount: libvirt closes the connection
	// (and the close callback reconnects) when the daemon misses
	// KeepAliveCount probes sent every KeepAliveInterval. Defaults 5 s, 3.
	KeepAliveInterval time.Duration
	KeepAliveCount    uint
	// MinBackoff and MaxBackoff bound the wait between reconnection
	// attempts, which doubles from one to the other. Defaults 100 ms, 10 s.
	MinBackoff, MaxBackoff time.Duration
	Logger                 *slog.Logger // nil discards
}

// Handlers are called by a Conn. Every one is optional and called from a
// goroutine of the Conn (never libvirt's event loop), one call at a time,
// so handlers may call libvirt through Do.
type Handlers struct {
	// Connected runs after every (re)connection, once the callbacks are
	// registered: events during an outage are lost, so it resynchronises
	// (lists domains and pools). generation counts connections from 1.
	Connected func(conn *libvirt.Connect, generation uint64)
	// DomainLifecycle: a domain was defined, started, stopped, paused, ...
	DomainLifecycle func(domain string, event libvirt.DomainEventType, detail int)
	// DeviceAdded: a device was hot-plugged into a running domain.
	DeviceAdded func(domain, alias string)
	// MediaChanged: a removable disk's medium changed or its tray moved
	// (DISK_CHANGE and TRAY_CHANGE events); no hook sees either.
	MediaChanged func(domain, alias string)
	// BlockThreshold: a disk's write position crossed the threshold set
	// with virDomainSetBlockThreshold.
	BlockThreshold func(domain, dev, path string, threshold, excess uint64)
	// IOError: qemu hit an I/O error (reason "enospc" pauses the domain
	// when the disk's error policy says so).
	IOError func(domain, srcPath, devAlias string, action libvirt.DomainEventIOErrorAction, reason string)
	// PoolLifecycle and PoolRefresh: storage pool events (libvirt has no
	// volume events).
	PoolLifecycle func(pool string, event libvirt.StoragePoolEventLifecycleType)
	PoolRefresh   func(pool string)
}

// Conn is a libvirt connection that reconnects, with exponential backoff,
// whenever libvirt closes it (daemon restart, keepalive timeout), and then
// re-registers every callback and calls Handlers.Connected.
type Conn struct {
	opts     Options
	handlers Handlers
	log      *slog.Logger

	mu         sync.Mutex
	conn       *libvirt.Connect // nil while disconnected
	generation uint64
	callbacks  []int // domain event callback IDs
	poolCBs    []int // pool event callback IDs

	closed    chan struct{} // the connection in use was closed by libvirt
	work      chan func()   // handler calls, in order
	stop      context.CancelFunc
	done      sync.WaitGroup
	connected chan struct{} // closed at the first connection
}

var eventLoopOnce sync.Once
var eventLoopErr error

// startEventLoop registers libvirt's default event loop implementation and
// runs it on a goroutine, once per process: keepalive and every event and
// close callback need it, and it must exist before the first connection.
func startEventLoop() error {
	eventLoopOnce.Do(func() {
		if eventLoopErr = libvirt.EventRegisterDefaultImpl(); eventLoopErr != nil {
			return
		}
		go func() {
			for {
				if err := libvirt.EventRunDefaultImpl(); err != nil {
					slog.Error("libvirt event loop", "err", err)
					time.Sleep(time.Second)
				}
			}
		}()
	})
	return eventLoopErr
}

// Dial starts a Conn. It returns at once: the connection is made, and
// remade, in the background (WaitConnected waits for the first one). Close
// stops it.
func Dial(opts Options, h Handlers) (*Conn, error) {
	if opts.URI == "" {
		opts.URI = DefaultURI
	}
	if opts.KeepAliveInterval <= 0 {
		opts.KeepAliveInterval = 5 * time.Second
	}
	if opts.KeepAliveCount == 0 {
		opts.KeepAliveCount = 3
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 100 * time.Millisecond
	}
	if opts.MaxBackoff < opts.MinBackoff {
		opts.MaxBackoff = max(10*time.Second, opts.MinBackoff)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if err := startEventLoop(); err != nil {
		return nil, fmt.Errorf("libvirt event loop: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Conn{opts: opts, handlers: h, log: log.With("uri", opts.URI), closed: make(chan struct{}, 1),
		work: make(chan func(), 1024), stop: cancel, connected: make(chan struct{})}
	c.done.Add(2)
	go c.runHandlers(ctx)
	go c.maintain(ctx)
	return c, nil
}

// WaitConnected waits for the first connection.
func (c *Conn) WaitConnected(ctx context.Context) error {
	select {
	case <-c.connected:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for libvirt at %s: %w", c.opts.URI, ctx.Err())
	}
}

// Generation is the number of connections made so far (0 before the first).
func (c *Conn) Generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.generation
}

// Do runs fn with the current connection, or returns ErrDisconnected.
// The connection must not be kept past fn.
func (c *Conn) Do(fn func(conn *libvirt.Connect) error) error {
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	if conn == nil {
		return ErrDisconnected
	}
	return fn(conn)
}

// Close stops reconnecting, deregisters the callbacks and closes the
// connection.
func (c *Conn) Close() error {
	c.stop()
	c.done.Wait()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.disconnectLocked()
	return nil
}

// maintain connects, and reconnects each time libvirt closes the
// connection, until ctx ends.
func (c *Conn) maintain(ctx context.Context) {
	defer c.done.Done()
	backoff := c.opts.MinBackoff
	for {
		err := c.connect()
		if err == nil {
			backoff = c.opts.MinBackoff
			select {
			case <-ctx.Done():
				return
			case <-c.closed:
				c.log.Warn("libvirt connection closed; reconnecting")
				c.mu.Lock()
				c.disconnectLocked()
				c.mu.Unlock()
				continue
			}
		}
		c.log.Warn("connecting to libvirt failed; retrying", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, c.opts.MaxBackoff)
	}
}

// connect opens a connection, sets keepalive and the close callback,
// registers every event callback and queues Handlers.Connected.
func (c *Conn) connect() error {
	conn, err := libvirt.NewConnect(c.opts.URI)
	if err != nil {
		return err
	}
	// Drain a close signal of the previous connection.
	select {
	case <-c.closed:
	default:
	}
	if err := conn.SetKeepAlive(int(c.opts.KeepAliveInterval/time.Second), c.opts.KeepAliveCount); err != nil {
		conn.Close()
		return fmt.Errorf("keepalive: %w", err)
	}
	if err := conn.RegisterCloseCallback(func(*libvirt.Connect, libvirt.ConnectCloseReason) {
		select {
		case c.closed <- struct{}{}:
		default:
		}
	}); err != nil {
		conn.Close()
		return fmt.Errorf("close callback: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.conn = conn
	if err := c.registerLocked(conn); err != nil {
		c.disconnectLocked()
		return err
	}
	c.generation++
	gen := c.generation
	c.log.Info("connected to libvirt", "generation", gen)
	if gen == 1 {
		close(c.connected)
	}
	if h := c.handlers.Connected; h != nil {
		c.queue(func() {
			_ = c.Do(func(conn *libvirt.Connect) error { h(conn, gen); return nil })
		})
	}
	return nil
}

// registerLocked registers the event callbacks the handlers need.
func (c *Conn) registerLocked(conn *libvirt.Connect) error {
	h := c.handlers
	add := func(what string, id int, err error) error {
		if err != nil {
			return fmt.Errorf("registering for %s events: %w", what, err)
		}
		c.callbacks = append(c.callbacks, id)
		return nil
	}
	if h.DomainLifecycle != nil {
		id, err := conn.DomainEventLifecycleRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventLifecycle) {
			name, _ := d.GetName()
			event, detail := ev.Event, ev.Detail
			c.queue(func() { h.DomainLifecycle(name, event, detail) })
		})
		if err := add("domain lifecycle", id, err); err != nil {
			return err
		}
	}
	if h.DeviceAdded != nil {
		id, err := conn.DomainEventDeviceAddedRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventDeviceAdded) {
			name, _ := d.GetName()
			alias := ev.DevAlias
			c.queue(func() { h.DeviceAdded(name, alias) })
		})
		if err := add("device-added", id, err); err != nil {
			return err
		}
	}
	if h.MediaChanged != nil {
		id, err := conn.DomainEventDiskChangeRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventDiskChange) {
			name, _ := d.GetName()
			alias := ev.DevAlias
			c.queue(func() { h.MediaChanged(name, alias) })
		})
		if err := add("disk-change", id, err); err != nil {
			return err
		}
		id, err = conn.DomainEventTrayChangeRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventTrayChange) {
			name, _ := d.GetName()
			alias := ev.DevAlias
			c.queue(func() { h.MediaChanged(name, alias) })
		})
		if err := add("tray-change", id, err); err != nil {
			return err
		}
	}
	if h.BlockThreshold != nil {
		id, err := conn.DomainEventBlockThresholdRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventBlockThreshold) {
			name, _ := d.GetName()
			e := *ev
			c.queue(func() { h.BlockThreshold(name, e.Dev, e.Path, e.Threshold, e.Excess) })
		})
		if err := add("block-threshold", id, err); err != nil {
			return err
		}
	}
	if h.IOError != nil {
		id, err := conn.DomainEventIOErrorReasonRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, ev *libvirt.DomainEventIOErrorReason) {
			name, _ := d.GetName()
			e := *ev
			c.queue(func() { h.IOError(name, e.SrcPath, e.DevAlias, e.Action, e.Reason) })
		})
		if err := add("I/O error", id, err); err != nil {
			return err
		}
	}
	addPool := func(what string, id int, err error) error {
		if err != nil {
			return fmt.Errorf("registering for %s events: %w", what, err)
		}
		c.poolCBs = append(c.poolCBs, id)
		return nil
	}
	if h.PoolLifecycle != nil {
		id, err := conn.StoragePoolEventLifecycleRegister(nil, func(_ *libvirt.Connect, p *libvirt.StoragePool, ev *libvirt.StoragePoolEventLifecycle) {
			name, _ := p.GetName()
			event := ev.Event
			c.queue(func() { h.PoolLifecycle(name, event) })
		})
		if err := addPool("pool lifecycle", id, err); err != nil {
			return err
		}
	}
	if h.PoolRefresh != nil {
		id, err := conn.StoragePoolEventRefreshRegister(nil, func(_ *libvirt.Connect, p *libvirt.StoragePool) {
			name, _ := p.GetName()
			c.queue(func() { h.PoolRefresh(name) })
		})
		if err := addPool("pool refresh", id, err); err != nil {
			return err
		}
	}
	return nil
}

// disconnectLocked deregisters and closes the current connection; on a
// dead connection the deregistrations fail harmlessly.
func (c *Conn) disconnectLocked() {
	if c.conn == nil {
		return
	}
	for _, id := range c.callbacks {
		_ = c.conn.DomainEventDeregister(id)
	}
	for _, id := range c.poolCBs {
		_ = c.conn.StoragePoolEventDeregister(id)
	}
	c.callbacks, c.poolCBs = nil, nil
	_ = c.conn.UnregisterCloseCallback()
	_, _ = c.conn.Close()
	c.conn = nil
}

// queue hands a handler call to the handler goroutine without blocking
// libvirt's event loop; when the queue is full the call is dropped (the
// next resynchronisation catches up).
func (c *Conn) queue(fn func()) {
	select {
	case c.work <- fn:
	default:
		c.log.Warn("libvirt event queue full; event dropped")
	}
}

func (c *Conn) runHandlers(ctx context.Context) {
	defer c.done.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case fn := <-c.work:
			fn()
		}
	}
}
