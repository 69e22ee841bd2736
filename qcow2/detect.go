package qcow2

import "bytes"

// DetectSize is how many leading bytes DetectImageHeader looks at.
const DetectSize = 512

// imageMagics are the signatures format-probing tools (qemu's probes among
// them) recognise at the start of a file. A raw disk that starts with one
// would be misread by any tool that guesses formats.
var imageMagics = []struct {
	format string
	offset int
	magic  []byte
}{
	{"qcow2", 0, []byte("QFI\xfb\x00\x00\x00\x02")},
	{"qcow2", 0, []byte("QFI\xfb\x00\x00\x00\x03")},
	{"qcow", 0, []byte("QFI\xfb")},
	{"qed", 0, []byte("QED\x00")},
	{"vmdk", 0, []byte("KDMV")},
	{"vmdk", 0, []byte("# Disk DescriptorFile")},
	{"vhdx", 0, []byte("vhdxfile")},
	{"vpc", 0, []byte("conectix")},
	{"vdi", 0x40, []byte{0x7f, 0x10, 0xda, 0xbe}},
	{"luks", 0, []byte("LUKS\xba\xbe")},
	{"parallels", 0, []byte("WithoutFreeSpace")},
	{"parallels", 0, []byte("WithouFreSpacExt")},
	{"bochs", 0, []byte("Bochs Virtual HD Image")},
	{"cloop", 0, []byte("#!/bin/sh\n#V2.0 Format\n")},
}

// DetectImageHeader reports which image format's signature the given
// leading bytes of a file (DetectSize of them suffice) carry, or "" if none.
// It is for reporting only: volagent never chooses a format from it.
func DetectImageHeader(head []byte) string {
	for _, m := range imageMagics {
		if len(head) >= m.offset+len(m.magic) && bytes.Equal(head[m.offset:m.offset+len(m.magic)], m.magic) {
			return m.format
		}
	}
	return ""
}
