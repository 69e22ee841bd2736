package bytesize

import "testing"

func TestParse(t *testing.T) {
	for in, want := range map[string]int64{
		"512": 512, "7B": 7, "64K": 64 << 10, "64k": 64 << 10, "64KiB": 64 << 10,
		"2M": 2 << 20, "1 M": 1 << 20, "1G": 1 << 30, "20G": 20 << 30,
		"2t": 2 << 40, "4T": 4 << 40, "1P": 1 << 50,
	} {
		if got, err := Parse(in); err != nil || got != want {
			t.Errorf("Parse(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "K", "G", "-1", "1.5G", "1X", "12Q", "1KK", "8E", "99999999999T", "99999999999P"} {
		if got, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) = %d, want an error", in, got)
		}
	}
}
