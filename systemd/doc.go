// Package systemd is volagent's side of the service manager: readiness and
// status notifications (sd_notify), watchdog pings, and logging to the
// journal with structured fields. Each piece works, and does nothing
// harmful, when the daemon does not run under systemd.
package systemd
