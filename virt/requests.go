package virt

// Request pools: `virsh vol-create POOL overlay.xml` on a libvirt `dir`
// pool makes libvirt write a small qcow2 (qemu-img create -f qcow2 -b ...
// -F ...) into the pool's directory. volagent reads that file as a
// request, with its own parser, and never trusts libvirt's volume XML for
// formats (pool refresh probes them).

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	"libvirt.org/go/libvirt"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/qcow2"
)

// maxRequestFile bounds a request file: libvirt writes only a header and
// empty tables (a few hundred KiB even for large virtual sizes).
const maxRequestFile = 64 << 20

// EnsureRequestPool makes sure libvirt has a running `dir` pool called
// name whose target is dir: it defines, builds and starts it if missing,
// starts it if inactive, and sets it to autostart. It returns an error
// if a pool of that name exists with another type or target.
func EnsureRequestPool(conn *libvirt.Connect, name, dir string) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("request pool %q: directory %q: want an absolute path", name, dir)
	}
	pool, err := conn.LookupStoragePoolByName(name)
	if err != nil {
		var lerr libvirt.Error
		if !errors.As(err, &lerr) || lerr.Code != libvirt.ERR_NO_STORAGE_POOL {
			return fmt.Errorf("request pool %q: %w", name, err)
		}
		if err := MakeRequestDir(filepath.Dir(dir), dir, nil); err != nil {
			return fmt.Errorf("request pool %q: %w", name, err)
		}
		xml := fmt.Sprintf("<pool type='dir'><name>%s</name><target><path>%s</path></target></pool>", xmlEscape(name), xmlEscape(dir))
		if pool, err = conn.StoragePoolDefineXML(xml, 0); err != nil {
			return fmt.Errorf("defining request pool %q: %w", name, err)
		}
	} else if err := checkRequestPool(pool, name, dir); err != nil {
		pool.Free()
		return err
	}
	defer pool.Free()
	active, err := pool.IsActive()
	if err != nil {
		return fmt.Errorf("request pool %q: %w", name, err)
	}
	if !active {
		if err := pool.Create(0); err != nil {
			return fmt.Errorf("starting request pool %q: %w", name, err)
		}
	}
	if err := pool.SetAutostart(true); err != nil {
		return fmt.Errorf("request pool %q: autostart: %w", name, err)
	}
	return nil
}

func checkRequestPool(pool *libvirt.StoragePool, name, dir string) error {
	xml, err := pool.GetXMLDesc(0)
	if err != nil {
		return fmt.Errorf("request pool %q: %w", name, err)
	}
	if !strings.Contains(xml, "<pool type='dir'") || !strings.Contains(xml, "<path>"+xmlEscape(dir)+"</path>") {
		return fmt.Errorf("libvirt pool %q exists but is not a dir pool on %q; volagent will not take it over", name, dir)
	}
	return nil
}

func xmlEscape(s string) string {
	r := strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", "'", "&apos;", `"`, "&quot;")
	return r.Replace(s)
}

// ReadOverlayRequest reads the qcow2 request file libvirt wrote at path
// for `virsh vol-create` on volagent pool poolName, and turns it into an
// OverlayRequest with the same backing name and format, the volume named
// after the file. It refuses (ErrPolicyViolation, naming the field and the
// value) a request whose header breaks any rule (no recorded backing
// format, a json: or protocol name, a data file, ...), one without a
// backing file, with a relative backing name, or with a backing file under
// none of roots (checked by name; the Manager opens it through its gate).
// The file is opened without following symlinks, and must be a regular
// file.
func ReadOverlayRequest(path, poolName string, roots []string) (backend.OverlayRequest, error) {
	req := backend.OverlayRequest{Pool: poolName, Name: strings.TrimSuffix(filepath.Base(path), ".qcow2")}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		return req, fmt.Errorf("%w: request %s: %w", backend.ErrInvalidArgument, path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return req, fmt.Errorf("%w: request %s: %w", backend.ErrFailed, path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return req, fmt.Errorf("%w: request %s: not a regular file", backend.ErrInvalidArgument, path)
	}
	if st.Size > maxRequestFile {
		return req, fmt.Errorf("%w: request %s: %d bytes; a request is a header of at most %d", backend.ErrInvalidArgument, path, st.Size, maxRequestFile)
	}
	h, err := qcow2.ReadHeader(f, st.Size)
	if err != nil {
		if qcow2.IsRefusal(err) {
			return req, fmt.Errorf("%w: request %s: %w", backend.ErrPolicyViolation, path, err)
		}
		return req, fmt.Errorf("%w: request %s: %w", backend.ErrFailed, path, err)
	}
	if !h.HasBacking() {
		return req, fmt.Errorf("%w: request %s: backing_file = \"\": a request names the backing of the overlay (<backingStore> with <path> and <format>)", backend.ErrPolicyViolation, path)
	}
	if !filepath.IsAbs(h.BackingFile) {
		return req, fmt.Errorf("%w: request %s: backing_file = %q: want an absolute path", backend.ErrPolicyViolation, path, h.BackingFile)
	}
	gate := qcow2.Gate{AllowedRoots: roots}
	if _, err := gate.CheckLexical(path, h.BackingFile); err != nil {
		return req, fmt.Errorf("%w: request %s: %w", backend.ErrPolicyViolation, path, err)
	}
	req.BackingPath, req.BackingFormat, req.VirtualSize = h.BackingFile, h.BackingFormat, int64(h.Size)
	return req, nil
}
