package systemd

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
)

// notifySocket listens on a unixgram socket set as NOTIFY_SOCKET for the
// test and returns a function that reads the next datagram.
func notifySocket(t *testing.T) func() string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return func() string {
		t.Helper()
		buf := make([]byte, 4096)
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("reading the notify socket: %v", err)
		}
		return string(buf[:n])
	}
}

func TestNotifyMessages(t *testing.T) {
	next := notifySocket(t)
	if err := Ready("serving 2 pools"); err != nil {
		t.Fatal(err)
	}
	if got, want := next(), "READY=1\nSTATUS=serving 2 pools"; got != want {
		t.Errorf("Ready sent %q, want %q", got, want)
	}
	// A newline in a status must not become a second command.
	if err := Status("loading\nREADY=1"); err != nil {
		t.Fatal(err)
	}
	if got, want := next(), "STATUS=loading READY=1"; got != want {
		t.Errorf("Status sent %q, want %q", got, want)
	}
	if err := Stopping("stopping"); err != nil {
		t.Fatal(err)
	}
	if got, want := next(), "STOPPING=1\nSTATUS=stopping"; got != want {
		t.Errorf("Stopping sent %q, want %q", got, want)
	}
	if err := WatchdogPing(); err != nil {
		t.Fatal(err)
	}
	if got := next(); got != "WATCHDOG=1" {
		t.Errorf("WatchdogPing sent %q", got)
	}
}

func TestNotifyWithoutServiceManager(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	os.Unsetenv("NOTIFY_SOCKET")
	sent, err := Notify("READY=1")
	if sent || err != nil {
		t.Errorf("Notify without NOTIFY_SOCKET = %v, %v; want false, nil", sent, err)
	}
}

func TestWatchdogPingsAtHalfTheInterval(t *testing.T) {
	next := notifySocket(t)
	t.Setenv("WATCHDOG_USEC", "200000") // 200 ms: pings every 100 ms
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		RunWatchdog(ctx, func() error { return nil }, slog.Default())
		close(done)
	}()
	start := time.Now()
	for i := 0; i < 3; i++ {
		if got := next(); got != "WATCHDOG=1" {
			t.Fatalf("ping %d: got %q", i, got)
		}
	}
	if elapsed := time.Since(start); elapsed > 150*time.Millisecond*3 {
		t.Errorf("3 pings took %v; want about 200ms", elapsed)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("RunWatchdog did not return after cancel")
	}
}

func TestWatchdogForAnotherProcessIsIgnored(t *testing.T) {
	t.Setenv("WATCHDOG_USEC", "200000")
	t.Setenv("WATCHDOG_PID", "1")
	d, err := WatchdogInterval()
	if err != nil || d != 0 {
		t.Errorf("WatchdogInterval with another PID = %v, %v; want 0, nil", d, err)
	}
	// And RunWatchdog returns at once.
	done := make(chan struct{})
	go func() { RunWatchdog(context.Background(), func() error { return nil }, slog.Default()); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("RunWatchdog ran for another process's watchdog")
	}
}

func TestWatchdogSkipsPingsWhenUnhealthy(t *testing.T) {
	next := notifySocket(t)
	t.Setenv("WATCHDOG_USEC", "100000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	healthy := make(chan bool, 1)
	healthy <- false
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go RunWatchdog(ctx, func() error {
		select {
		case h := <-healthy:
			if !h {
				return errors.New("bus connection lost")
			}
		default:
		}
		return nil
	}, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	// The first round was unhealthy: the first ping comes a period later.
	start := time.Now()
	if got := next(); got != "WATCHDOG=1" {
		t.Fatalf("got %q", got)
	}
	if time.Since(start) < 40*time.Millisecond {
		t.Errorf("pinged while unhealthy")
	}
}

func TestJournalHandlerFields(t *testing.T) {
	type entry struct {
		msg    string
		pri    journal.Priority
		fields map[string]string
	}
	var got []entry
	h := NewJournalHandler(&slog.HandlerOptions{Level: slog.LevelDebug, AddSource: true})
	h.send = func(m string, p journal.Priority, f map[string]string) error {
		got = append(got, entry{m, p, f})
		return nil
	}
	log := slog.New(h).With("pool", "fast").WithGroup("job")
	log.Warn("import failed", "id", 7, "volume", "abc", slog.Group("rate", "bytes-per-second", 1.5))
	slog.New(h).Debug("debug", "_trusted", "x", "9lives", "y")

	if len(got) != 2 {
		t.Fatalf("got %d entries", len(got))
	}
	e := got[0]
	if e.msg != "import failed" || e.pri != journal.PriWarning {
		t.Errorf("message %q priority %d", e.msg, e.pri)
	}
	want := map[string]string{
		"POOL": "fast", "JOB_ID": "7", "JOB_VOLUME": "abc", "JOB_RATE_BYTES_PER_SECOND": "1.5", "SLOG_LEVEL": "WARN",
	}
	for k, v := range want {
		if e.fields[k] != v {
			t.Errorf("field %s = %q, want %q (all: %v)", k, e.fields[k], v, e.fields)
		}
	}
	if !strings.HasSuffix(e.fields["CODE_FILE"], "systemd_test.go") || e.fields["CODE_LINE"] == "" {
		t.Errorf("no source fields: %v", e.fields)
	}
	d := got[1]
	if d.pri != journal.PriDebug || d.fields["TRUSTED"] != "x" || d.fields["F_9LIVES"] != "y" {
		t.Errorf("debug entry: %d %v", d.pri, d.fields)
	}
}

func TestJournalHandlerLevel(t *testing.T) {
	h := NewJournalHandler(nil)
	if h.Enabled(context.Background(), slog.LevelDebug) || !h.Enabled(context.Background(), slog.LevelInfo) {
		t.Error("default level is not Info")
	}
}

func TestLogHandlerOffJournalIsText(t *testing.T) {
	t.Setenv("JOURNAL_STREAM", "")
	var b strings.Builder
	slog.New(NewLogHandler(&b, nil)).Info("hello", "volume", "v1")
	if !strings.Contains(b.String(), "msg=hello volume=v1") {
		t.Errorf("stderr log: %q", b.String())
	}
}
