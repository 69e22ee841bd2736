package hostblk

import (
	"reflect"
	"strings"
	"testing"
)

// Captured from lvm2 2.03.16 (`lvs --segments --reportformat json --units b
// --nosuffix`), including the indentation lvm prints.
const segReport = `  {
      "report": [
          {
              "seg": [
                  {"lv_name":"a", "seg_start_pe":"0", "seg_size_pe":"2", "segtype":"linear", "stripes":"1", "seg_pe_ranges":"/dev/loop0:0-1"},
                  {"lv_name":"a", "seg_start_pe":"2", "seg_size_pe":"2", "segtype":"linear", "stripes":"1", "seg_pe_ranges":"/dev/loop0:4-5"},
                  {"lv_name":"s", "seg_start_pe":"0", "seg_size_pe":"4", "segtype":"striped", "stripes":"2", "seg_pe_ranges":"/dev/sda:0-1 /dev/sdb:0-1"}
              ]
          }
      ]
  }
`

func TestParseSegmentReport(t *testing.T) {
	rows, err := decodeReport(strings.NewReader(segReport), "seg")
	if err != nil {
		t.Fatal(err)
	}
	segs, err := parseSegments(rows)
	if err != nil {
		t.Fatal(err)
	}
	want := []Segment{
		{LV: "a", LVStartExtent: 0, Extents: 2, Type: "linear", Stripes: 1, Ranges: []PERange{{"/dev/loop0", 0, 1}}},
		{LV: "a", LVStartExtent: 2, Extents: 2, Type: "linear", Stripes: 1, Ranges: []PERange{{"/dev/loop0", 4, 5}}},
		{LV: "s", LVStartExtent: 0, Extents: 4, Type: "striped", Stripes: 2, Ranges: []PERange{{"/dev/sda", 0, 1}, {"/dev/sdb", 0, 1}}},
	}
	if !reflect.DeepEqual(segs, want) {
		t.Errorf("segments\n got %+v\nwant %+v", segs, want)
	}
}

func TestParseVGReport(t *testing.T) {
	const report = `{"report":[{"vg":[{"vg_name":"vg0", "vg_uuid":"U", "vg_size":"62914560", "vg_free":"54525952", "vg_extent_size":"4194304", "vg_extent_count":"15", "vg_free_count":"13", "vg_tags":"a,b=c"}]}]}`
	rows, err := decodeReport(strings.NewReader(report), "vg")
	if err != nil {
		t.Fatal(err)
	}
	vgs, err := parseVGs(rows)
	if err != nil {
		t.Fatal(err)
	}
	want := []VG{{Name: "vg0", UUID: "U", Size: 62914560, Free: 54525952, ExtentSize: 4 << 20, ExtentCount: 15, FreeExtents: 13, Tags: []string{"a", "b=c"}}}
	if !reflect.DeepEqual(vgs, want) {
		t.Errorf("got %+v\nwant %+v", vgs, want)
	}
}

// json_std (selectable in lvm.conf) prints numbers as numbers and string
// lists as arrays; a host configured that way must still work.
func TestParseReportJSONStd(t *testing.T) {
	const report = `{"report":[{"lv":[{"lv_name":"v", "vg_name":"vg0", "lv_uuid":"U", "lv_path":"/dev/vg0/v", "lv_size":8388608, "lv_attr":"-wi-------", "lv_allocation_policy":"inherit", "lv_tags":["volagent","x=y"]}]}],
"log":[{"log_seq_num":1, "log_type":"status", "log_context":"processing", "log_object_type":"cmd", "log_object_name":"", "log_object_id":"", "log_object_group":"", "log_object_group_id":"", "log_message":"success", "log_errno":0, "log_ret_code":1}]}`
	rows, err := decodeReport(strings.NewReader(report), "lv")
	if err != nil {
		t.Fatal(err)
	}
	lvs, err := parseLVs(rows)
	if err != nil {
		t.Fatal(err)
	}
	want := []LV{{Name: "v", VG: "vg0", UUID: "U", Path: "/dev/vg0/v", Size: 8 << 20, Attr: "-wi-------", AllocationPolicy: "inherit", Tags: []string{"volagent", "x=y"}}}
	if !reflect.DeepEqual(lvs, want) {
		t.Errorf("got %+v\nwant %+v", lvs, want)
	}
}

func TestParseReportErrorsNameFieldAndValue(t *testing.T) {
	for _, tc := range []struct{ report, kind, want string }{
		{`{"report":[{"pv":[{"pv_name":"/dev/x","vg_name":"v","pv_size":"60.00m","pe_start":"1048576"}]}]}`, "pv", `pv_size="60.00m"`},
		{`{"report":[{"pv":[{"pv_name":"/dev/x","vg_name":"v","pv_size":"1"}]}]}`, "pv", "pe_start"},
		{`{"report":[{"seg":[{"lv_name":"a","seg_start_pe":"0","seg_size_pe":"1","segtype":"linear","stripes":"1","seg_pe_ranges":"/dev/x:5-1"}]}]}`, "seg", "/dev/x:5-1"},
		{`{"report":[{"seg":[{"lv_name":"a","seg_start_pe":"0","seg_size_pe":"1","segtype":"linear","stripes":"1","seg_pe_ranges":"nocolon"}]}]}`, "seg", "nocolon"},
		{`{"report":[{"pv":[{"pv_name":{}}]}]}`, "pv", "pv_name"},
		{`{"report":`, "pv", "pv report"},
		{``, "pv", "no output"},
	} {
		rows, err := decodeReport(strings.NewReader(tc.report), tc.kind)
		if err == nil {
			switch tc.kind {
			case "pv":
				_, err = parsePVs(rows)
			case "seg":
				_, err = parseSegments(rows)
			}
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("report %s: error %v, want one mentioning %q", tc.report, err, tc.want)
		}
	}
}

func TestDecodeReportIgnoresOtherSections(t *testing.T) {
	rows, err := decodeReport(strings.NewReader(`{"report":[{"vg":[{"vg_name":"x"}]},{"lv":[]}]}`), "lv")
	if err != nil || len(rows) != 0 {
		t.Errorf("rows %v, %v; want none", rows, err)
	}
}
