package testutil

import (
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
)

// WaitSignal returns the first signal from ch named name on path that
// pred accepts (nil: any), failing the test when none comes within
// timeout.
func WaitSignal(t testing.TB, ch <-chan *dbus.Signal, path dbus.ObjectPath, name string, timeout time.Duration, pred func(*dbus.Signal) bool) *dbus.Signal {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case s := <-ch:
			if s.Path == path && s.Name == name && (pred == nil || pred(s)) {
				return s
			}
		case <-deadline:
			t.Fatalf("no signal %s on %s within %v", name, path, timeout)
		}
	}
}
