package dbusapi

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/volagent/volagent/backend"
)

// The introspection XML states the name rules in prose; they must be the
// backend's rule (backend/names.go), which is what callers get.
func TestIntrospectionXMLStatesTheNameRule(t *testing.T) {
	text := string(IntrospectionXML)
	for _, c := range []struct {
		what, pattern string
		max           int
		chars         string
		validate      func(string) error
	}{
		{"volume name", `the new volume's name: 1-(\d+) characters of\s+(\[[^\]]+\])`, backend.MaxVolumeNameLength, backend.VolumeNameChars, backend.ValidateVolumeName},
		{"pool name", `Name: as in the configuration file: 1-(\d+) characters of\s+(\[[^\]]+\])`, backend.MaxPoolNameLength, backend.PoolNameChars, backend.ValidatePoolName},
	} {
		m := regexp.MustCompile(c.pattern).FindStringSubmatch(text)
		if m == nil {
			t.Errorf("the introspection XML no longer states the %s rule (%s); keep it and this test in step", c.what, c.pattern)
			continue
		}
		n, _ := strconv.Atoi(m[1])
		if n != c.max || m[2] != c.chars {
			t.Errorf("the introspection XML says a %s is 1-%d characters of %s; backend's rule is 1-%d of %s", c.what, n, m[2], c.max, c.chars)
		}
		// The stated limits are the enforced ones.
		if err := c.validate(strings.Repeat("a", n)); err != nil {
			t.Errorf("a %s of the stated maximum %d characters is refused: %v", c.what, n, err)
		}
		if err := c.validate(strings.Repeat("a", n+1)); err == nil {
			t.Errorf("a %s of %d characters (one past the stated maximum) is accepted", c.what, n+1)
		}
		// The stated character class is the enforced one (after a letter:
		// the first character has its own rule).
		class := regexp.MustCompile("^" + m[2] + "$")
		for b := 1; b < 128; b++ {
			name := "a" + string(rune(b)) + "a"
			stated := class.MatchString(string(rune(b)))
			err := c.validate(name)
			if stated && err != nil && !strings.Contains(err.Error(), "reserves") {
				t.Errorf("%s %q: the XML allows %q, the backend refuses it: %v", c.what, name, rune(b), err)
			}
			if !stated && err == nil {
				t.Errorf("%s %q: the XML does not allow %q, the backend accepts it", c.what, name, rune(b))
			}
		}
	}
}

// The adapter applies the backend's rule, not a copy of its own: what one
// refuses the other refuses, with the backend's error kind.
func TestAdapterUsesTheBackendNameRule(t *testing.T) {
	long := strings.Repeat("v", backend.MaxVolumeNameLength)
	for _, c := range []struct {
		pool, name string
		ok         bool
	}{
		{"fast", "vm1", true},
		{"fast", long, true},
		{"fast", long + "v", false},
		{"fast", "+vm", false}, // an older copy of the rule accepted these
		{"fast", "_vm", false},
		{"fast", ".vm", false},
		{"fast", "-vm", false},
		{"fast", "x_mlog", false},
		{"fast", "snapshot1", false},
		{"fast", "a/b", false},
		{"fa.st", "vm1", false}, // pools have a narrower class
		{strings.Repeat("p", backend.MaxPoolNameLength+1), "vm1", false},
		{"", "vm1", false},
		{"fast", "", false},
	} {
		err := validateNames(c.pool, c.name)
		if c.ok != (err == nil) {
			t.Errorf("validateNames(%q, %q) = %v; want ok=%v", c.pool, c.name, err, c.ok)
		}
		if err != nil && !errors.Is(err, backend.ErrInvalidArgument) {
			t.Errorf("validateNames(%q, %q) = %v; want an error wrapping backend.ErrInvalidArgument", c.pool, c.name, err)
		}
		want := backend.ValidatePoolName(c.pool)
		if want == nil {
			want = backend.ValidateVolumeName(c.name)
		}
		if fmt.Sprint(err) != fmt.Sprint(want) {
			t.Errorf("validateNames(%q, %q) = %v; the backend says %v", c.pool, c.name, err, want)
		}
	}
}
