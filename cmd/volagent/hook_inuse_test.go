package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
)

// holdWriterLocks takes qemu-img's writer locks on path through a file
// description of its own, as volagent import does, until the test ends.
func holdWriterLocks(t *testing.T, path string) *hostblk.ImageLock {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	l, err := hostblk.LockImage(f, hostblk.WriterLocks)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// hookVerdictOn runs the hook (local policy, the given mode) on a domain
// with one disk and returns its error and stderr.
func hookVerdictOn(t *testing.T, mode string, roots []string, disk string) (error, string) {
	t.Helper()
	opts := defaultHookOptions()
	opts.offline, opts.allowBacking, opts.mode = true, roots, mode
	var stderr bytes.Buffer
	err := runHookQemu(context.Background(), opts, []string{"vm", "prepare", "begin", "-"},
		strings.NewReader(testutil.DomainXML("vm", disk)), &stderr)
	return err, stderr.String()
}

// TestHookRefusesImagesInUse: a domain whose top or backing image another
// process is writing (qemu-img's writer locks, as volagent import holds
// them) does not start, in enforce and in audit mode: libvirt's qemu, in a
// private /dev, would not see those locks itself. Once they are released
// the domain starts.
func TestHookRefusesImagesInUse(t *testing.T) {
	im := makeHookImages(t)
	disk := testutil.FileDiskXML("vda", "qcow2", im.overlay)
	for _, held := range []string{im.overlay, im.base} {
		for _, mode := range []string{"enforce", "audit"} {
			t.Run(filepath.Base(held)+"/"+mode, func(t *testing.T) {
				l := holdWriterLocks(t, held)
				err, stderr := hookVerdictOn(t, mode, []string{im.root}, disk)
				if hookExitCode(err) != exitHookRefused || !strings.Contains(stderr, "disk vda: "+held+": in use by") {
					t.Fatalf("%s held: exit %d (%v), stderr %q; want refused, naming the image", held, hookExitCode(err), err, stderr)
				}
				if err := l.Release(); err != nil {
					t.Fatal(err)
				}
				if err, stderr := hookVerdictOn(t, mode, []string{im.root}, disk); err != nil {
					t.Fatalf("after release: %v\n%s", err, stderr)
				}
			})
		}
	}
}

// TestHookInUseThroughAnotherNode: the writer holds its locks on another
// node of the block device than the one the domain names (the host's
// /dev/loopN against a private /dev's node): the hook still refuses.
func TestHookInUseThroughAnotherNode(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "qemu-img")
	dev := looptest.Device(t, 64<<20, 512)
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", dev, "32M")
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	node := filepath.Join(t.TempDir(), "private-dev-node")
	if err := unix.Mknod(node, unix.S_IFBLK|0o600, int(st.Rdev)); err != nil {
		t.Fatal(err)
	}
	holdWriterLocks(t, node)
	disk := fmt.Sprintf("<disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='%s'/><target dev='vda' bus='virtio'/></disk>", dev)
	err, stderr := hookVerdictOn(t, "enforce", nil, disk)
	if hookExitCode(err) != exitHookRefused || !strings.Contains(stderr, "held through another node") {
		t.Fatalf("exit %d (%v), stderr %q; want refused for the lock on %s", hookExitCode(err), err, stderr, node)
	}
}
