package hostblk

import (
	"strings"
	"testing"
)

func TestTagValueRoundTrip(t *testing.T) {
	all := make([]byte, 256)
	for i := range all {
		all[i] = byte(i)
	}
	for _, value := range []string{
		"",
		"/var/lib/libvirt/images/base image (v2).qcow2",
		"-starts-with-dash",
		"a+b=c,d e%f@g",
		"ünïcödé ✓",
		"already+20escaped",
		string(all),
	} {
		enc := EncodeTagValue(value)
		if err := validateTag("k=" + enc); enc != "" && err != nil {
			t.Errorf("EncodeTagValue(%q) = %q, not a valid LVM tag: %v", value, enc, err)
		}
		if strings.HasPrefix(enc, "-") || strings.Contains(enc, "=") || strings.Contains(enc, ",") {
			t.Errorf("EncodeTagValue(%q) = %q: leading '-', '=' or ','", value, enc)
		}
		dec, err := DecodeTagValue(enc)
		if err != nil || dec != value {
			t.Errorf("DecodeTagValue(EncodeTagValue(%q)) = %q, %v", value, dec, err)
		}
	}
	// Paths stay readable in `lvs -o tags`.
	if got := EncodeTagValue("/srv/img/base.qcow2"); got != "/srv/img/base.qcow2" {
		t.Errorf("EncodeTagValue(plain path) = %q", got)
	}
	if got := EncodeTagValue("a b"); got != "a+20b" {
		t.Errorf("EncodeTagValue(%q) = %q, want a+20b", "a b", got)
	}
}

func TestDecodeTagValueRejectsMalformed(t *testing.T) {
	for _, bad := range []string{"+", "+2", "+zz", "+2a", "a b", "x=y", "a,b", "+41", "-x", "a+2D"} {
		if got, err := DecodeTagValue(bad); err == nil {
			t.Errorf("DecodeTagValue(%q) = %q, want an error", bad, got)
		}
	}
}

func TestKeyValueTag(t *testing.T) {
	tag, err := KeyValueTag("volagent.backing", "/a b")
	if err != nil || tag != "volagent.backing=/a+20b" {
		t.Fatalf("KeyValueTag = %q, %v", tag, err)
	}
	key, value, ok, err := ParseKeyValueTag(tag)
	if err != nil || !ok || key != "volagent.backing" || value != "/a b" {
		t.Errorf("ParseKeyValueTag(%q) = %q, %q, %v, %v", tag, key, value, ok, err)
	}
	if _, _, ok, err := ParseKeyValueTag("volagent"); ok || err != nil {
		t.Errorf("ParseKeyValueTag(plain tag) = ok %v, %v", ok, err)
	}
	for _, key := range []string{"", "-k", "a b", "k=v"} {
		if _, err := KeyValueTag(key, "v"); err == nil {
			t.Errorf("KeyValueTag(%q) accepted", key)
		}
	}
	// LVM limits tags to 1024 bytes; the error names the key and the limit.
	_, err = KeyValueTag("volagent.backing", strings.Repeat(" ", 400))
	if err == nil || !strings.Contains(err.Error(), "volagent.backing") || !strings.Contains(err.Error(), "1024") {
		t.Errorf("over-long tag: %v", err)
	}
}

func TestVolumeMetaTags(t *testing.T) {
	meta := VolumeMeta{Role: "overlay", BackingName: "/images/debian 12.qcow2", BackingFormat: "qcow2"}
	tags, err := meta.Tags()
	if err != nil {
		t.Fatal(err)
	}
	for _, tag := range tags {
		if err := validateTag(tag); err != nil {
			t.Errorf("tag %q: %v", tag, err)
		}
	}
	got, owned, err := ParseVolumeTags(append([]string{"someone.else=1", "x"}, tags...))
	if err != nil || !owned || got != meta {
		t.Errorf("ParseVolumeTags = %+v, owned %v, %v; want %+v", got, owned, err, meta)
	}
	if _, owned, err := ParseVolumeTags([]string{"volagent.role=x"}); owned || err != nil {
		t.Errorf("tags without the owner tag: owned %v, %v", owned, err)
	}
	if _, _, err := ParseVolumeTags([]string{OwnerTag, "volagent.role=+G0"}); err == nil {
		t.Error("corrupt volagent tag accepted")
	}
	if tags, err := (VolumeMeta{}).Tags(); err != nil || len(tags) != 1 || tags[0] != OwnerTag {
		t.Errorf("empty meta tags = %q, %v", tags, err)
	}
}

func FuzzTagValue(f *testing.F) {
	for _, s := range []string{"", "/var/lib/x.qcow2", "a b", "+41", "-", "\x00\xff", "ü"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, value string) {
		enc := EncodeTagValue(value)
		for i := 0; i < len(enc); i++ {
			if !isTagLiteral(enc[i]) && enc[i] != '+' {
				t.Fatalf("EncodeTagValue(%q) = %q has %q", value, enc, enc[i])
			}
		}
		if strings.HasPrefix(enc, "-") {
			t.Fatalf("EncodeTagValue(%q) = %q starts with '-'", value, enc)
		}
		dec, err := DecodeTagValue(enc)
		if err != nil || dec != value {
			t.Fatalf("round trip of %q: %q, %v", value, dec, err)
		}
		// Decoding arbitrary input never panics, and what it accepts
		// re-encodes to the same string (one encoding per value).
		if dec, err := DecodeTagValue(value); err == nil && EncodeTagValue(dec) != value {
			t.Fatalf("DecodeTagValue accepted %q (-> %q) which is not canonical", value, dec)
		}
	})
}
