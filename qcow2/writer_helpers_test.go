package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"unsafe"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/testutil"
)

// memDevice is an in-memory Device that enforces O_DIRECT's alignment
// rules and can stop after its N-th request (writes and flushes count),
// modelling a host that dies: every request before it reached the device,
// none after.
type memDevice struct {
	mu        sync.Mutex
	data      []byte
	bs        int64
	growable  bool // a regular file: writes past the end extend it
	requests  int
	failAfter int // 0: never fail
}

var errInjected = errors.New("injected fault: the host died")

func (d *memDevice) check(p []byte, off int64) error {
	if off%d.bs != 0 || int64(len(p))%d.bs != 0 || (len(p) > 0 && uintptr(unsafe.Pointer(&p[0]))%uintptr(d.bs) != 0) {
		return fmt.Errorf("misaligned request: %d bytes at %d (block size %d): %w", len(p), off, d.bs, syscall.EINVAL)
	}
	return nil
}

func (d *memDevice) request() error {
	d.requests++
	if d.failAfter > 0 && d.requests > d.failAfter {
		return errInjected
	}
	return nil
}

func (d *memDevice) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.check(p, off); err != nil {
		return 0, err
	}
	if off >= int64(len(d.data)) {
		return 0, nil
	}
	n := copy(p, d.data[off:])
	return n, nil
}

func (d *memDevice) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.check(p, off); err != nil {
		return 0, err
	}
	if err := d.request(); err != nil {
		return 0, err
	}
	if end := off + int64(len(p)); end > int64(len(d.data)) {
		if !d.growable {
			return 0, syscall.ENOSPC
		}
		d.data = append(d.data, make([]byte, end-int64(len(d.data)))...)
	}
	return copy(d.data[off:], p), nil
}

func (d *memDevice) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.request()
}

func (d *memDevice) snapshot() []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return bytes.Clone(d.data)
}

// qemuCheckResult is qemu-img check --output=json.
type qemuCheckResult struct {
	Corruptions int `json:"corruptions"`
	Leaks       int `json:"leaks"`
	CheckErrors int `json:"check-errors"`
}

// qemuCheck runs qemu-img check on a qcow2 image (exit 0 clean, 2
// corruptions, 3 leaks only; anything else fails the test). It shares the
// image (-U): tests judge images whose target is still open, holding
// qemu-img's writer locks, after the writer was closed.
func qemuCheck(t testing.TB, image string) qemuCheckResult {
	t.Helper()
	testutil.RequireTool(t, "qemu-img")
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("qemu-img", "check", "-U", "-f", "qcow2", "--output=json", image)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !(errors.As(err, &exit) && (exit.ExitCode() == 2 || exit.ExitCode() == 3)) {
		t.Fatalf("qemu-img check %s: %v\n%s%s", image, err, stdout.String(), stderr.String())
	}
	var res qemuCheckResult
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("qemu-img check %s: %v: %q %s", image, err, stdout.String(), stderr.String())
	}
	return res
}

// requireClean fails unless qemu-img check finds neither corruption nor
// leaks, and volagent's Check agrees.
func requireClean(t testing.TB, image string) {
	t.Helper()
	res := qemuCheck(t, image)
	if res != (qemuCheckResult{}) {
		out, _ := exec.Command("qemu-img", "check", "-U", "-f", "qcow2", image).CombinedOutput()
		t.Fatalf("qemu-img check %s: %+v\n%s", image, res, out)
	}
	requireCheckAgrees(t, image, res)
}

// requireCheckAgrees fails unless Check counts what qemu-img check counted.
func requireCheckAgrees(t testing.TB, image string, qemu qemuCheckResult) {
	t.Helper()
	f, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := f.Seek(0, 2)
	if err != nil {
		t.Fatal(err)
	}
	res, err := Check(f, size)
	if err != nil {
		t.Fatalf("Check %s: %v", image, err)
	}
	if got := (qemuCheckResult{res.Corruptions, res.Leaks, res.CheckErrors}); got != qemu {
		t.Fatalf("Check %s: %+v, qemu-img check: %+v (%+v)", image, got, qemu, res.Problems)
	}
}

// patternFill fills p with bytes that depend on seed and the guest offset,
// so a misplaced block is caught.
func patternFill(p []byte, seed int, guestOff int64) {
	for i := range p {
		x := uint64(guestOff+int64(i))*0x9e3779b97f4a7c15 + uint64(seed)*0xbf58476d1ce4e5b9
		p[i] = byte(x>>56) | 1 // never zero, so zero detection cannot hide it
	}
}

// writeRandomFile writes size pseudo-random bytes to path.
func writeRandomFile(t testing.TB, path string, size int64, seed uint64) []byte {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, seed^0x5555))
	b := make([]byte, size)
	for i := 0; i < len(b); i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < len(b); j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	// Some zero stretches, so zero handling is exercised too.
	for i := int64(0); i+8192 < size; i += 3 * 65536 {
		clear(b[i : i+8192])
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}

// openFileWriter opens image (a qcow2 file) for writing with O_DIRECT and
// its backing file (raw or qcow2 as recorded), closing both at cleanup.
func openFileWriter(t testing.TB, image string) (*Writer, *hostblk.Target) {
	t.Helper()
	tgt, err := hostblk.OpenTarget(image, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tgt.Close() })
	w, err := OpenWriter(tgt, tgt.Size, WriterOptions{BlockSize: tgt.BlockSize, Backing: backingOf(t, image), ContainerSize: tgt.ContainerSize()})
	if err != nil {
		t.Fatal(err)
	}
	return w, tgt
}

// backingOf opens the backing chain of a qcow2 image file (nil if none).
func backingOf(t testing.TB, image string) Disk {
	t.Helper()
	top, err := OpenChain(image, "qcow2", &Gate{AllowedRoots: []string{filepath.Dir(image), "/tmp", "/var/tmp"}})
	if err != nil {
		t.Fatal(err)
	}
	img := top.(*Image)
	if img.Backing() == nil {
		img.Close()
		return nil
	}
	return &chainBacking{Disk: img.Backing(), top: img}
}

// chainBacking is the backing disk of an opened chain; closing it closes
// the whole chain once.
type chainBacking struct {
	Disk
	top *Image
}

func (c *chainBacking) Close() error { return c.top.Close() }

// guestModel is the expected guest view of an image.
type guestModel []byte

func (m guestModel) write(p []byte, off int64) { copy(m[off:], p) }
func (m guestModel) zero(off, n int64)         { clear(m[off : off+n]) }

// compareWithQemu checks that qemu reads exactly the model from image
// (shared: the target may still be open).
func compareWithQemu(t testing.TB, image string, model []byte) {
	t.Helper()
	got := testutil.QemuGuestBytesShared(t, "qcow2", image)
	if len(got) != len(model) {
		t.Fatalf("qemu sees %d bytes, want %d", len(got), len(model))
	}
	if !bytes.Equal(got, model) {
		for i := range got {
			if got[i] != model[i] {
				t.Fatalf("qemu reads %#x at guest offset %d, want %#x", got[i], i, model[i])
			}
		}
	}
}
