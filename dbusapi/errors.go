package dbusapi

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/backend"
)

// ErrorPrefix is the common prefix of every error name the daemon returns.
const ErrorPrefix = "org.volagent.VolAgent1.Error."

// Error names, one per backend error kind.
const (
	ErrorFailed          = ErrorPrefix + "Failed"
	ErrorNotAuthorized   = ErrorPrefix + "NotAuthorized"
	ErrorInvalidArgument = ErrorPrefix + "InvalidArgument"
	ErrorNotFound        = ErrorPrefix + "NotFound"
	ErrorBusy            = ErrorPrefix + "Busy"
	ErrorNoSpace         = ErrorPrefix + "NoSpace"
	ErrorPolicyViolation = ErrorPrefix + "PolicyViolation"
	ErrorCancelled       = ErrorPrefix + "Cancelled"
)

// errorKinds maps each backend error kind to its D-Bus name.
var errorKinds = []struct {
	kind error
	name string
}{
	{backend.ErrNotAuthorized, ErrorNotAuthorized},
	{backend.ErrInvalidArgument, ErrorInvalidArgument},
	{backend.ErrNotFound, ErrorNotFound},
	{backend.ErrBusy, ErrorBusy},
	{backend.ErrNoSpace, ErrorNoSpace},
	{backend.ErrPolicyViolation, ErrorPolicyViolation},
	{backend.ErrCancelled, ErrorCancelled},
	{backend.ErrFailed, ErrorFailed},
}

// toDBusError turns a backend error into the D-Bus error of its kind, with
// the backend's message (which names what to change). An error of no known
// kind is a Failed.
func toDBusError(err error) *dbus.Error {
	if err == nil {
		return nil
	}
	var de *dbus.Error
	if errors.As(err, &de) {
		return de
	}
	// The outermost kind names the error: a cause wrapped beside it may
	// carry another kind of its own.
	kind := backend.Kind(err)
	if kind == backend.ErrPolicyViolation {
		return policyViolation(err)
	}
	for _, k := range errorKinds {
		if kind == k.kind {
			return dbus.NewError(k.name, []any{err.Error()})
		}
	}
	return dbus.NewError(ErrorFailed, []any{err.Error()})
}

// invalidArgument is the error for a bad argument from the caller.
func invalidArgument(format string, args ...any) *dbus.Error {
	return dbus.NewError(ErrorInvalidArgument, []any{fmt.Sprintf(format, args...)})
}

func notFound(format string, args ...any) *dbus.Error {
	return dbus.NewError(ErrorNotFound, []any{fmt.Sprintf(format, args...)})
}

func notAuthorized(format string, args ...any) *dbus.Error {
	return dbus.NewError(ErrorNotAuthorized, []any{fmt.Sprintf(format, args...)})
}

func failed(format string, args ...any) *dbus.Error {
	return dbus.NewError(ErrorFailed, []any{fmt.Sprintf(format, args...)})
}

// A PolicyViolation error's message ends with the violations' codes
// ("data-file", "backing-name", ...; qcow2.FieldError.Code), each once:
//
//	... images naming an external data file are refused [codes: data-file,backing-name]
//
// so a client can match them instead of English text. The body stays the
// one string D-Bus errors carry: GDBus refuses an error body of any other
// signature (it reports "Error return with body of type (sas)" and loses the
// message), and busctl and sd_bus_error keep the first string only. A
// refusal that is not about an image (a volume in use by a running domain)
// has no suffix.
const codesPrefix = " [codes: "

// codesSuffix matches the suffix at the end of a message.
var codesSuffix = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`\[codes: ([a-z0-9-]+(?:,[a-z0-9-]+)*)\]$`) })

func policyViolation(err error) *dbus.Error {
	msg := err.Error()
	if codes := backend.ViolationCodes(err); len(codes) > 0 {
		msg += codesPrefix + strings.Join(codes, ",") + "]"
	}
	return dbus.NewError(ErrorPolicyViolation, []any{msg})
}

// ViolationCodes returns the violation codes at the end of a
// PolicyViolation error's message; nil for any other error.
func ViolationCodes(err error) []string {
	var de dbus.Error
	var dp *dbus.Error
	switch {
	case errors.As(err, &dp):
		de = *dp
	case errors.As(err, &de):
	default:
		return nil
	}
	if de.Name != ErrorPolicyViolation || len(de.Body) == 0 {
		return nil
	}
	msg, _ := de.Body[0].(string)
	if m := codesSuffix().FindStringSubmatch(msg); m != nil {
		return strings.Split(m[1], ",")
	}
	return nil
}
