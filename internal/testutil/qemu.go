package testutil

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// QemuImg runs qemu-img with args, fails the test if it fails, and returns
// its stdout. Callers always pass formats explicitly (-f, -F, -O): qemu's
// own probing is exactly what volagent avoids, so tests must not rely on it.
func QemuImg(t testing.TB, args ...string) []byte {
	t.Helper()
	RequireTool(t, "qemu-img")
	return Run(t, "qemu-img", args...)
}

// QemuIO opens image as format with qemu-io and runs each command (for
// example "write -P 0xab 0 64k", "write -z 1m 64k", "discard 0 64k",
// "write -c 0 64k") in order, failing the test if qemu-io fails or reports
// a failed command. Backing files open with the format their header records.
func QemuIO(t testing.TB, format, image string, commands ...string) []byte {
	t.Helper()
	RequireTool(t, "qemu-io")
	args := []string{"-f", format}
	for _, c := range commands {
		args = append(args, "-c", c)
	}
	// qemu-io reports a failed command on stdout (and exits 1); show it.
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("qemu-io", append(args, image)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil || strings.Contains(stdout.String(), " failed: ") {
		t.Fatalf("qemu-io %q on %s: %v\nstdout: %s\nstderr: %s", commands, image, err, stdout.String(), stderr.String())
	}
	return stdout.Bytes()
}

// MakeQcow2 creates a qcow2 image at path with `qemu-img create -f qcow2`,
// the given -o options ("" for none) and size (qemu syntax, e.g. "4M").
// With a backing file, pass backing and its format; both or neither.
func MakeQcow2(t testing.TB, path, options, size, backing, backingFormat string) {
	t.Helper()
	args := []string{"create", "-q", "-f", "qcow2"}
	if options != "" {
		args = append(args, "-o", options)
	}
	if backing != "" || backingFormat != "" {
		if backing == "" || backingFormat == "" {
			t.Fatalf("MakeQcow2(%s): backing %q needs a backing format (and vice versa)", path, backing)
		}
		args = append(args, "-b", backing, "-F", backingFormat)
	}
	args = append(args, path)
	if size != "" {
		args = append(args, size)
	}
	QemuImg(t, args...)
}

// QemuGuestBytes returns what qemu sees as the guest content of image read
// as format (through its backing chain): `qemu-img convert -O raw`.
func QemuGuestBytes(t testing.TB, format, image string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "qemu-guest.raw")
	QemuImg(t, "convert", "-f", format, "-O", "raw", image, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// QemuGuestBytesShared is QemuGuestBytes with -U (force-share): for an
// image volagent still holds open (with qemu-img's writer locks) after its
// writer was closed and flushed.
func QemuGuestBytesShared(t testing.TB, format, image string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "qemu-guest.raw")
	QemuImg(t, "convert", "-U", "-f", format, "-O", "raw", image, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
