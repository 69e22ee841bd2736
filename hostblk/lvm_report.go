package hostblk

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// reportRow is one row of an lvm JSON report: field name to value. lvm's
// "json" format prints every value as a string; "json_std" (if a host's
// lvm.conf selects it) prints numbers, so both are accepted.
type reportRow map[string]string

// decodeReport reads an lvm JSON report from r and returns the rows of the
// given kind ("vg", "lv", "pv", "seg"). The shape is
//
//	{"report": [{"lv": [{"lv_name": "x", ...}, ...]}]}
//
// Other keys in the report objects (e.g. "log", when lvm.conf enables the
// command log) are ignored.
func decodeReport(r io.Reader, kind string) ([]reportRow, error) {
	var doc struct {
		Report []map[string]json.RawMessage `json:"report"`
	}
	dec := json.NewDecoder(r)
	if err := dec.Decode(&doc); err != nil {
		if err == io.EOF {
			return nil, fmt.Errorf("lvm %s report: no output", kind)
		}
		return nil, fmt.Errorf("lvm %s report: %w", kind, err)
	}
	var rows []reportRow
	for _, section := range doc.Report {
		raw, ok := section[kind]
		if !ok {
			continue
		}
		var items []map[string]json.RawMessage
		if err := json.Unmarshal(raw, &items); err != nil {
			return nil, fmt.Errorf("lvm %s report: %w", kind, err)
		}
		for _, item := range items {
			row := make(reportRow, len(item))
			for field, value := range item {
				s, err := reportValue(value)
				if err != nil {
					return nil, fmt.Errorf("lvm %s report: field %s: %w", kind, field, err)
				}
				row[field] = s
			}
			rows = append(rows, row)
		}
	}
	return rows, nil
}

// reportValue turns a JSON string, number or null into the string lvm
// would print in its "json" format.
func reportValue(raw json.RawMessage) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var n json.Number
	if err := json.Unmarshal(raw, &n); err == nil {
		return n.String(), nil
	}
	if string(raw) == "null" {
		return "", nil
	}
	var list []string // json_std prints string lists (tags) as arrays
	if err := json.Unmarshal(raw, &list); err == nil {
		return strings.Join(list, ","), nil
	}
	return "", fmt.Errorf("unexpected value %s", raw)
}

// str returns a field that must be present.
func (r reportRow) str(field string) (string, error) {
	v, ok := r[field]
	if !ok {
		return "", fmt.Errorf("lvm report row has no field %s", field)
	}
	return v, nil
}

// uint returns a byte count or extent count. lvm prints sizes as decimal
// bytes with --units b --nosuffix; a suffix or fraction means the options
// were not applied, which is an error rather than something to guess at.
func (r reportRow) uint(field string) (uint64, error) {
	v, err := r.str(field)
	if err != nil {
		return 0, err
	}
	if v == "" {
		return 0, fmt.Errorf("lvm report field %s is empty", field)
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("lvm report field %s=%q: not a whole number of bytes or extents", field, v)
	}
	return n, nil
}

// tags splits lvm's comma-separated tag list (',' is not a tag character).
func (r reportRow) tags(field string) ([]string, error) {
	v, err := r.str(field)
	if err != nil {
		return nil, err
	}
	if v == "" {
		return nil, nil
	}
	return strings.Split(v, ","), nil
}

// fieldErrs collects the first error of a series of field reads.
type fieldErrs struct{ err error }

func (f *fieldErrs) str(r reportRow, field string) string {
	v, err := r.str(field)
	f.keep(err)
	return v
}

func (f *fieldErrs) uint(r reportRow, field string) uint64 {
	v, err := r.uint(field)
	f.keep(err)
	return v
}

func (f *fieldErrs) tags(r reportRow, field string) []string {
	v, err := r.tags(field)
	f.keep(err)
	return v
}

func (f *fieldErrs) keep(err error) {
	if f.err == nil {
		f.err = err
	}
}

func parseVGs(rows []reportRow) ([]VG, error) {
	var vgs []VG
	for _, r := range rows {
		var f fieldErrs
		vg := VG{
			Name:        f.str(r, "vg_name"),
			UUID:        f.str(r, "vg_uuid"),
			Size:        f.uint(r, "vg_size"),
			Free:        f.uint(r, "vg_free"),
			ExtentSize:  f.uint(r, "vg_extent_size"),
			ExtentCount: f.uint(r, "vg_extent_count"),
			FreeExtents: f.uint(r, "vg_free_count"),
			Tags:        f.tags(r, "vg_tags"),
		}
		if f.err != nil {
			return nil, f.err
		}
		vgs = append(vgs, vg)
	}
	return vgs, nil
}

func parseLVs(rows []reportRow) ([]LV, error) {
	var lvs []LV
	for _, r := range rows {
		var f fieldErrs
		lv := LV{
			Name:             f.str(r, "lv_name"),
			VG:               f.str(r, "vg_name"),
			UUID:             f.str(r, "lv_uuid"),
			Path:             f.str(r, "lv_path"),
			Size:             f.uint(r, "lv_size"),
			Attr:             f.str(r, "lv_attr"),
			AllocationPolicy: f.str(r, "lv_allocation_policy"),
			Tags:             f.tags(r, "lv_tags"),
		}
		if f.err != nil {
			return nil, f.err
		}
		lvs = append(lvs, lv)
	}
	return lvs, nil
}

func parsePVs(rows []reportRow) ([]PV, error) {
	var pvs []PV
	for _, r := range rows {
		var f fieldErrs
		pv := PV{
			Name:    f.str(r, "pv_name"),
			VG:      f.str(r, "vg_name"),
			Size:    f.uint(r, "pv_size"),
			PEStart: f.uint(r, "pe_start"),
		}
		if f.err != nil {
			return nil, f.err
		}
		pvs = append(pvs, pv)
	}
	return pvs, nil
}

func parseSegments(rows []reportRow) ([]Segment, error) {
	var segs []Segment
	for _, r := range rows {
		var f fieldErrs
		seg := Segment{
			LV:            f.str(r, "lv_name"),
			LVStartExtent: f.uint(r, "seg_start_pe"),
			Extents:       f.uint(r, "seg_size_pe"),
			Type:          f.str(r, "segtype"),
			Stripes:       f.uint(r, "stripes"),
		}
		ranges := f.str(r, "seg_pe_ranges")
		if f.err != nil {
			return nil, f.err
		}
		var err error
		if seg.Ranges, err = parsePERanges(ranges); err != nil {
			return nil, err
		}
		segs = append(segs, seg)
	}
	return segs, nil
}

// parsePERanges parses seg_pe_ranges: space-separated "PV:start-end"
// items, e.g. "/dev/sda:0-1 /dev/sdb:10-19". Segment types that are not
// backed by physical extents (thin, zero) have none.
func parsePERanges(s string) ([]PERange, error) {
	var ranges []PERange
	for _, item := range strings.Fields(s) {
		colon := strings.LastIndexByte(item, ':')
		if colon <= 0 {
			return nil, fmt.Errorf("lvm seg_pe_ranges item %q: want PV:start-end", item)
		}
		startStr, endStr, ok := strings.Cut(item[colon+1:], "-")
		start, err1 := strconv.ParseUint(startStr, 10, 64)
		end, err2 := strconv.ParseUint(endStr, 10, 64)
		if !ok || err1 != nil || err2 != nil || end < start {
			return nil, fmt.Errorf("lvm seg_pe_ranges item %q: bad extent range", item)
		}
		ranges = append(ranges, PERange{PV: item[:colon], Start: start, End: end})
	}
	return ranges, nil
}
