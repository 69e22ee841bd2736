package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/internal/bytesize"
)

// progressInterval is how often progress is reported at most.
const progressInterval = 500 * time.Millisecond

// progress reports how far a long copy is: a bar redrawn on a terminal,
// or one JSON object per line for programs (--json), or nothing.
type progress struct {
	total    int64
	start    time.Time
	last     time.Time
	jsonOut  io.Writer // JSON lines, or nil
	terminal io.Writer // the bar, or nil
	drawn    bool
	flushed  int64 // durable bytes so far
}

// progressEvent is one --json line.
type progressEvent struct {
	Event      string `json:"event"` // "progress" or "done"
	BytesDone  int64  `json:"bytes-done"`
	BytesTotal int64  `json:"bytes-total"`
	// DurableBytes: the guest bytes before this offset are flushed to the
	// target; a crash from now on cannot lose them.
	DurableBytes int64   `json:"durable-bytes"`
	Percent      float64 `json:"percent"`
	Seconds      float64 `json:"seconds"`
	DataBytes    int64   `json:"data-bytes,omitempty"`
	ZeroBytes    int64   `json:"zero-bytes,omitempty"`
}

// newProgress reports to stdout as JSON lines when jsonOut, else draws a
// bar on stderr if stderr is a terminal.
func newProgress(stdout, stderr io.Writer, jsonOut bool, total int64) *progress {
	p := &progress{total: total, start: time.Now()}
	switch {
	case jsonOut:
		p.jsonOut = stdout
	case isTerminal(stderr):
		p.terminal = stderr
	}
	return p
}

// isTerminal reports whether w is a terminal (TCGETS succeeds on it).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func (p *progress) percent(done int64) float64 {
	if p.total == 0 {
		return 100
	}
	return float64(done) * 100 / float64(p.total)
}

// update reports done bytes, at most every progressInterval.
func (p *progress) update(done int64) {
	now := time.Now()
	if now.Sub(p.last) < progressInterval {
		return
	}
	p.last = now
	secs := now.Sub(p.start).Seconds()
	switch {
	case p.jsonOut != nil:
		p.emit(progressEvent{Event: "progress", BytesDone: done, BytesTotal: p.total, DurableBytes: p.flushed, Percent: p.percent(done), Seconds: secs})
	case p.terminal != nil:
		const width = 30
		filled := int(p.percent(done) * width / 100)
		rate := float64(done) / max(secs, 1e-9)
		fmt.Fprintf(p.terminal, "\r[%s%s] %5.1f%% %s/%s %s/s ", strings.Repeat("#", filled), strings.Repeat("-", width-filled),
			p.percent(done), bytesize.Format(done), bytesize.Format(p.total), bytesize.Format(rate))
		p.drawn = true
	}
}

// durable records that the first n bytes are flushed and, for --json,
// says so at once.
func (p *progress) durable(n int64) {
	p.flushed = n
	if p.jsonOut != nil {
		p.last = time.Time{} // report now, whatever the interval
		p.update(n)
	}
}

// finish reports the end of a successful copy.
func (p *progress) finish(done, dataBytes, zeroBytes int64) {
	ev := progressEvent{Event: "done", BytesDone: done, BytesTotal: p.total, DurableBytes: done, Percent: p.percent(done),
		Seconds: time.Since(p.start).Seconds(), DataBytes: dataBytes, ZeroBytes: zeroBytes}
	if p.jsonOut != nil {
		p.emit(ev)
		return
	}
	if p.drawn {
		fmt.Fprintln(p.terminal)
	}
}

// abandon ends the bar's line so an error message starts on its own.
func (p *progress) abandon() {
	if p.drawn {
		fmt.Fprintln(p.terminal)
	}
}

func (p *progress) emit(ev progressEvent) {
	b, _ := json.Marshal(ev)
	fmt.Fprintf(p.jsonOut, "%s\n", b)
}
