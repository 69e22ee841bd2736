package systemd

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
)

// NewLogHandler returns the handler the daemon logs through: to the
// journal with structured fields when stderr is connected to it (systemd
// sets JOURNAL_STREAM), else as text on stderr.
func NewLogHandler(stderr io.Writer, opts *slog.HandlerOptions) slog.Handler {
	if underJournal() {
		return NewJournalHandler(opts)
	}
	return slog.NewTextHandler(stderr, opts)
}

// underJournal reports whether stderr is the journal's stream and the
// journal's socket is reachable (a service with StandardError=journal).
func underJournal() bool {
	onJournal, err := journal.StderrIsJournalStream()
	return err == nil && onJournal && journal.Enabled()
}

// JournalHandler is a slog.Handler that sends each record to the journal
// as one entry: the message in MESSAGE, the level as PRIORITY, and every
// attribute as a field of its own (key upper-cased, groups joined with
// "_": a "volume" attribute in group "job" becomes JOB_VOLUME), so that
// `journalctl VOLUME=...` finds every entry about a volume.
type JournalHandler struct {
	opts   slog.HandlerOptions
	prefix string            // group prefix for new attributes, e.g. "JOB_"
	fields map[string]string // attributes added with WithAttrs
	send   func(message string, priority journal.Priority, fields map[string]string) error
	mu     *sync.Mutex // serialises error reporting to stderr
}

// NewJournalHandler returns a JournalHandler; opts may be nil.
func NewJournalHandler(opts *slog.HandlerOptions) *JournalHandler {
	h := &JournalHandler{fields: map[string]string{}, send: journal.Send, mu: &sync.Mutex{}}
	if opts != nil {
		h.opts = *opts
	}
	return h
}

// Enabled implements slog.Handler.
func (h *JournalHandler) Enabled(_ context.Context, level slog.Level) bool {
	min := slog.LevelInfo
	if h.opts.Level != nil {
		min = h.opts.Level.Level()
	}
	return level >= min
}

// Handle implements slog.Handler.
func (h *JournalHandler) Handle(_ context.Context, r slog.Record) error {
	fields := make(map[string]string, len(h.fields)+r.NumAttrs()+4)
	for k, v := range h.fields {
		fields[k] = v
	}
	r.Attrs(func(a slog.Attr) bool {
		addField(fields, h.prefix, a)
		return true
	})
	if h.opts.AddSource && r.PC != 0 {
		frame, _ := runtime.CallersFrames([]uintptr{r.PC}).Next()
		fields["CODE_FILE"] = frame.File
		fields["CODE_LINE"] = strconv.Itoa(frame.Line)
		fields["CODE_FUNC"] = frame.Function
	}
	fields["SLOG_LEVEL"] = r.Level.String()
	err := h.send(r.Message, priorityOf(r.Level), fields)
	if err != nil {
		// The journal is gone; do not lose the message.
		h.mu.Lock()
		fmt.Fprintf(os.Stderr, "%s %s (journal: %v)\n", r.Level, r.Message, err)
		h.mu.Unlock()
	}
	return err
}

// WithAttrs implements slog.Handler.
func (h *JournalHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	c := h.clone()
	for _, a := range attrs {
		addField(c.fields, c.prefix, a)
	}
	return c
}

// WithGroup implements slog.Handler.
func (h *JournalHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	c := h.clone()
	c.prefix += FieldName(name) + "_"
	return c
}

func (h *JournalHandler) clone() *JournalHandler {
	c := *h
	c.fields = make(map[string]string, len(h.fields))
	for k, v := range h.fields {
		c.fields[k] = v
	}
	return &c
}

// addField flattens one attribute into journal fields.
func addField(fields map[string]string, prefix string, a slog.Attr) {
	a.Value = a.Value.Resolve()
	if a.Equal(slog.Attr{}) {
		return
	}
	if a.Value.Kind() == slog.KindGroup {
		p := prefix
		if a.Key != "" {
			p += FieldName(a.Key) + "_"
		}
		for _, g := range a.Value.Group() {
			addField(fields, p, g)
		}
		return
	}
	var v string
	switch a.Value.Kind() {
	case slog.KindTime:
		v = a.Value.Time().Format(time.RFC3339Nano)
	default:
		v = a.Value.String()
	}
	fields[prefix+FieldName(a.Key)] = v
}

// FieldName turns an attribute key into a valid journal field name:
// upper case letters, digits and "_", not starting with "_" (fields
// starting with "_" are trusted ones only journald may set) or a digit.
func FieldName(key string) string {
	var b strings.Builder
	for _, c := range strings.ToUpper(key) {
		if c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
			b.WriteRune(c)
		} else {
			b.WriteByte('_')
		}
	}
	name := strings.TrimLeft(b.String(), "_")
	if name == "" || name[0] >= '0' && name[0] <= '9' {
		name = "F_" + name
	}
	// journald accepts at most 64 characters.
	if len(name) > 64 {
		name = name[:64]
	}
	return name
}

// priorityOf maps slog levels to syslog priorities.
func priorityOf(l slog.Level) journal.Priority {
	switch {
	case l >= slog.LevelError:
		return journal.PriErr
	case l >= slog.LevelWarn:
		return journal.PriWarning
	case l >= slog.LevelInfo:
		return journal.PriInfo
	}
	return journal.PriDebug
}
