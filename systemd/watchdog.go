package systemd

import (
	"context"
	"log/slog"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// WatchdogInterval is how often the service manager wants a ping:
// WATCHDOG_USEC, when WATCHDOG_PID is unset or names this process; zero
// when there is no watchdog.
func WatchdogInterval() (time.Duration, error) {
	return daemon.SdWatchdogEnabled(false)
}

// RunWatchdog pings the watchdog at half the interval it asks for, until
// ctx is done, while healthy returns nil: a daemon whose bus connection is
// gone stops pinging, so systemd restarts it. It returns at once when
// there is no watchdog. Start it in its own goroutine.
func RunWatchdog(ctx context.Context, healthy func() error, log *slog.Logger) {
	interval, err := WatchdogInterval()
	if err != nil {
		log.Warn("watchdog disabled: bad WATCHDOG_USEC or WATCHDOG_PID", "error", err)
		return
	}
	if interval <= 0 {
		return
	}
	period := interval / 2
	log.Debug("watchdog enabled", "interval", interval, "ping_every", period)
	ticker := time.NewTicker(period)
	defer ticker.Stop()
	for {
		if err := healthy(); err != nil {
			log.Error("not pinging the watchdog: unhealthy", "error", err)
		} else if err := WatchdogPing(); err != nil {
			log.Warn("watchdog ping failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}
