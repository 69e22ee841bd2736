package systemd

import (
	"strings"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Notify sends state lines to the service manager at NOTIFY_SOCKET. It
// reports whether a message was sent: false with a nil error means the
// daemon does not run under a service manager that wants notifications.
func Notify(lines ...string) (bool, error) {
	return daemon.SdNotify(false, strings.Join(lines, "\n"))
}

// statusLine makes a STATUS= line of s; a newline in s would start a
// line of its own, which the service manager would take as a command.
func statusLine(s string) string {
	return "STATUS=" + strings.Join(strings.Fields(s), " ")
}

// Ready says start-up is complete (READY=1) with a status line, in one
// message, so the status is visible the moment the unit becomes active.
func Ready(status string) error {
	_, err := Notify(daemon.SdNotifyReady, statusLine(status))
	return err
}

// Status updates the status line systemctl status shows.
func Status(status string) error {
	_, err := Notify(statusLine(status))
	return err
}

// Stopping says the daemon is shutting down (STOPPING=1), with a status.
func Stopping(status string) error {
	_, err := Notify(daemon.SdNotifyStopping, statusLine(status))
	return err
}

// WatchdogPing tells the watchdog the daemon is alive (WATCHDOG=1).
func WatchdogPing() error {
	_, err := Notify(daemon.SdNotifyWatchdog)
	return err
}
