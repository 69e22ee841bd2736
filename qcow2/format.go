package qcow2

import (
	"errors"
	"fmt"
)

// Format is an image format volagent reads and writes. It is always given
// by the caller or recorded in a header, never guessed from content.
type Format string

// The formats volagent knows.
const (
	FormatRaw   Format = "raw"
	FormatQcow2 Format = "qcow2"
)

// ErrUnknownFormat: a format name other than raw or qcow2.
var ErrUnknownFormat = errors.New("unknown image format")

// ParseFormat is the one check of a format name from a caller, a flag, a
// request or a header: "raw" or "qcow2", exactly. Anything else, "" too,
// is an error wrapping ErrUnknownFormat that quotes the value; callers
// prefix the field or flag it came from.
func ParseFormat(s string) (Format, error) {
	switch f := Format(s); f {
	case FormatRaw, FormatQcow2:
		return f, nil
	}
	return "", fmt.Errorf("%w %q: want \"raw\" or \"qcow2\" (formats are never guessed)", ErrUnknownFormat, s)
}

func (f Format) String() string { return string(f) }
