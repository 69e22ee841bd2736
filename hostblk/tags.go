package hostblk

import (
	"fmt"
	"strings"
)

// LVM accepts only [A-Za-z0-9_+.-/=!:&#] in tags and at most this many bytes.
const maxTagLen = 1024

// tagEscape starts an escape in an encoded tag value: "+" followed by two
// upper-case hex digits of one byte. "+" is a legal tag character that
// never appears in paths or names volagent cares about, so encoded values
// stay readable in `lvs -o tags`.
const tagEscape = '+'

// Tag keys of volagent's metadata on LVM. A volume volagent owns carries
// OwnerTag; the other keys are written as "key=encoded-value".
const (
	OwnerTag            = "volagent"
	tagKeyRole          = "volagent.role"
	tagKeyBackingName   = "volagent.backing"
	tagKeyBackingFormat = "volagent.backing-format"
	tagKeyState         = "volagent.state"
	tagKeyOrigin        = "volagent.origin"
)

// isTagLiteral reports whether c can stand for itself in an encoded tag
// value. It is a subset of LVM's tag characters: '+' is the escape, and
// '=' is kept for "key=value" splitting so a value never contains it raw.
func isTagLiteral(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '_', '.', '-', '/', ':', '!', '&', '#':
		return true
	}
	return false
}

// EncodeTagValue turns an arbitrary string (a file path, a name with spaces
// or non-ASCII characters) into characters LVM accepts in a tag. Bytes
// outside the safe set become "+XX" (hex). A leading '-' is escaped too, so
// an encoded value can never be taken for a command-line option or be
// rejected by LVM. DecodeTagValue reverses it exactly.
func EncodeTagValue(value string) string {
	var b strings.Builder
	for i := 0; i < len(value); i++ {
		c := value[i]
		if isTagLiteral(c) && !(i == 0 && c == '-') {
			b.WriteByte(c)
			continue
		}
		fmt.Fprintf(&b, "%c%02X", tagEscape, c)
	}
	return b.String()
}

// DecodeTagValue reverses EncodeTagValue. It fails on anything
// EncodeTagValue never produces: other characters, truncated or malformed
// escapes, and escapes of bytes that need none.
func DecodeTagValue(encoded string) (string, error) {
	var b strings.Builder
	for i := 0; i < len(encoded); i++ {
		c := encoded[i]
		if c == tagEscape {
			if i+2 >= len(encoded) {
				return "", fmt.Errorf("decode tag value %q: truncated escape at byte %d", encoded, i)
			}
			hi, ok1 := unhex(encoded[i+1])
			lo, ok2 := unhex(encoded[i+2])
			if !ok1 || !ok2 {
				return "", fmt.Errorf("decode tag value %q: bad escape %q at byte %d", encoded, encoded[i:i+3], i)
			}
			// Escaping a byte that could stand for itself is refused, so
			// each value has exactly one encoding and tags compare equal.
			if d := hi<<4 | lo; isTagLiteral(d) && !(i == 0 && d == '-') {
				return "", fmt.Errorf("decode tag value %q: needless escape %q at byte %d", encoded, encoded[i:i+3], i)
			}
			b.WriteByte(hi<<4 | lo)
			i += 2
			continue
		}
		if !isTagLiteral(c) || (i == 0 && c == '-') {
			return "", fmt.Errorf("decode tag value %q: unexpected character %q at byte %d", encoded, c, i)
		}
		b.WriteByte(c)
	}
	return b.String(), nil
}

// unhex decodes one upper-case hex digit; lower case is rejected so that
// every value has exactly one encoding.
func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// KeyValueTag returns the LVM tag "key=EncodeTagValue(value)". key must
// itself be made of literal tag characters; the result must fit LVM's tag
// length limit.
func KeyValueTag(key, value string) (string, error) {
	if key == "" {
		return "", fmt.Errorf("tag key is empty")
	}
	for i := 0; i < len(key); i++ {
		if !isTagLiteral(key[i]) || (i == 0 && key[i] == '-') {
			return "", fmt.Errorf("tag key %q: character %q not allowed", key, key[i])
		}
	}
	tag := key + "=" + EncodeTagValue(value)
	if len(tag) > maxTagLen {
		return "", fmt.Errorf("tag %q: encoded length %d exceeds LVM's limit of %d bytes", key, len(tag), maxTagLen)
	}
	return tag, nil
}

// ParseKeyValueTag splits a tag made by KeyValueTag into key and decoded
// value. ok is false for tags without '=' (such as OwnerTag).
func ParseKeyValueTag(tag string) (key, value string, ok bool, err error) {
	key, encoded, found := strings.Cut(tag, "=")
	if !found {
		return "", "", false, nil
	}
	value, err = DecodeTagValue(encoded)
	if err != nil {
		return "", "", false, fmt.Errorf("tag %q: %w", tag, err)
	}
	return key, value, true, nil
}

// VolumeMeta is what volagent records about a volume it owns, so a pool's
// state can be rebuilt from LVM tags (or loop pool metadata) alone.
type VolumeMeta struct {
	// Role is volagent's name for what the volume is for (e.g. "overlay").
	Role string `json:"role,omitempty"`
	// BackingName names the image the volume's qcow2 overlay is based on,
	// typically a file path or another volume's name.
	BackingName string `json:"backing_name,omitempty"`
	// BackingFormat is the format of BackingName (e.g. "qcow2", "raw").
	BackingFormat string `json:"backing_format,omitempty"`
	// State is "" for a finished volume; otherwise the operation that is
	// still making or removing it (e.g. "creating", "importing",
	// "deleting"), so that whoever finds it after a crash can clean up.
	State string `json:"state,omitempty"`
	// Origin says what asked for the volume when that matters later,
	// e.g. the request file of a request pool ("request:NONCE"), so a
	// request is linked only to the volume it made.
	Origin string `json:"origin,omitempty"`
}

// Tags returns the LVM tags that record m: OwnerTag plus one key=value tag
// per non-empty field.
func (m VolumeMeta) Tags() ([]string, error) {
	tags := []string{OwnerTag}
	for _, f := range []struct{ key, value string }{
		{tagKeyRole, m.Role},
		{tagKeyBackingName, m.BackingName},
		{tagKeyBackingFormat, m.BackingFormat},
		{tagKeyState, m.State},
		{tagKeyOrigin, m.Origin},
	} {
		if f.value == "" {
			continue
		}
		tag, err := KeyValueTag(f.key, f.value)
		if err != nil {
			return nil, err
		}
		tags = append(tags, tag)
	}
	return tags, nil
}

// ParseVolumeTags rebuilds VolumeMeta from an LV's tags. owned is true only
// if OwnerTag is present; tags volagent does not know are ignored, so other
// tools may tag volagent's volumes too.
func ParseVolumeTags(tags []string) (meta VolumeMeta, owned bool, err error) {
	for _, tag := range tags {
		if tag == OwnerTag {
			owned = true
			continue
		}
		if !strings.HasPrefix(tag, OwnerTag+".") {
			continue
		}
		key, value, ok, err := ParseKeyValueTag(tag)
		if err != nil {
			return VolumeMeta{}, false, err
		}
		if !ok {
			continue
		}
		switch key {
		case tagKeyRole:
			meta.Role = value
		case tagKeyBackingName:
			meta.BackingName = value
		case tagKeyBackingFormat:
			meta.BackingFormat = value
		case tagKeyState:
			meta.State = value
		case tagKeyOrigin:
			meta.Origin = value
		}
	}
	return meta, owned, nil
}
