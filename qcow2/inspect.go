package qcow2

import (
	"fmt"
	"io"
)

// Inspect judges the image in r (size bytes, at path, given as format "qcow2"
// or "raw") without opening anything else: for qcow2 the header facts and
// every violation, with the backing name resolved as the kernel would walk
// it (lstat and readlink only: the named file is never opened) and checked
// against roots when roots are given; for raw whether the content starts with an image
// header. The error is nil for any verdict; it is non-nil only for a bad
// format argument or an I/O error, when there is no verdict.
func Inspect(r io.ReaderAt, size int64, path, format string, roots []string) (*Report, error) {
	if _, err := ParseFormat(format); err != nil {
		return nil, fmt.Errorf("format: %w", err)
	}
	rep := &Report{Path: path, Format: format, ImageSize: size, Violations: []ReportViolation{}}
	var verdictErr error
	if format == "raw" {
		verdictErr = inspectRaw(r, rep)
	} else {
		verdictErr = inspectQcow2(r, size, path, roots, rep)
	}
	if verdictErr != nil && !IsRefusal(verdictErr) {
		return nil, verdictErr
	}
	for _, v := range Violations(verdictErr) {
		rep.Violations = append(rep.Violations, ReportViolation{Code: v.Code(), Field: v.Field, Value: fmt.Sprint(v.Value), Message: v.Error()})
	}
	rep.Verdict = "accepted"
	if len(rep.Violations) > 0 {
		rep.Verdict = "refused"
	}
	return rep, nil
}

// Report is the verdict of an inspection with the facts behind it; the JSON
// field names are stable (the CLI prints them, D-Bus clients get them).
type Report struct {
	Path           string            `json:"path"`
	Format         string            `json:"format"`
	ImageSize      int64             `json:"image-size"`
	Qcow2          *Facts            `json:"qcow2,omitempty"`
	DetectedHeader string            `json:"detected-header,omitempty"`
	Verdict        string            `json:"verdict"`
	Violations     []ReportViolation `json:"violations"`
}

type Facts struct {
	Version               uint32          `json:"version"`
	VirtualSize           uint64          `json:"virtual-size"`
	ClusterSize           int64           `json:"cluster-size"`
	RefcountBits          int             `json:"refcount-bits"`
	CompressionType       string          `json:"compression-type"`
	ExtendedL2            bool            `json:"extended-l2"`
	LazyRefcounts         bool            `json:"lazy-refcounts"`
	Dirty                 bool            `json:"dirty"`
	IncompatibleFeatures  uint64          `json:"incompatible-features"`
	CompatibleFeatures    uint64          `json:"compatible-features"`
	AutoclearFeatures     uint64          `json:"autoclear-features"`
	L1Size                uint32          `json:"l1-size"`
	L1TableOffset         uint64          `json:"l1-table-offset"`
	RefcountTableOffset   uint64          `json:"refcount-table-offset"`
	RefcountTableClusters uint32          `json:"refcount-table-clusters"`
	Snapshots             uint32          `json:"snapshots"`
	BackingFile           string          `json:"backing-file,omitempty"`
	BackingFormat         string          `json:"backing-format,omitempty"`
	BackingResolved       string          `json:"backing-resolved,omitempty"`
	DataFile              string          `json:"data-file,omitempty"`
	Extensions            []ExtensionFact `json:"extensions"` // the first MaxListedExtensions
	ExtensionCount        int             `json:"extension-count"`
}

type ExtensionFact struct {
	Type   string `json:"type"`
	Name   string `json:"name"`
	Length uint32 `json:"length"`
}

// ReportViolation is one violation. A report lists at most
// MaxViolations of them; the last one then has field "violations" and
// says how many more were found.
type ReportViolation struct {
	Code    string `json:"code"`
	Field   string `json:"field"`
	Value   string `json:"value"`
	Message string `json:"message"`
}

func inspectRaw(f io.ReaderAt, rep *Report) error {
	head := make([]byte, DetectSize)
	n, err := f.ReadAt(head, 0)
	if err != nil && err != io.EOF {
		return fmt.Errorf("reading %s: %w", rep.Path, err)
	}
	rep.DetectedHeader = DetectImageHeader(head[:n])
	if rep.DetectedHeader != "" {
		return &FieldError{Field: "first sector", Value: rep.DetectedHeader, Err: ErrHeaderInRaw,
			Reason: "the raw content starts with a " + rep.DetectedHeader + " header; any tool that probes formats would misread this disk"}
	}
	return nil
}

func inspectQcow2(f io.ReaderAt, size int64, path string, roots []string, rep *Report) error {
	h, err := ReadHeader(f, size)
	if h == nil {
		return err
	}
	rep.Qcow2 = factsOf(h)
	violations := Violations(err)
	if err != nil && violations == nil {
		return err
	}
	if h.HasBacking() && len(roots) > 0 && len(ValidateBackingName(h.BackingFile)) == 0 {
		// Walked with lstat and readlink as the kernel would walk it, so
		// the report names the file qemu would open; nothing is opened.
		gate := Gate{AllowedRoots: roots}
		resolved, gerr := gate.Resolve(path, h.BackingFile)
		rep.Qcow2.BackingResolved = resolved
		switch {
		case gerr == nil:
		case IsRefusal(gerr):
			violations = append(violations, Violations(gerr)...)
		default:
			violations = append(violations, &FieldError{Field: "backing_file", Value: h.BackingFile, Err: ErrNotAllowed,
				Reason: fmt.Sprintf("cannot be resolved (%v); only a name that resolves under an allowed root is approved", gerr)})
		}
	}
	if len(violations) == 0 {
		return nil
	}
	return &ValidationError{Violations: violations}
}

func factsOf(h *Header) *Facts {
	facts := &Facts{
		Version: h.Version, VirtualSize: h.Size, ClusterSize: h.ClusterSize(),
		RefcountBits: h.RefcountBits(), CompressionType: h.CompressionName(),
		ExtendedL2: h.ExtendedL2(), LazyRefcounts: h.LazyRefcounts(), Dirty: h.Dirty(),
		IncompatibleFeatures: h.IncompatibleFeatures, CompatibleFeatures: h.CompatibleFeatures,
		AutoclearFeatures: h.AutoclearFeatures,
		L1Size:            h.L1Size, L1TableOffset: h.L1TableOffset,
		RefcountTableOffset: h.RefcountTableOffset, RefcountTableClusters: h.RefcountTableClusters,
		Snapshots:   h.NbSnapshots,
		BackingFile: h.BackingFile, BackingFormat: h.BackingFormat, DataFile: h.DataFile,
		Extensions: []ExtensionFact{}, ExtensionCount: h.ExtensionCount,
	}
	for _, e := range h.Extensions {
		facts.Extensions = append(facts.Extensions, ExtensionFact{Type: fmt.Sprintf("%#08x", e.Type), Name: extensionName(e.Type), Length: e.Length})
	}
	return facts
}

func extensionName(typ uint32) string {
	switch typ {
	case ExtBackingFormat:
		return "backing format"
	case ExtFeatureTable:
		return "feature name table"
	case ExtBitmaps:
		return "bitmaps"
	case ExtCrypto:
		return "full disk encryption"
	case ExtDataFile:
		return "external data file"
	}
	return "unknown"
}
