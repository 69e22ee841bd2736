package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"text/tabwriter"
	"unicode/utf8"

	"github.com/godbus/dbus/v5"
	"github.com/spf13/cobra"

	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/internal/bytesize"
)

func init() { rootCmd.AddCommand(newVolumesCmd()) }

func newVolumesCmd() *cobra.Command {
	var fl clientFlags
	cmd := &cobra.Command{
		GroupID: groupDaemon,
		Use:     "volumes [--json] [--bus-address ADDRESS]",
		Short:   "List the daemon's volumes (and import new ones: volumes import)",
		Long: `volumes lists the volumes the volagent daemon manages, in every pool,
with their format, sizes and recorded backing, and, under PROBLEM, why the
daemon will not use or write a volume ("-" when it is usable: a volume
whose header it refuses or whose metadata is corrupt is listed, never
hidden, so that you can inspect and delete it). ACTIVE says where the
volume is active: "local" (this host), "-" (nowhere: a volume of a shared
pool), or the other hosts of a shared pool that hold it ("volumes
activate" and "volumes deactivate" move it). It asks the daemon over
D-Bus; reading is open to every user. --json prints the same fields,
"problem" being "" for a usable volume. "volumes import" imports an image
into a new volume.

Exit status: 0 success, 2 error (e.g. the daemon is not running).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVolumes(cmd.OutOrStdout(), fl)
		},
	}
	fl.register(cmd)
	cmd.AddCommand(newVolumesImportCmd(), newVolumesActivateCmd(true), newVolumesActivateCmd(false))
	return cmd
}

func runVolumes(out io.Writer, fl clientFlags) error {
	conn, err := dialDaemon(fl)
	if err != nil {
		return err
	}
	defer conn.Close()
	objs, err := getManagedObjects(conn)
	if err != nil {
		return err
	}
	pools := objs.poolNames()
	vols := []volumeJSON{}
	for _, o := range objs.ofInterface(dbusapi.VolumeIface) {
		vols = append(vols, volumeFromProps(o, pools))
	}
	if fl.json {
		return printJSON(out, vols)
	}
	return printVolumes(out, vols)
}

// printVolumes prints the volumes table. PROBLEM comes last: it is free
// text (why the daemon will not use the volume), "-" for a usable one.
func printVolumes(out io.Writer, vols []volumeJSON) error {
	if len(vols) == 0 {
		fmt.Fprintln(out, "no volumes")
		return nil
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tPOOL\tROLE\tFORMAT\tVIRTUAL\tALLOCATED\tDEVICE\tBACKING\tACTIVE\tPROBLEM")
	for _, v := range vols {
		backing := "-"
		if v.BackingName != "" {
			backing = quoteIfNeeded(v.BackingName) + " (" + quoteIfNeeded(v.BackingFormat) + ")"
		}
		active := v.ActiveOn
		if active == "" {
			active = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.Name, v.Pool, v.Role, v.Format,
			bytesize.Format(v.VirtualSize), bytesize.Format(v.HighestAllocated), v.DevicePath, backing, active, problemText(v.Problem))
	}
	return tw.Flush()
}

// problemText shows a volume's problem on a terminal: it can quote a
// backing name from a hostile header, so control characters are escaped.
func problemText(p string) string {
	if p == "" {
		return "-"
	}
	for _, r := range p {
		if r < ' ' || r == 0x7f || r == utf8.RuneError {
			return strconv.Quote(p)
		}
	}
	return p
}

type volumesImportFlags struct {
	clientFlags
	pool, name   string
	sourceFormat string
	size         string
	noWait       bool
}

// newVolumesImportCmd is the daemon's import. `volagent import` is the
// local copy only; its old --pool form fails and points here.
func newVolumesImportCmd() *cobra.Command {
	var fl volumesImportFlags
	cmd := &cobra.Command{
		Use:   "import --pool POOL --name NAME [--source-format raw|qcow2] [--size N] [--no-wait] [--json] SOURCE",
		Short: "Import an image into a new base volume, through the daemon",
		Long: `volumes import asks the volagent daemon to copy SOURCE into a new base
volume NAME in POOL. (To copy into an existing image here, without the
daemon, use "volagent import SOURCE TARGET".) SOURCE is opened here, with your rights, and passed to
the daemon as a file descriptor; it is read as --source-format (default
raw), never probed.

The copy is a daemon job: this command shows its progress (a bar on a
terminal, lines otherwise, JSON lines with --json) until it ends;
with --no-wait it prints the job's object path and returns. Ctrl-C stops
watching, not the job: cancel it with busctl call ... Job Cancel.

Exit status: 0 success, 2 error or failed job, 3 refused by the policy.`,
		Example: `  volagent volumes import --pool fast --name debian12 debian-12.qcow2 --source-format qcow2`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVolumesImport(cmd.OutOrStdout(), cmd.ErrOrStderr(), args[0], fl)
		},
	}
	fl.register(cmd)
	f := cmd.Flags()
	f.StringVar(&fl.pool, "pool", "", "pool to import into (required)")
	f.StringVar(&fl.name, "name", "", "name of the new volume (required)")
	f.StringVar(&fl.sourceFormat, "source-format", "raw", "format of SOURCE: raw or qcow2 (never probed)")
	f.StringVar(&fl.size, "size", "", "virtual size of the volume (default: the source's)")
	f.BoolVar(&fl.noWait, "no-wait", false, "print the job and return at once")
	cmd.MarkFlagRequired("pool")
	cmd.MarkFlagRequired("name")
	return cmd
}

func runVolumesImport(out, errOut io.Writer, source string, fl volumesImportFlags) error {
	opts := map[string]dbus.Variant{}
	if fl.size != "" {
		n, err := parseSizeFlag("--size", fl.size)
		if err != nil {
			return err
		}
		opts["virtual-size"] = dbus.MakeVariant(uint64(n))
	}
	f, err := os.Open(source)
	if err != nil {
		return err
	}
	defer f.Close()
	conn, err := dialDaemon(fl.clientFlags)
	if err != nil {
		return err
	}
	defer conn.Close()
	// Subscribe before the job exists, so no progress is missed.
	w, err := newJobWatcher(conn)
	if err != nil {
		return err
	}
	var job dbus.ObjectPath
	err = conn.Object(dbusapi.BusName, dbusapi.ManagerPath).Call(dbusapi.ManagerIface+".Import", 0,
		fl.pool, fl.name, dbus.UnixFD(f.Fd()), fl.sourceFormat, opts).Store(&job)
	if err != nil {
		return daemonError(err)
	}
	if fl.noWait {
		if fl.json {
			return printJSON(out, map[string]string{"job": string(job)})
		}
		fmt.Fprintln(out, job)
		return nil
	}
	return w.watch(out, errOut, []dbus.ObjectPath{job}, fl.json)
}

// newVolumesActivateCmd is "volumes activate" (activate true) or "volumes
// deactivate": where a shared pool's volume is active.
func newVolumesActivateCmd(activate bool) *cobra.Command {
	var fl clientFlags
	var shared bool
	cmd := &cobra.Command{
		Use:   "deactivate [--bus-address ADDRESS] VOLUME",
		Short: "Deactivate a shared pool's volume on this host, so another host may activate it",
		Long: `volumes deactivate deactivates VOLUME (NAME, POOL/NAME, ID or object
path), a volume of a shared pool, on this host: lvmlockd releases its lock,
and another host may activate it. Refused while it is in use here.

Exit status: 0 success, 2 error.`,
		Args: cobra.ExactArgs(1),
	}
	method := "Deactivate"
	if activate {
		method = "Activate"
		cmd.Use = "activate [--shared] [--bus-address ADDRESS] VOLUME"
		cmd.Short = "Activate a shared pool's volume on this host (exclusively, or --shared)"
		cmd.Long = `volumes activate activates VOLUME (NAME, POOL/NAME, ID or object path), a
volume of a shared pool, on this host: exclusively (for a domain here, or
to write it), or with --shared shared (a base image that overlays on
several hosts read). Refused while another host holds it in a conflicting
mode; the message names that host.

Exit status: 0 success, 2 error.`
		cmd.Flags().BoolVar(&shared, "shared", false, "activate shared instead of exclusively")
	}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		conn, err := dialDaemon(fl)
		if err != nil {
			return err
		}
		defer conn.Close()
		objs, err := getManagedObjects(conn)
		if err != nil {
			return err
		}
		vol, err := findVolume(objs, args[0])
		if err != nil {
			return err
		}
		opts := map[string]dbus.Variant{}
		if activate {
			opts["shared"] = dbus.MakeVariant(shared)
		}
		if err := conn.Object(dbusapi.BusName, vol).Call(dbusapi.VolumeIface+"."+method, 0, opts).Err; err != nil {
			return daemonError(err)
		}
		return nil
	}
	fl.register(cmd)
	return cmd
}
