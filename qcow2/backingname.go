package qcow2

import (
	"strings"
	"unicode/utf8"
)

// ValidateBackingName checks a backing file name as an image records it.
// A safe name is a plain absolute or relative path: valid UTF-8, no NUL or
// control characters, no "json:" pseudo-protocol, and no "proto:" prefix
// (qemu treats a colon before the first slash as a protocol, e.g.
// "nbd:host:10809" or "file:x"). It returns every rule the name breaks.
func ValidateBackingName(name string) []*FieldError {
	var errs []*FieldError
	bad := func(format string, args ...any) {
		errs = append(errs, fieldErr(ErrBackingName, "backing_file", name, format, args...))
	}
	if name == "" {
		bad("empty")
		return errs
	}
	if len(name) > maxBackingNameLength {
		bad("longer than %d bytes", maxBackingNameLength)
	}
	if strings.IndexByte(name, 0) >= 0 {
		bad("contains a NUL byte")
	}
	if !utf8.ValidString(name) {
		bad("not valid UTF-8")
	}
	for _, c := range name {
		if (c < 0x20 && c != 0) || c == 0x7f { // NUL is reported above
			bad("contains control character %U", c)
			break
		}
	}
	if strings.HasPrefix(strings.ToLower(name), "json:") {
		bad("json: pseudo-protocol names can carry any driver option (CVE-2024-4467 class)")
	} else if proto, ok := protocolPrefix(name); ok {
		bad("%q is a protocol prefix; only plain paths are accepted", proto+":")
	}
	return errs
}

// protocolPrefix returns the protocol qemu would see in name: the text
// before a colon that precedes the first slash.
func protocolPrefix(name string) (string, bool) {
	colon := strings.IndexByte(name, ':')
	if colon < 0 {
		return "", false
	}
	if slash := strings.IndexByte(name, '/'); slash >= 0 && slash < colon {
		return "", false
	}
	return name[:colon], true
}
