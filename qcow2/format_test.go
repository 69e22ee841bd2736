package qcow2

import (
	"errors"
	"strings"
	"testing"
)

func TestParseFormat(t *testing.T) {
	for in, want := range map[string]Format{"raw": FormatRaw, "qcow2": FormatQcow2} {
		if got, err := ParseFormat(in); err != nil || got != want {
			t.Errorf("ParseFormat(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "RAW", "Qcow2", "qcow", "qcow2 ", "vmdk", "auto", "host_device"} {
		got, err := ParseFormat(in)
		if err == nil || !errors.Is(err, ErrUnknownFormat) || got != "" {
			t.Errorf("ParseFormat(%q) = %q, %v; want an error wrapping ErrUnknownFormat", in, got, err)
			continue
		}
		if !strings.Contains(err.Error(), `"`+in+`"`) {
			t.Errorf("ParseFormat(%q): error %q does not quote the value", in, err)
		}
	}
}
