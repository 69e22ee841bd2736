// Package testguest builds guests without an operating system for tests
// that need a domain's own writes (not qemu-io's, which bypass the guest
// device's error policy): boot programs that write a known pattern over
// a data disk, and the check of what they wrote. writer.S, a boot sector,
// writes the second BIOS disk through int 13h, one 63.5 KiB request at a
// time; virtio.S (Writer.Virtio) drives a virtio-blk data disk itself
// from 32-bit protected mode with many large requests in flight, as fast
// as the host takes them. Both write the same pattern and done marker.
// They are assembled at test time with binutils; no binary is committed.
package testguest

import (
	"bytes"
	_ "embed"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/volagent/volagent/internal/testutil"
)

//go:embed writer.S
var writerSource []byte

//go:embed virtio.S
var virtioSource []byte

// serialSource is the COM1 output both writers include.
//
//go:embed serial.inc
var serialSource []byte

// virtioLoadSectors is how many sectors after the boot sector virtio.S
// loads from the boot disk: all of its code and data.
const virtioLoadSectors = 8

// bootDiskSize is the size of the boot disk BootDisk makes.
const bootDiskSize = 1 << 20

// SectorSize is the size of the guest's sectors.
const SectorSize = 512

// Fill is the byte after the LBA in every sector the writer writes.
const Fill = 0xAB

// doneMagic starts the done marker sector.
const doneMagic = "TGDONE!!"

// Writer says what the guest writes on its data disk: Sectors sectors
// from LBA 0, then the done marker at DoneLBA.
type Writer struct {
	Sectors uint32
	DoneLBA uint32
	// PerCall is the number of sectors an int 13h call writes (1..127);
	// 0 means 64. The int 13h writer only.
	PerCall int

	// Virtio selects virtio.S: the data disk is the first virtio-blk
	// device on PCI bus 0 (legacy interface, as qemu's transitional
	// virtio-blk-pci on the pc machine has) whose capacity reaches past
	// DoneLBA, which must lie past the 1 MiB boot disk; the boot disk may
	// be on any bus SeaBIOS boots from, virtio included.
	Virtio bool
	// InFlight is how many requests the virtio writer keeps in flight
	// (1..64); 0 means 16.
	InFlight int
	// RequestBytes is the size of the virtio writer's requests, a
	// multiple of the sector size; 0 means 1 MiB. InFlight requests
	// must fit in 32 MiB of guest memory.
	RequestBytes int
}

// Serial output of the writer on COM1.
const (
	SerialDone  = "DONE"    // everything written
	SerialStart = "WRITING" // the virtio writer starts writing
	SerialError = "ERR"     // a write failed (followed by the BIOS or virtio status, or what failed)
	SerialNoExt = "NOEXT"   // no int 13h extensions on drive 0x81
)

// BootDisk assembles the writer and returns a 1 MiB raw disk image in dir
// that boots it.
func (w Writer) BootDisk(t testing.TB, dir string) string {
	t.Helper()
	testutil.RequireTool(t, "as", "ld")
	if w.Sectors == 0 || w.DoneLBA < w.Sectors {
		t.Fatalf("testguest: bad writer %+v: want some sectors, the done marker after them", w)
	}
	var source []byte
	var syms []string
	if w.Virtio {
		inFlight, reqBytes := w.InFlight, w.RequestBytes
		if inFlight == 0 {
			inFlight = 16
		}
		if reqBytes == 0 {
			reqBytes = 1 << 20
		}
		if inFlight < 1 || inFlight > 64 || reqBytes < SectorSize || reqBytes%SectorSize != 0 || inFlight*reqBytes > 32<<20 || w.DoneLBA < bootDiskSize/SectorSize {
			t.Fatalf("testguest: bad virtio writer %+v: want 1..64 requests in flight of whole sectors, 32 MiB at most in all, the done marker past the boot disk's %d sectors", w, bootDiskSize/SectorSize)
		}
		source = virtioSource
		syms = []string{"INFLIGHT=" + fmt.Sprint(inFlight), "REQ_BYTES=" + fmt.Sprint(reqBytes), "LOAD_SECTORS=" + fmt.Sprint(virtioLoadSectors)}
	} else {
		perCall := w.PerCall
		if perCall == 0 {
			perCall = 64
		}
		if perCall < 1 || perCall > 127 {
			t.Fatalf("testguest: bad writer %+v: want 1..127 sectors a call", w)
		}
		source = writerSource
		syms = []string{"PER_CALL=" + fmt.Sprint(perCall)}
	}
	syms = append(syms, "SECTORS="+fmt.Sprint(w.Sectors), "DONE_LBA="+fmt.Sprint(w.DoneLBA))
	src, obj, bin := filepath.Join(dir, "writer.S"), filepath.Join(dir, "writer.o"), filepath.Join(dir, "writer.bin")
	if err := os.WriteFile(src, source, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "serial.inc"), serialSource, 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"--32", "-I", dir} // serial.inc
	for _, sym := range syms {
		args = append(args, "--defsym", sym)
	}
	testutil.Run(t, "as", append(args, "-o", obj, src)...)
	testutil.Run(t, "ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", bin, obj)
	code, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	size := SectorSize // what the BIOS loads
	if w.Virtio {
		size += virtioLoadSectors * SectorSize // what the boot sector loads
	}
	if len(code) < SectorSize || len(code) > size || (!w.Virtio && len(code) != SectorSize) || code[510] != 0x55 || code[511] != 0xaa {
		t.Fatalf("testguest: %s is %d bytes, not a boot sector and at most %d bytes", bin, len(code), size)
	}
	disk := filepath.Join(dir, "boot.raw")
	if err := os.WriteFile(disk, code, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, bootDiskSize); err != nil {
		t.Fatal(err)
	}
	return disk
}

// Verify reads what the writer wrote from r (the guest's disk, raw) and
// returns an error naming the first sector that is not what the writer
// wrote, and how many are wrong.
func (w Writer) Verify(r io.ReaderAt) error {
	const batch = 2048 // sectors read at once
	buf := make([]byte, batch*SectorSize)
	want := make([]byte, SectorSize)
	for i := 8; i < SectorSize; i++ {
		want[i] = Fill
	}
	bad, first := 0, int64(-1)
	for lba := uint32(0); lba < w.Sectors; lba += batch {
		n := min(batch, w.Sectors-lba)
		if _, err := r.ReadAt(buf[:n*SectorSize], int64(lba)*SectorSize); err != nil {
			return fmt.Errorf("reading sectors %d-%d: %w", lba, lba+n-1, err)
		}
		for i := uint32(0); i < n; i++ {
			binary.LittleEndian.PutUint64(want, uint64(lba+i))
			if !bytes.Equal(buf[i*SectorSize:(i+1)*SectorSize], want) {
				if first < 0 {
					first = int64(lba + i)
				}
				bad++
			}
		}
	}
	if bad > 0 {
		return fmt.Errorf("%d of the %d sectors the guest wrote read back wrong, the first at LBA %d", bad, w.Sectors, first)
	}
	marker := make([]byte, SectorSize)
	if _, err := r.ReadAt(marker, int64(w.DoneLBA)*SectorSize); err != nil {
		return fmt.Errorf("reading the done marker: %w", err)
	}
	if string(marker[:8]) != doneMagic || binary.LittleEndian.Uint64(marker[8:16]) != uint64(w.Sectors) || !allFill(marker[16:]) {
		return fmt.Errorf("done marker at LBA %d is wrong: % x", w.DoneLBA, marker[:32])
	}
	return nil
}

func allFill(b []byte) bool {
	for _, c := range b {
		if c != Fill {
			return false
		}
	}
	return true
}
