package dbusapi

import (
	"errors"
	"fmt"

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
