// Package bytesize parses the byte counts people write in the
// configuration and on the command line ("512", "64K", "64KiB", "20G"),
// and formats byte counts for people ("512 B", "1.5 GiB"). It sits below
// both the daemon (backend) and the CLI, so neither imports the other for
// it, and every size a person reads looks the same.
package bytesize

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// suffixes are the accepted units, all binary, by their shift.
var suffixes = map[string]uint{
	"": 0, "B": 0,
	"K": 10, "KB": 10, "KIB": 10,
	"M": 20, "MB": 20, "MIB": 20,
	"G": 30, "GB": 30, "GIB": 30,
	"T": 40, "TB": 40, "TIB": 40,
	"P": 50, "PB": 50, "PIB": 50,
}

// Parse parses a byte count with an optional binary suffix (K, M, G, T or
// P, in any case, optionally followed by B or iB): "512", "64K",
// "64KiB", "2t", "1 M". Errors quote the value; callers prefix the field
// or flag it came from.
func Parse(s string) (int64, error) {
	trimmed := strings.TrimSpace(s)
	digits := strings.TrimLeft(trimmed, "0123456789")
	num, unit := trimmed[:len(trimmed)-len(digits)], strings.TrimSpace(digits)
	shift, ok := suffixes[strings.ToUpper(unit)]
	switch {
	case !ok:
		return 0, fmt.Errorf("%q: unknown suffix %q (use K, M, G, T or P, binary)", s, unit)
	case num == "":
		return 0, fmt.Errorf("%q: not a size (bytes, or a number with K, M, G, T or P)", s)
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n > math.MaxInt64>>shift {
		return 0, fmt.Errorf("%q: too large", s)
	}
	return n << shift, nil
}

// units are the binary units Format uses, by power of 1024.
var units = []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}

// Format shows a byte count (or a rate in bytes per second) for people:
// "512 B" below 1 KiB, otherwise one decimal in the largest binary unit
// that keeps the number at least 1: "1.0 GiB", "1.5 MiB". A negative
// count shows as "0 B".
func Format[N ~int64 | ~uint64 | ~float64](n N) string {
	v := float64(n)
	if v < 1024 {
		return fmt.Sprintf("%d B", int64(max(v, 0)))
	}
	i := 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	// 1023.96 MiB would round to "1024.0 MiB"; show it as the next unit.
	if v >= 1023.95 && i < len(units)-1 {
		v /= 1024
		i++
	}
	return fmt.Sprintf("%.1f %s", v, units[i])
}
