package qcow2

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Every validation failure wraps exactly one of them in a
// *FieldError that names the header field and the value found, so callers
// test the kind with errors.Is and show the FieldError to people.
var (
	// ErrNotQcow2: the magic is not "QFI\xfb".
	ErrNotQcow2 = errors.New("not a qcow2 image")
	// ErrTruncated: the image ends before a structure the header describes.
	ErrTruncated = errors.New("image truncated")
	// ErrInvalidHeader: a header field breaks the qcow2 specification.
	ErrInvalidHeader = errors.New("invalid qcow2 header")
	// ErrInvalidExtension: a header extension is malformed or duplicated.
	ErrInvalidExtension = errors.New("invalid qcow2 header extension")
	// ErrTooLarge: a size exceeds what qemu accepts or what volagent allocates.
	ErrTooLarge = errors.New("size exceeds limit")
	// ErrOutOfBounds: a table or structure lies outside the image.
	ErrOutOfBounds = errors.New("outside the image")
	// ErrIncompatibleFeature: an incompatible feature bit volagent does not know.
	ErrIncompatibleFeature = errors.New("unknown incompatible feature")
	// ErrUnsupported: a valid qcow2 feature volagent does not handle.
	ErrUnsupported = errors.New("unsupported qcow2 feature")
	// ErrCorrupt: the image is flagged corrupt, or a table entry is invalid.
	ErrCorrupt = errors.New("image corrupt")
	// ErrEncrypted: the image is encrypted (volagent refuses encryption).
	ErrEncrypted = errors.New("encrypted image refused")
	// ErrDataFile: the image uses an external data file (CVE-2024-4467 class).
	ErrDataFile = errors.New("external data file refused")
	// ErrBackingName: the backing file name is unsafe (protocol, json:, NUL, ...).
	ErrBackingName = errors.New("unsafe backing file name")
	// ErrBackingFormatMissing: a backing file without a recorded format; using
	// it would mean probing.
	ErrBackingFormatMissing = errors.New("backing file format not recorded")
	// ErrBackingFormat: a recorded backing format other than raw or qcow2.
	ErrBackingFormat = errors.New("backing file format refused")
	// ErrNotAllowed: the gate refused to open a referenced file.
	ErrNotAllowed = errors.New("referenced file not allowed")
	// ErrChain: the backing chain is too deep or loops.
	ErrChain = errors.New("invalid backing chain")
	// ErrFormat: an image's content does not match the format it was given as.
	ErrFormat = errors.New("image format mismatch")
	// ErrHeaderInRaw: a raw image starts with another format's header; any
	// tool that probes formats would misread it (the guest-written header attack).
	ErrHeaderInRaw = errors.New("raw image carries an image header")
)

// FieldError is one violation: which field, which value, and why.
type FieldError struct {
	Field  string // header field or extension, e.g. "cluster_bits"
	Value  any    // the offending value as read (strings are quoted when shown)
	Reason string // what is wrong, for a person
	Err    error  // the sentinel, for errors.Is
}

func (e *FieldError) Error() string {
	v := e.Value
	if s, ok := v.(string); ok {
		v = fmt.Sprintf("%q", s)
	}
	if e.Reason == "" {
		return fmt.Sprintf("%v: %s = %v", e.Err, e.Field, v)
	}
	return fmt.Sprintf("%v: %s = %v: %s", e.Err, e.Field, v, e.Reason)
}

func (e *FieldError) Unwrap() error { return e.Err }

// hex shows a value in hexadecimal, e.g. a feature bit mask.
type hex uint64

func (h hex) String() string { return fmt.Sprintf("%#x", uint64(h)) }

func fieldErr(sentinel error, field string, value any, format string, args ...any) *FieldError {
	return &FieldError{Field: field, Value: value, Reason: fmt.Sprintf(format, args...), Err: sentinel}
}

// ValidationError lists every violation found in one image header. It
// unwraps to each violation, so errors.Is(err, ErrDataFile) reports whether
// any violation is of that kind.
type ValidationError struct {
	Violations []*FieldError
}

func (e *ValidationError) Error() string {
	parts := make([]string, len(e.Violations))
	for i, v := range e.Violations {
		parts[i] = v.Error()
	}
	return strings.Join(parts, "; ")
}

func (e *ValidationError) Unwrap() []error {
	errs := make([]error, len(e.Violations))
	for i, v := range e.Violations {
		errs[i] = v
	}
	return errs
}

// Violations returns the violations an error carries: those of a
// ValidationError, a lone FieldError, or nil for any other error (an I/O
// error is not a verdict on the image).
func Violations(err error) []*FieldError {
	var ve *ValidationError
	if errors.As(err, &ve) {
		return ve.Violations
	}
	var fe *FieldError
	if errors.As(err, &fe) {
		return []*FieldError{fe}
	}
	return nil
}

// IsRefusal reports whether err is a verdict on the image (it broke a rule)
// rather than an I/O or usage failure.
func IsRefusal(err error) bool { return len(Violations(err)) > 0 }

// codes are stable machine-readable names of the sentinels, for JSON output
// and D-Bus clients that should not match on English text.
var codes = map[error]string{
	ErrNotQcow2:             "not-qcow2",
	ErrTruncated:            "truncated",
	ErrInvalidHeader:        "invalid-header",
	ErrInvalidExtension:     "invalid-extension",
	ErrTooLarge:             "too-large",
	ErrOutOfBounds:          "out-of-bounds",
	ErrIncompatibleFeature:  "incompatible-feature",
	ErrUnsupported:          "unsupported",
	ErrCorrupt:              "corrupt",
	ErrEncrypted:            "encrypted",
	ErrDataFile:             "data-file",
	ErrBackingName:          "backing-name",
	ErrBackingFormatMissing: "backing-format-missing",
	ErrBackingFormat:        "backing-format",
	ErrNotAllowed:           "not-allowed",
	ErrChain:                "chain",
	ErrFormat:               "format-mismatch",
	ErrHeaderInRaw:          "header-in-raw",
}

// Code is the stable name of the violation's kind, e.g. "data-file".
func (e *FieldError) Code() string {
	if c, ok := codes[e.Err]; ok {
		return c
	}
	return "other"
}
