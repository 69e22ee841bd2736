package testguest

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
)

// image is what the writer leaves on its disk.
func image(w Writer) []byte {
	b := make([]byte, (int(w.DoneLBA)+1)*SectorSize)
	for i := range b {
		b[i] = Fill
	}
	for lba := 0; lba < int(w.Sectors); lba++ {
		binary.LittleEndian.PutUint64(b[lba*SectorSize:], uint64(lba))
	}
	marker := b[int(w.DoneLBA)*SectorSize:]
	copy(marker, doneMagic)
	binary.LittleEndian.PutUint64(marker[8:], uint64(w.Sectors))
	// Between the data and the marker: never written, zeros.
	for i := int(w.Sectors) * SectorSize; i < int(w.DoneLBA)*SectorSize; i++ {
		b[i] = 0
	}
	return b
}

func TestVerify(t *testing.T) {
	w := Writer{Sectors: 5000, DoneLBA: 5100}
	good := image(w)
	if err := w.Verify(bytes.NewReader(good)); err != nil {
		t.Fatalf("Verify of what the writer writes: %v", err)
	}

	lost := bytes.Clone(good)
	clear(lost[4321*SectorSize : 4323*SectorSize]) // two writes lost: the backing's zeros
	if err := w.Verify(bytes.NewReader(lost)); err == nil || !strings.Contains(err.Error(), "2 of the 5000") || !strings.Contains(err.Error(), "LBA 4321") {
		t.Fatalf("Verify with two lost sectors: %v", err)
	}

	misplaced := bytes.Clone(good)
	binary.LittleEndian.PutUint64(misplaced[7*SectorSize:], 8) // sector 8's data at LBA 7
	if err := w.Verify(bytes.NewReader(misplaced)); err == nil || !strings.Contains(err.Error(), "LBA 7") {
		t.Fatalf("Verify with a misplaced sector: %v", err)
	}

	noMarker := bytes.Clone(good)
	clear(noMarker[int(w.DoneLBA)*SectorSize:])
	if err := w.Verify(bytes.NewReader(noMarker)); err == nil || !strings.Contains(err.Error(), "done marker") {
		t.Fatalf("Verify without the done marker: %v", err)
	}
}
