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

func TestFormat(t *testing.T) {
	for _, c := range []struct {
		n    float64
		want string
	}{
		{-5, "0 B"}, {0, "0 B"}, {512, "512 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {1536, "1.5 KiB"},
		{64 << 10, "64.0 KiB"}, {1 << 30, "1.0 GiB"}, {(1 << 30) - 1, "1.0 GiB"}, {20 << 30, "20.0 GiB"},
		{3 << 40, "3.0 TiB"}, {1 << 60, "1.0 EiB"}, {1 << 62, "4.0 EiB"},
	} {
		if got := Format(c.n); got != c.want {
			t.Errorf("Format(%v) = %q, want %q", c.n, got, c.want)
		}
	}
	if got := Format(int64(1) << 20); got != "1.0 MiB" {
		t.Errorf("Format(int64 1 MiB) = %q", got)
	}
	if got := Format(^uint64(0)); got != "16.0 EiB" {
		t.Errorf("Format(max uint64) = %q", got)
	}
}
