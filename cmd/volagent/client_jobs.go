package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/internal/bytesize"
)

func init() { rootCmd.AddCommand(newJobsCmd()) }

type jobsFlags struct {
	clientFlags
	watch bool
}

func newJobsCmd() *cobra.Command {
	var fl jobsFlags
	cmd := &cobra.Command{
		GroupID: groupDaemon,
		Use:     "jobs [--watch] [--json] [--bus-address ADDRESS] [JOB...]",
		Short:   "List the daemon's jobs, or watch them progress",
		Long: `jobs lists the volagent daemon's jobs (imports, zero-fills): running ones,
and finished ones for a while after they end.

With --watch it follows the given JOBs (numbers or object paths), or every
running job, until they end: progress bars on a terminal, one line per
job per second otherwise, JSON lines with --json.

Exit status: 0 success (with --watch: every job succeeded), 2 error or a
job failed or was cancelled.`,
		Example: `  volagent jobs
  volagent jobs --watch
  volagent jobs --watch --json 3`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runJobs(cmd.OutOrStdout(), cmd.ErrOrStderr(), args, fl)
		},
	}
	fl.register(cmd)
	cmd.Flags().BoolVar(&fl.watch, "watch", false, "follow the jobs until they end")
	return cmd
}

// jobJSON is a job as --json prints it; field names are stable.
type jobJSON struct {
	Object     string  `json:"job"`
	ID         uint64  `json:"id"`
	Operation  string  `json:"operation"`
	Volume     string  `json:"volume"`
	State      string  `json:"state"`
	Progress   float64 `json:"progress"`
	Bytes      uint64  `json:"bytes"`
	TotalBytes uint64  `json:"total-bytes"`
	Rate       float64 `json:"rate"`
	StartedBy  uint32  `json:"started-by-uid"`
	Cancelable bool    `json:"cancelable"`
	Message    string  `json:"message"`
}

func jobFromProps(o objectProps) jobJSON {
	uid, _ := o.props["StartedByUID"].Value().(uint32)
	cancelable, _ := o.props["Cancelable"].Value().(bool)
	id, _ := strconv.ParseUint(lastElement(string(o.path)), 10, 64)
	return jobJSON{
		Object: string(o.path), ID: id, Operation: o.str("Operation"), Volume: o.str("Volume"),
		State: o.str("State"), Progress: o.f64("Progress"), Bytes: o.u64("Bytes"), TotalBytes: o.u64("TotalBytes"),
		Rate: o.f64("Rate"), StartedBy: uid, Cancelable: cancelable, Message: o.str("Message"),
	}
}

func runJobs(out, errOut io.Writer, args []string, fl jobsFlags) error {
	conn, err := dialDaemon(fl.clientFlags)
	if err != nil {
		return err
	}
	defer conn.Close()
	var w *jobWatcher
	if fl.watch {
		// Subscribe before reading the state, so no change falls between.
		if w, err = newJobWatcher(conn); err != nil {
			return err
		}
	}
	objs, err := getManagedObjects(conn)
	if err != nil {
		return err
	}
	jobs := []jobJSON{}
	for _, o := range objs.ofInterface(dbusapi.JobIface) {
		jobs = append(jobs, jobFromProps(o))
	}
	if !fl.watch {
		if fl.json {
			return printJSON(out, jobs)
		}
		if len(jobs) == 0 {
			fmt.Fprintln(out, "no jobs")
			return nil
		}
		tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "JOB\tOPERATION\tSTATE\tPROGRESS\tDONE\tRATE\tUID\tMESSAGE")
		for _, j := range jobs {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%.1f%%\t%s/%s\t%s/s\t%d\t%s\n", j.ID, j.Operation, j.State, j.Progress*100,
				bytesize.Format(j.Bytes), bytesize.Format(j.TotalBytes), bytesize.Format(j.Rate), j.StartedBy, j.Message)
		}
		return tw.Flush()
	}

	var paths []dbus.ObjectPath
	for _, a := range args {
		p := dbus.ObjectPath(a)
		if n, err := strconv.ParseUint(a, 10, 64); err == nil {
			p = dbusapi.JobPath(n)
		}
		if _, ok := objs[p]; !ok {
			return fmt.Errorf("job %q: no such job (see `volagent jobs`)", a)
		}
		paths = append(paths, p)
	}
	if len(args) == 0 {
		for _, j := range jobs {
			if j.State == "running" {
				paths = append(paths, dbus.ObjectPath(j.Object))
			}
		}
		if len(paths) == 0 {
			fmt.Fprintln(errOut, "no running jobs")
			return nil
		}
	}
	return w.watch(out, errOut, paths, fl.json)
}

// jobWatcher follows jobs through their PropertiesChanged and Completed
// signals, and re-reads them every second in case a signal was missed.
type jobWatcher struct {
	conn    *dbus.Conn
	signals chan *dbus.Signal
}

func newJobWatcher(conn *dbus.Conn) (*jobWatcher, error) {
	for _, iface := range []string{dbusapi.PropertiesIface, dbusapi.JobIface} {
		if err := conn.AddMatchSignal(dbus.WithMatchSender(dbusapi.BusName), dbus.WithMatchInterface(iface),
			dbus.WithMatchPathNamespace(dbusapi.JobsPath)); err != nil {
			return nil, fmt.Errorf("subscribing to job signals: %w", err)
		}
	}
	w := &jobWatcher{conn: conn, signals: make(chan *dbus.Signal, 256)}
	conn.Signal(w.signals)
	return w, nil
}

func (w *jobWatcher) read(path dbus.ObjectPath) (jobJSON, error) {
	var props map[string]dbus.Variant
	err := w.conn.Object(dbusapi.BusName, path).Call(dbusapi.PropertiesIface+".GetAll", 0, dbusapi.JobIface).Store(&props)
	if err != nil {
		return jobJSON{}, daemonError(err)
	}
	return jobFromProps(objectProps{path: path, props: props}), nil
}

// watch follows jobs until every one has ended, and fails unless every
// one succeeded.
func (w *jobWatcher) watch(out, errOut io.Writer, paths []dbus.ObjectPath, jsonOut bool) error {
	view := newJobView(out, jsonOut)
	jobs := map[dbus.ObjectPath]*jobJSON{}
	for _, p := range paths {
		j, err := w.read(p)
		if err != nil {
			return fmt.Errorf("job %s: %w", p, err)
		}
		jobs[p] = &j
	}
	running := func() bool {
		for _, j := range jobs {
			if j.State == "running" {
				return true
			}
		}
		return false
	}
	poll := time.NewTicker(time.Second)
	defer poll.Stop()
	view.draw(paths, jobs, true)
	for running() {
		select {
		case s := <-w.signals:
			j, ok := jobs[s.Path]
			if !ok {
				continue
			}
			switch s.Name {
			case dbusapi.PropertiesIface + ".PropertiesChanged":
				if len(s.Body) >= 2 {
					if changed, ok := s.Body[1].(map[string]dbus.Variant); ok {
						applyJobChanges(j, changed)
					}
				}
			case dbusapi.JobIface + ".Completed":
				// The properties say how; re-read them.
				if fresh, err := w.read(s.Path); err == nil {
					*j = fresh
				}
			}
			view.draw(paths, jobs, false)
		case <-poll.C:
			for p, j := range jobs {
				if j.State != "running" {
					continue
				}
				fresh, err := w.read(p)
				if err != nil {
					j.State, j.Message = "vanished", err.Error()
					continue
				}
				*j = fresh
			}
			view.draw(paths, jobs, true)
		}
	}
	view.finish(paths, jobs)
	var failed []string
	for _, p := range paths {
		if j := jobs[p]; j.State != "succeeded" {
			failed = append(failed, fmt.Sprintf("job %d (%s) %s: %s", j.ID, j.Operation, j.State, j.Message))
		}
	}
	if len(failed) > 0 {
		return errors.New(strings.Join(failed, "; "))
	}
	return nil
}

// applyJobChanges updates j with the properties a PropertiesChanged carried.
func applyJobChanges(j *jobJSON, changed map[string]dbus.Variant) {
	o := objectProps{props: changed}
	if _, ok := changed["State"]; ok {
		j.State = o.str("State")
	}
	if _, ok := changed["Progress"]; ok {
		j.Progress = o.f64("Progress")
	}
	if _, ok := changed["Bytes"]; ok {
		j.Bytes = o.u64("Bytes")
	}
	if _, ok := changed["TotalBytes"]; ok {
		j.TotalBytes = o.u64("TotalBytes")
	}
	if _, ok := changed["Rate"]; ok {
		j.Rate = o.f64("Rate")
	}
	if _, ok := changed["Message"]; ok {
		j.Message = o.str("Message")
	}
	if v, ok := changed["Cancelable"].Value().(bool); ok {
		j.Cancelable = v
	}
}

// jobView shows jobs: bars redrawn in place on a terminal, JSON lines, or
// plain lines at most once a second.
type jobView struct {
	out      io.Writer
	json     bool
	terminal bool
	drawn    int // lines of bars on the screen
	last     map[dbus.ObjectPath]jobJSON
	lastLine time.Time
}

func newJobView(out io.Writer, jsonOut bool) *jobView {
	v := &jobView{out: out, json: jsonOut, last: map[dbus.ObjectPath]jobJSON{}}
	if f, ok := out.(*os.File); ok && !jsonOut {
		v.terminal = term.IsTerminal(int(f.Fd()))
	}
	return v
}

// draw shows the jobs; tick says a second has passed (lines and JSON are
// printed on ticks and on state changes only).
func (v *jobView) draw(paths []dbus.ObjectPath, jobs map[dbus.ObjectPath]*jobJSON, tick bool) {
	if v.terminal {
		if v.drawn > 0 {
			fmt.Fprintf(v.out, "\x1b[%dA", v.drawn)
		}
		for _, p := range paths {
			fmt.Fprintf(v.out, "\r\x1b[K%s\n", barLine(*jobs[p]))
		}
		v.drawn = len(paths)
		return
	}
	for _, p := range paths {
		j := *jobs[p]
		prev, seen := v.last[p]
		if seen && prev == j {
			continue
		}
		if seen && prev.State == j.State && !tick {
			continue
		}
		v.last[p] = j
		if v.json {
			b, _ := jsonLine(j)
			fmt.Fprintln(v.out, b)
		} else {
			fmt.Fprintf(v.out, "job %d %s: %s %.1f%% (%s of %s, %s/s)%s\n", j.ID, j.Operation, j.State, j.Progress*100,
				bytesize.Format(j.Bytes), bytesize.Format(j.TotalBytes), bytesize.Format(j.Rate), messageSuffix(j.Message))
		}
	}
}

func (v *jobView) finish(paths []dbus.ObjectPath, jobs map[dbus.ObjectPath]*jobJSON) {
	v.draw(paths, jobs, true)
}

func messageSuffix(m string) string {
	if m == "" {
		return ""
	}
	return ": " + m
}

func jsonLine(j jobJSON) (string, error) {
	var b strings.Builder
	err := printJSONCompact(&b, j)
	return strings.TrimSpace(b.String()), err
}

// barLine is one job as a progress bar.
func barLine(j jobJSON) string {
	const width = 30
	filled := int(j.Progress * width)
	filled = max(0, min(width, filled))
	bar := strings.Repeat("#", filled) + strings.Repeat(".", width-filled)
	line := fmt.Sprintf("job %d %-9s [%s] %5.1f%%  %s/%s  %s/s", j.ID, j.Operation, bar, j.Progress*100,
		bytesize.Format(j.Bytes), bytesize.Format(j.TotalBytes), bytesize.Format(j.Rate))
	if j.State != "running" {
		line += "  " + j.State + messageSuffix(j.Message)
	}
	return line
}
