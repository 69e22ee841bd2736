package testguest

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/volagent/volagent/internal/testutil"
)

// runQemu boots bootDisk (on bootBus: "ide" or "virtio") under KVM with
// data as a virtio-blk disk (driveOpts appended to its -drive) and
// returns the guest's serial output once it holds DONE, ERR or NOEXT, and how
// long that took from qemu's start. qemu is killed at cleanup.
func runQemu(t *testing.T, bootDisk, bootBus, data, driveOpts string) (string, time.Duration) {
	t.Helper()
	serial := filepath.Join(t.TempDir(), "serial.log")
	bootDevice := "ide-hd,drive=boot,bootindex=0"
	if bootBus == "virtio" {
		bootDevice = "virtio-blk-pci,drive=boot,bootindex=0"
	}
	cmd := exec.Command("qemu-system-x86_64", "-accel", "kvm", "-machine", "pc", "-m", "64", "-nodefaults", "-no-user-config",
		"-display", "none", "-monitor", "none", "-serial", "file:"+serial,
		"-drive", "if=none,id=boot,format=raw,file="+qemuPath(bootDisk), "-device", bootDevice,
		"-drive", "if=none,id=data,format=raw,file="+qemuPath(data)+driveOpts, "-device", "virtio-blk-pci,drive=data")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	started := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(50 * time.Millisecond) {
		out, _ := os.ReadFile(serial)
		if bytes.Contains(out, []byte(SerialDone)) || bytes.Contains(out, []byte(SerialError)) || bytes.Contains(out, []byte(SerialNoExt)) {
			return string(out), time.Since(started)
		}
		select {
		case err := <-exited:
			exited <- err // for the cleanup
			t.Fatalf("qemu exited before the guest finished: %v\nstderr: %s\nserial: %q", err, stderr.String(), out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest did not finish in 2 minutes: serial %q", out)
		}
	}
}

// qemuPath is path as a value of a qemu option: its commas doubled.
func qemuPath(path string) string { return strings.ReplaceAll(path, ",", ",,") }

// TestVirtioWriter boots the virtio writer under KVM and checks that
// every sector it wrote on its virtio-blk data disk, and its done marker,
// read back; with the boot disk on IDE and on virtio-blk (the writer
// must pick the data disk), and with a last request shorter than the
// others. On a read-only data disk it must report the failed request.
func TestVirtioWriter(t *testing.T) {
	testutil.RequireRoot(t) // /dev/kvm
	testutil.RequireTool(t, "qemu-system-x86_64")
	const sectors = 96<<20/SectorSize + 3 // not a whole number of requests
	for _, tc := range []struct {
		name, bootBus string
		w             Writer
	}{
		{"boot disk on IDE, default requests", "ide", Writer{Virtio: true, Sectors: sectors, DoneLBA: sectors + 2048}},
		{"boot disk on virtio, 24 of 256 KiB", "virtio", Writer{Virtio: true, Sectors: sectors, DoneLBA: sectors + 2048, InFlight: 24, RequestBytes: 256 << 10}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			boot := tc.w.BootDisk(t, dir)
			data := filepath.Join(dir, "data.raw")
			if err := os.WriteFile(data, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(data, int64(tc.w.DoneLBA+2048)*SectorSize); err != nil {
				t.Fatal(err)
			}
			out, took := runQemu(t, boot, tc.bootBus, data, "")
			if !strings.Contains(out, SerialDone) || strings.Contains(out, SerialError) {
				t.Fatalf("guest's serial output: %q", out)
			}
			t.Logf("%d MiB written in %v from qemu's start", tc.w.Sectors*SectorSize>>20, took)
			f, err := os.Open(data)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := tc.w.Verify(f); err != nil {
				t.Fatalf("what the guest wrote does not read back: %v", err)
			}
		})
	}

	t.Run("read-only data disk: ERR", func(t *testing.T) {
		dir := t.TempDir()
		w := Writer{Virtio: true, Sectors: 4096, DoneLBA: 8192}
		boot := w.BootDisk(t, dir)
		data := filepath.Join(dir, "data.raw")
		if err := os.WriteFile(data, make([]byte, 16<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		out, _ := runQemu(t, boot, "ide", data, ",readonly=on")
		if !strings.Contains(out, SerialError+" ") || strings.Contains(out, SerialDone) {
			t.Fatalf("guest's serial output on a read-only disk: %q, want %s and its status", out, SerialError)
		}
		t.Logf("serial: %q", out)
	})
}

// TestInt13Writer boots the int 13h writer under KVM with its data disk
// on virtio-blk (the BIOS's second disk) and checks what it wrote.
func TestInt13Writer(t *testing.T) {
	testutil.RequireRoot(t) // /dev/kvm
	testutil.RequireTool(t, "qemu-system-x86_64")
	dir := t.TempDir()
	w := Writer{Sectors: 16<<20/SectorSize + 5, DoneLBA: 16<<20/SectorSize + 64, PerCall: 127}
	boot := w.BootDisk(t, dir)
	data := filepath.Join(dir, "data.raw")
	if err := os.WriteFile(data, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(data, int64(w.DoneLBA+2048)*SectorSize); err != nil {
		t.Fatal(err)
	}
	out, _ := runQemu(t, boot, "ide", data, "")
	if !strings.Contains(out, SerialDone) || strings.Contains(out, SerialError) {
		t.Fatalf("guest's serial output: %q", out)
	}
	f, err := os.Open(data)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := w.Verify(f); err != nil {
		t.Fatalf("what the guest wrote does not read back: %v", err)
	}
}
