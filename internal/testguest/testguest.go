// Package testguest builds a guest without an operating system for tests
// that need a domain's own writes (not qemu-io's, which bypass the guest
// device's error policy): a boot sector (writer.S) that writes a known
// pattern over the second BIOS disk through int 13h, and the check of
// what it wrote. The boot sector is assembled at test time with binutils;
// no binary is committed.
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

// SectorSize is the size of the guest's sectors.
const SectorSize = 512

// Fill is the byte after the LBA in every sector the writer writes.
const Fill = 0xAB

// doneMagic starts the done marker sector.
const doneMagic = "TGDONE!!"

// Writer says what the boot sector writes on drive 0x81: Sectors
// sectors from LBA 0, then the done marker at DoneLBA.
type Writer struct {
	Sectors uint32
	DoneLBA uint32
	// PerCall is the number of sectors an int 13h call writes (1..127);
	// 0 means 64.
	PerCall int
}

// Serial output of the writer on COM1.
const (
	SerialDone  = "DONE"  // everything written
	SerialError = "ERR"   // a write failed (followed by the BIOS status)
	SerialNoExt = "NOEXT" // no int 13h extensions on drive 0x81
)

// BootDisk assembles the writer and returns a 1 MiB raw disk image in dir
// whose first sector is it.
func (w Writer) BootDisk(t testing.TB, dir string) string {
	t.Helper()
	testutil.RequireTool(t, "as", "ld")
	perCall := w.PerCall
	if perCall == 0 {
		perCall = 64
	}
	if perCall < 1 || perCall > 127 || w.Sectors == 0 || w.DoneLBA < w.Sectors {
		t.Fatalf("testguest: bad writer %+v: want 1..127 sectors a call, some sectors, the done marker after them", w)
	}
	src, obj, bin := filepath.Join(dir, "writer.S"), filepath.Join(dir, "writer.o"), filepath.Join(dir, "writer.bin")
	if err := os.WriteFile(src, writerSource, 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.Run(t, "as", "--32",
		"--defsym", fmt.Sprintf("SECTORS=%d", w.Sectors),
		"--defsym", fmt.Sprintf("PER_CALL=%d", perCall),
		"--defsym", fmt.Sprintf("DONE_LBA=%d", w.DoneLBA),
		"-o", obj, src)
	testutil.Run(t, "ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", bin, obj)
	sector, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if len(sector) != SectorSize || sector[510] != 0x55 || sector[511] != 0xaa {
		t.Fatalf("testguest: %s is %d bytes, not a boot sector", bin, len(sector))
	}
	disk := filepath.Join(dir, "boot.raw")
	if err := os.WriteFile(disk, sector, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 1<<20); err != nil {
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
