package virt

// The request watcher turns `virsh vol-create` on a request pool into a
// volagent overlay, and `virsh vol-delete` of the result into a Delete.
//
// Nothing is missed across restarts: the directories are watched with
// inotify, libvirt's pool refresh events and every (re)connection trigger
// a scan, a periodic scan catches the rest, and processing is idempotent
// (a request whose overlay exists already is only linked). Deletions are
// the exception, on purpose: a link removed while volagent was not
// watching leaves its volume in place (listed on D-Bus), since volagent
// never deletes a volume on inference.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/fsnotify/fsnotify"
	"golang.org/x/sys/unix"
	"libvirt.org/go/libvirt"

	"github.com/volagent/volagent/backend"
)

// DefaultRequestDir is where request pools live, one directory per pool.
const DefaultRequestDir = backend.DefaultRequestDir

// Suffixes of what a refused request leaves behind.
const (
	RefusedSuffix = ".refused"
	ReasonSuffix  = ".refused.reason"
	// tempPrefix marks the watcher's own temporary files.
	tempPrefix = ".volagent-"
	// claimXattr holds the watcher's claim on a request file: the Origin
	// its overlay is made with, so after a crash between making the
	// overlay and linking it the request is linked to that overlay and to
	// no other volume of the name.
	claimXattr = "user.volagent.claim"
	// originPrefix starts the Origin of a volume made from a request.
	originPrefix = "request:"
	// nameMax is the longest file name (NAME_MAX).
	nameMax = 255
	// RequestDirMode is the mode of request directories: root (libvirt,
	// volagent) lists them; qemu, running as another user (libvirt-qemu on
	// Debian), crosses them to the links of its disks and lists nothing.
	RequestDirMode = 0o711
)

// RequestWatcherOptions configure a RequestWatcher.
type RequestWatcherOptions struct {
	// Pools are the volagent pools that get a request pool (a libvirt dir
	// pool of the same name on BaseDir/NAME).
	Pools []string
	// BaseDir is DefaultRequestDir when empty.
	BaseDir string
	// ReconcileInterval is how often every directory is rescanned;
	// default 30 s.
	ReconcileInterval time.Duration
	// Settle is how long a request file must be left alone (no inotify
	// event, nobody holding it open) before it is read; default 300 ms.
	Settle time.Duration
	Logger *slog.Logger
}

// RequestWatcher materializes request files as overlays. Handlers and
// Bind wire it to a Conn; Start begins watching; Close stops.
type RequestWatcher struct {
	vols Volumes
	opts RequestWatcherOptions
	log  *slog.Logger

	mu   sync.Mutex
	conn *Conn

	kick chan string // a pool to rescan ("" for all)
	stop context.CancelFunc
	done chan struct{}

	// scans counts completed directory scans, so a test can wait for a
	// scan that began after what it did (a positive signal that nothing
	// more happened, instead of a sleep).
	scans atomic.Uint64

	// Owned by the run goroutine.
	links   map[string]map[string]string // pool -> link name -> volume ID
	pending map[string]time.Time         // request path -> when to read it
}

// NewRequestWatcher makes a watcher for opts.Pools.
func NewRequestWatcher(vols Volumes, opts RequestWatcherOptions) *RequestWatcher {
	if opts.BaseDir == "" {
		opts.BaseDir = DefaultRequestDir
	}
	if opts.ReconcileInterval <= 0 {
		opts.ReconcileInterval = 30 * time.Second
	}
	if opts.Settle <= 0 {
		opts.Settle = 300 * time.Millisecond
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &RequestWatcher{vols: vols, opts: opts, log: log, kick: make(chan string, 64),
		links: map[string]map[string]string{}, pending: map[string]time.Time{}}
}

// Dir is the request directory of a pool.
func (w *RequestWatcher) Dir(pool string) string { return filepath.Join(w.opts.BaseDir, pool) }

// Handlers returns h with the watcher's handlers added (chained after
// h's): every (re)connection makes sure the libvirt pools exist and
// rescans; a pool refresh rescans that pool.
func (w *RequestWatcher) Handlers(h Handlers) Handlers {
	connected, refresh := h.Connected, h.PoolRefresh
	h.Connected = func(conn *libvirt.Connect, gen uint64) {
		if connected != nil {
			connected(conn, gen)
		}
		w.ensurePools(conn)
		// What was linked while disconnected is not in libvirt's view yet.
		for _, pool := range w.opts.Pools {
			if p, err := conn.LookupStoragePoolByName(pool); err == nil {
				_ = p.Refresh(0)
				p.Free()
			}
		}
		w.trigger("")
	}
	h.PoolRefresh = func(pool string) {
		if refresh != nil {
			refresh(pool)
		}
		w.trigger(pool)
	}
	return h
}

// Bind tells the watcher which connection to refresh pools and look
// domains up on.
func (w *RequestWatcher) Bind(c *Conn) {
	w.mu.Lock()
	w.conn = c
	w.mu.Unlock()
}

func (w *RequestWatcher) trigger(pool string) {
	select {
	case w.kick <- pool:
	default: // a scan is queued already
	}
}

func (w *RequestWatcher) ensurePools(conn *libvirt.Connect) {
	for _, pool := range w.opts.Pools {
		if err := EnsureRequestPool(conn, pool, w.Dir(pool)); err != nil {
			w.log.Error("request pool not available in libvirt", "pool", pool, "dir", w.Dir(pool), "err", err)
		}
	}
}

// Start creates the directories, learns the links already there, starts
// watching and runs a first scan (which picks up requests made while
// volagent was not running).
func (w *RequestWatcher) Start() error {
	fsw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("request watcher: inotify: %w", err)
	}
	if err := w.prepare(); err != nil {
		fsw.Close()
		return err
	}
	for _, pool := range w.opts.Pools {
		dir := w.Dir(pool)
		if err := fsw.Add(dir); err != nil {
			fsw.Close()
			return fmt.Errorf("request pool %q: watching %q: %w", pool, dir, err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	w.stop, w.done = cancel, make(chan struct{})
	w.scanAll(ctx)
	go w.run(ctx, fsw)
	return nil
}

// prepare makes the request directories, traversable by qemu's user.
func (w *RequestWatcher) prepare() error {
	for _, pool := range w.opts.Pools {
		dir := w.Dir(pool)
		if err := MakeRequestDir(w.opts.BaseDir, dir, w.log); err != nil {
			return fmt.Errorf("request pool %q: %w", pool, err)
		}
		w.links[pool] = map[string]string{}
	}
	return nil
}

// MakeRequestDir creates dir (a request pool's directory under base) and
// its missing parents, and gives base, dir and every parent it created
// RequestDirMode whatever the umask (the unit's is 0077): libvirt chowns
// a disk's device to qemu's user, never the directories on its path, so
// qemu must be able to cross them. An existing parent above base that
// qemu's user cannot cross is logged, not changed: it is the admin's.
func MakeRequestDir(base, dir string, log *slog.Logger) error {
	var created []string
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil || d == filepath.Dir(d) {
			break
		}
		created = append(created, d)
	}
	if err := os.MkdirAll(dir, RequestDirMode); err != nil {
		return fmt.Errorf("directory %q: %w", dir, err)
	}
	for _, d := range append(created, base, dir) {
		if err := os.Chmod(d, RequestDirMode); err != nil {
			return fmt.Errorf("directory %q: mode %#o: %w", d, RequestDirMode, err)
		}
	}
	for d := filepath.Dir(base); d != filepath.Dir(d); d = filepath.Dir(d) {
		if fi, err := os.Stat(d); err == nil && fi.Mode().Perm()&0o001 == 0 && log != nil {
			log.Error("qemu running as another user than root (libvirt-qemu on Debian) cannot reach disks in request pools: a directory on the way is not searchable by others; run chmod o+x on it",
				"directory", d, "mode", fmt.Sprintf("%#o", fi.Mode().Perm()), "request_dir", base)
		}
	}
	return nil
}

// Close stops watching; a request being processed is finished first.
func (w *RequestWatcher) Close() error {
	if w.stop == nil {
		return nil
	}
	w.stop()
	<-w.done
	return nil
}

func (w *RequestWatcher) run(ctx context.Context, fsw *fsnotify.Watcher) {
	defer close(w.done)
	defer fsw.Close()
	reconcile := time.NewTicker(w.opts.ReconcileInterval)
	defer reconcile.Stop()
	settle := time.NewTicker(w.opts.Settle / 3)
	defer settle.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-fsw.Events:
			if !ok {
				return
			}
			w.onEvent(ctx, ev)
		case err, ok := <-fsw.Errors:
			if !ok {
				return
			}
			// An overflow loses events: rescan everything.
			w.log.Warn("inotify error; rescanning the request pools", "err", err)
			w.scanAll(ctx)
		case pool := <-w.kick:
			if pool == "" {
				w.scanAll(ctx)
			} else if _, ours := w.links[pool]; ours {
				w.scan(ctx, pool)
			}
		case <-reconcile.C:
			w.scanAll(ctx)
		case now := <-settle.C:
			for path, due := range w.pending {
				if now.After(due) {
					delete(w.pending, path)
					w.process(ctx, filepath.Base(filepath.Dir(path)), filepath.Base(path))
				}
			}
		}
	}
}

func ignoredName(name string) bool {
	return strings.HasPrefix(name, ".") || strings.HasSuffix(name, RefusedSuffix) || strings.HasSuffix(name, ReasonSuffix)
}

func (w *RequestWatcher) onEvent(ctx context.Context, ev fsnotify.Event) {
	pool, name := filepath.Base(filepath.Dir(ev.Name)), filepath.Base(ev.Name)
	if _, ours := w.links[pool]; !ours || filepath.Dir(ev.Name) != w.Dir(pool) || ignoredName(name) {
		return
	}
	switch {
	case ev.Has(fsnotify.Remove):
		if id, linked := w.links[pool][name]; linked {
			if _, err := os.Lstat(ev.Name); errors.Is(err, os.ErrNotExist) {
				w.linkRemoved(ctx, pool, name, id)
			}
		}
	case ev.Has(fsnotify.Rename):
		if id, linked := w.links[pool][name]; linked {
			w.log.Warn("a volume's link in a request pool was renamed; the volume stays", "pool", pool, "link", name, "volume", id)
			delete(w.links[pool], name)
		}
	case ev.Has(fsnotify.Create), ev.Has(fsnotify.Write), ev.Has(fsnotify.Chmod):
		w.pending[ev.Name] = time.Now().Add(w.opts.Settle)
	}
}

func (w *RequestWatcher) scanAll(ctx context.Context) {
	for _, pool := range w.opts.Pools {
		w.scan(ctx, pool)
	}
}

// scan processes every entry of a pool's directory now.
func (w *RequestWatcher) scan(ctx context.Context, pool string) {
	entries, err := os.ReadDir(w.Dir(pool))
	if err != nil {
		w.log.Error("cannot read a request pool's directory", "pool", pool, "err", err)
		return
	}
	for _, e := range entries {
		if !ignoredName(e.Name()) {
			w.process(ctx, pool, e.Name())
		}
	}
	w.scans.Add(1)
}

// process handles one entry: a link is learnt (and re-pointed if its
// volume's device changed), a request is materialized or refused.
func (w *RequestWatcher) process(ctx context.Context, pool, name string) {
	path := filepath.Join(w.Dir(pool), name)
	fi, err := os.Lstat(path)
	if err != nil {
		return // gone already
	}
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		w.adoptLink(pool, name, path)
	case fi.Mode().IsRegular():
		if openElsewhere(path) {
			// libvirt (qemu-img) is still writing it.
			w.pending[path] = time.Now().Add(w.opts.Settle)
			return
		}
		w.materialize(ctx, pool, name, path)
	}
}

// openElsewhere reports whether another process has the file open: a
// write lease can only be taken on a file nobody else has open.
func openElsewhere(path string) bool {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETLEASE, unix.F_WRLCK); err != nil {
		return errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EBUSY)
	}
	_, _ = unix.FcntlInt(uintptr(fd), unix.F_SETLEASE, unix.F_UNLCK)
	return false
}

// volumeName is the volagent volume name of a request or link name.
func volumeName(name string) string { return strings.TrimSuffix(name, ".qcow2") }

func (w *RequestWatcher) materialize(ctx context.Context, pool, name, path string) {
	log := w.log.With("pool", pool, "request", path)
	settings, err := w.vols.PoolSettings(pool)
	if err != nil {
		log.Error("request pool's volagent pool is not loaded; request left in place", "err", err)
		return
	}
	req, err := ReadOverlayRequest(path, pool, settings.BackingRoots)
	if err != nil {
		if backend.Kind(err) == backend.ErrFailed {
			log.Warn("request cannot be read now; retried at the next scan", "err", err)
			return
		}
		w.refuse(pool, name, path, err)
		return
	}
	claim, err := claimRequest(path)
	if err != nil {
		log.Error("cannot record the claim on a request; retried at the next scan", "err", err)
		return
	}
	req.Origin = claim
	id := backend.VolumeID(pool, req.Name)
	v, err := w.vols.Volume(id)
	if err == nil {
		// Only a volume this very request made (an earlier run stopped
		// before linking) is linked; any other volume of the name (another
		// request's: "vm1" and "vm1.qcow2" are one volume name; a D-Bus
		// client's; a deleted request's) is not this request's to take.
		if claim == "" || v.Origin != claim {
			w.refuse(pool, name, path, fmt.Errorf("%w: pool %q already has a volume named %q (over %q, %s) that this request did not make; a request makes its own volume: choose another name",
				backend.ErrInvalidArgument, pool, req.Name, v.BackingName, v.BackingFormat))
			return
		}
	} else {
		v, err = w.vols.CreateOverlay(ctx, backend.Caller{UID: 0}, req)
		if err != nil {
			if k := backend.Kind(err); k == backend.ErrFailed || k == backend.ErrBusy || k == backend.ErrCancelled {
				log.Error("materializing a request failed; retried at the next scan", "err", err)
				return
			}
			w.refuse(pool, name, path, err)
			return
		}
	}
	if err := w.link(pool, name, v); err != nil {
		log.Error("overlay made, but the request could not be replaced by a link; retried at the next scan", "volume", v.ID, "err", err)
		return
	}
	log.Info("request materialized", "volume", v.ID, "device", v.DevicePath, "backing", v.BackingName, "backing_format", v.BackingFormat)
	w.refreshPool(pool)
}

// claimRequest returns the Origin the overlay of the request file at path
// is made with: the claim recorded on the file earlier, or a new one,
// recorded durably before the overlay is made. "" where the file system
// keeps no extended attributes: such a request never takes an existing
// volume.
func claimRequest(path string) (string, error) {
	buf := make([]byte, 128)
	n, err := unix.Lgetxattr(path, claimXattr, buf)
	if err == nil && strings.HasPrefix(string(buf[:n]), originPrefix) {
		return string(buf[:n]), nil
	}
	if err != nil && !errors.Is(err, unix.ENODATA) {
		if errors.Is(err, unix.ENOTSUP) {
			return "", nil
		}
		return "", fmt.Errorf("reading %s of %s: %w", claimXattr, path, err)
	}
	nonce := make([]byte, 16)
	if _, err := rand.Read(nonce); err != nil {
		return "", err
	}
	claim := originPrefix + hex.EncodeToString(nonce)
	if err := unix.Lsetxattr(path, claimXattr, []byte(claim), 0); err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return "", nil
		}
		return "", fmt.Errorf("setting %s on %s: %w", claimXattr, path, err)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return "", fmt.Errorf("fsync %s: %w", path, err)
	}
	return claim, nil
}

// shortName is name if prefix+name+suffix fits a file name, else a prefix
// of name (whole UTF-8 characters) and a hash of all of it that does.
func shortName(prefix, name, suffix string) string {
	if len(prefix)+len(name)+len(suffix) <= nameMax {
		return name
	}
	sum := sha256.Sum256([]byte(name))
	tag := "~" + hex.EncodeToString(sum[:8])
	keep := nameMax - len(prefix) - len(suffix) - len(tag)
	for keep > 0 && !utf8.RuneStart(name[keep]) {
		keep--
	}
	return name[:max(keep, 0)] + tag
}

// link atomically replaces the entry name by a symlink to the volume's
// device, so libvirt lists the real volume.
func (w *RequestWatcher) link(pool, name string, v backend.VolumeInfo) error {
	if v.DevicePath == "" {
		return fmt.Errorf("volume %q has no device", v.ID)
	}
	path := filepath.Join(w.Dir(pool), name)
	tmp := filepath.Join(w.Dir(pool), tempPrefix+"link-"+shortName(tempPrefix+"link-", name, ""))
	_ = os.Remove(tmp)
	if err := os.Symlink(v.DevicePath, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	w.links[pool][name] = v.ID
	return nil
}

// adoptLink learns a link found in the directory, and re-points it when
// its volume's device changed (loop devices are renumbered at boot).
func (w *RequestWatcher) adoptLink(pool, name, path string) {
	target, err := os.Readlink(path)
	if err != nil {
		return
	}
	v, ok := w.vols.VolumeByDevice(target)
	if !ok || v.Pool != pool {
		v, err = w.vols.Volume(backend.VolumeID(pool, volumeName(name)))
		if err != nil {
			if _, known := w.links[pool][name]; !known {
				w.log.Debug("link in a request pool names no volume of the pool; left alone", "pool", pool, "link", path, "target", target)
			}
			delete(w.links[pool], name)
			return
		}
	}
	if target != v.DevicePath {
		if err := w.link(pool, name, v); err != nil {
			w.log.Error("cannot re-point a link to its volume's device", "pool", pool, "link", path, "device", v.DevicePath, "err", err)
			return
		}
		w.log.Info("link re-pointed to its volume's device", "pool", pool, "link", path, "device", v.DevicePath)
		w.refreshPool(pool)
		return
	}
	w.links[pool][name] = v.ID
}

// refuse renames a request to NAME.refused with the reason beside it,
// logs and signals it.
//
// A name too long for the suffixes (NAME_MAX is 255 bytes) is shortened
// to a prefix and a hash, and the reason names the request in full, so a
// refused request always leaves the directory, once.
func (w *RequestWatcher) refuse(pool, name, path string, cause error) {
	short := filepath.Join(w.Dir(pool), shortName("", name, ReasonSuffix))
	refused := short + RefusedSuffix
	reason := fmt.Sprintf("volagent refused the request %s at %s:\n%v\n", name, time.Now().UTC().Format(time.RFC3339), cause)
	tmp := filepath.Join(w.Dir(pool), tempPrefix+"reason-"+shortName(tempPrefix+"reason-", name, ""))
	if err := os.WriteFile(tmp, []byte(reason), 0o644); err == nil {
		if err := os.Rename(tmp, short+ReasonSuffix); err != nil {
			_ = os.Remove(tmp)
		}
	}
	if err := os.Rename(path, refused); err != nil {
		w.log.Error("cannot rename a refused request", "pool", pool, "request", path, "err", err)
	}
	code := "request-refused"
	switch backend.Kind(cause) {
	case backend.ErrPolicyViolation:
		code = "request-policy-violation"
	case backend.ErrNotFound:
		code = "request-not-found"
	case backend.ErrNoSpace:
		code = "request-no-space"
	case backend.ErrInvalidArgument:
		code = "request-invalid"
	}
	w.vols.SignalPolicyViolation(fmt.Sprintf("request %s/%s", pool, name), code, cause.Error())
	w.log.Warn("request refused", "pool", pool, "request", path, "renamed_to", refused, "code", code, "reason", cause)
	w.refreshPool(pool)
}

// linkRemoved handles `virsh vol-delete` (libvirt unlinked the link):
// the volume is deleted, unless the backend refuses (a domain names it
// under any name of its device, it backs another volume, ...), in which
// case the link stays and the refusal is signalled. The link is put back
// before the backend decides, so a domain that names the volume by its
// link is seen by the backend's one in-use check like any other name.
func (w *RequestWatcher) linkRemoved(ctx context.Context, pool, name, id string) {
	path := filepath.Join(w.Dir(pool), name)
	v, err := w.vols.Volume(id)
	if err != nil {
		delete(w.links[pool], name)
		return
	}
	if err := w.link(pool, name, v); err != nil {
		w.log.Error("cannot restore the link of a volume before deciding its deletion", "pool", pool, "link", path, "err", err)
	}
	if err := w.vols.Delete(ctx, backend.Caller{UID: 0}, id); err != nil {
		w.vols.SignalPolicyViolation(fmt.Sprintf("volume %s/%s", pool, v.Name), "delete-refused", err.Error())
		w.log.Warn("vol-delete refused; link restored", "pool", pool, "volume", id, "reason", err)
		w.refreshPool(pool)
		return
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		w.log.Error("volume deleted, but its link could not be removed", "pool", pool, "link", path, "err", err)
	}
	delete(w.links[pool], name)
	w.log.Info("volume deleted by vol-delete", "pool", pool, "volume", id, "device", v.DevicePath)
	w.refreshPool(pool)
}

func (w *RequestWatcher) currentConn() *Conn {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.conn
}

// refreshPool makes libvirt re-read a request pool, so vol-list shows
// what changed; while disconnected the next connection's scan does it.
func (w *RequestWatcher) refreshPool(pool string) {
	c := w.currentConn()
	if c == nil {
		return
	}
	err := c.Do(func(conn *libvirt.Connect) error {
		p, err := conn.LookupStoragePoolByName(pool)
		if err != nil {
			return err
		}
		defer p.Free()
		return p.Refresh(0)
	})
	if err != nil && !errors.Is(err, ErrDisconnected) {
		w.log.Warn("refreshing a libvirt request pool failed", "pool", pool, "err", err)
	}
}
