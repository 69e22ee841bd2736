package virt

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"libvirt.org/go/libvirt"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/internal/testutil"
)

// TestVirtRequestPool defines a request pool through libvirt and reads the
// files `virsh vol-create` makes there with volagent's parser.
func TestVirtRequestPool(t *testing.T) {
	testutil.StartLibvirtd(t, testutil.LibvirtdOptions{})
	conn, err := libvirt.NewConnect(testutil.LibvirtURI)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	dir := t.TempDir()
	roots, outside, requests := filepath.Join(dir, "images"), filepath.Join(dir, "outside"), filepath.Join(dir, "requests")
	for _, d := range []string{roots, outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	base := filepath.Join(roots, "base.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", base, "16M")
	outsideBase := filepath.Join(outside, "base.raw")
	testutil.QemuImg(t, "create", "-q", "-f", "raw", outsideBase, "16M")

	pool := testutil.TestDomainPrefix + "requests"
	t.Cleanup(func() {
		_, _, _ = testutil.Virsh("pool-destroy", pool)
		_, _, _ = testutil.Virsh("pool-undefine", pool)
	})
	for i := 0; i < 2; i++ { // the second call finds it in place
		if err := EnsureRequestPool(conn, pool, requests); err != nil {
			t.Fatalf("EnsureRequestPool (call %d): %v", i+1, err)
		}
	}
	if err := EnsureRequestPool(conn, pool, filepath.Join(dir, "elsewhere")); err == nil {
		t.Fatal("EnsureRequestPool took over a pool with another directory")
	}

	volCreate := func(name, backing, format string) string {
		t.Helper()
		formatXML := ""
		if format != "" {
			formatXML = fmt.Sprintf("<format type='%s'/>", format)
		}
		xml := fmt.Sprintf("<volume><name>%s.qcow2</name><capacity unit='MiB'>32</capacity><target><format type='qcow2'/></target>"+
			"<backingStore><path>%s</path>%s</backingStore></volume>", name, backing, formatXML)
		path := filepath.Join(t.TempDir(), name+".xml")
		if err := os.WriteFile(path, []byte(xml), 0o644); err != nil {
			t.Fatal(err)
		}
		testutil.MustVirsh(t, "vol-create", pool, path)
		return filepath.Join(requests, name+".qcow2")
	}

	good := volCreate("vm1", base, "raw")
	req, err := ReadOverlayRequest(good, "p", []string{roots})
	if err != nil {
		t.Fatal(err)
	}
	want := backend.OverlayRequest{Pool: "p", Name: "vm1", BackingPath: base, BackingFormat: "raw", VirtualSize: 32 << 20}
	if req != want {
		t.Fatalf("request %+v, want %+v", req, want)
	}

	bad := volCreate("vm2", outsideBase, "raw")
	if _, err := ReadOverlayRequest(bad, "p", []string{roots}); !errors.Is(err, backend.ErrPolicyViolation) {
		t.Fatalf("backing outside the roots: %v, want ErrPolicyViolation", err)
	}
	// Without a format in the XML libvirt records raw (it never omits it
	// in a dir pool), so such a request reads as raw, not as a probe.
	noFormat := volCreate("vm3", base, "")
	if req, err := ReadOverlayRequest(noFormat, "p", []string{roots}); err != nil || req.BackingFormat != "raw" {
		t.Fatalf("request without a format in the XML: %+v, %v", req, err)
	}
	// A symlink planted in the pool directory is not followed.
	link := filepath.Join(requests, "vm4.qcow2")
	if err := os.Symlink(good, link); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadOverlayRequest(link, "p", []string{roots}); !errors.Is(err, backend.ErrInvalidArgument) {
		t.Fatalf("symlinked request: %v, want ErrInvalidArgument", err)
	}
}
