package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/godbus/dbus/v5"
	"github.com/spf13/cobra"

	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/internal/bytesize"
)

func init() {
	overlay := &cobra.Command{
		GroupID: groupDaemon,
		Use:     "overlay",
		Short:   "Manage the daemon's qcow2 overlay volumes",
		Args:    cobra.NoArgs,
		RunE:    func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	overlay.AddCommand(newOverlayCreateCmd())
	rootCmd.AddCommand(overlay)
}

type overlayCreateFlags struct {
	clientFlags
	pool, name    string
	backing       string
	backingFormat string
	backingVolume string
	size          string
	clusterSize   string
}

func newOverlayCreateCmd() *cobra.Command {
	var fl overlayCreateFlags
	cmd := &cobra.Command{
		Use:   "create --pool POOL --name NAME (--backing PATH --backing-format raw|qcow2 | --backing-volume VOLUME) [--size N] [--cluster-size N] [--json]",
		Short: "Create a qcow2 overlay volume through the daemon",
		Long: `overlay create asks the volagent daemon to create a qcow2 overlay volume
NAME in POOL, with its backing file and the backing's format recorded in
the image header - never guessed.

The backing is either a file or device path under one of the pool's
backing roots, with its format (--backing, --backing-format), or a volume
the daemon manages (--backing-volume: its name, POOL/NAME, its ID or its
object path), whose format the daemon knows.

Exit status: 0 success, 2 error, 3 refused by the policy.`,
		Example: `  volagent overlay create --pool fast --name vm1 --backing /var/lib/images/debian.raw --backing-format raw
  volagent overlay create --pool fast --name vm2 --backing-volume fast/debian12 --size 40G`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runOverlayCreate(cmd.OutOrStdout(), fl)
		},
	}
	fl.register(cmd)
	f := cmd.Flags()
	f.StringVar(&fl.pool, "pool", "", "pool of the new volume (required)")
	f.StringVar(&fl.name, "name", "", "name of the new volume (required)")
	f.StringVar(&fl.backing, "backing", "", "absolute path of the backing file or device")
	f.StringVar(&fl.backingFormat, "backing-format", "", "format of --backing: raw or qcow2 (never guessed)")
	f.StringVar(&fl.backingVolume, "backing-volume", "", "a managed volume as backing: NAME, POOL/NAME, ID or object path")
	f.StringVar(&fl.size, "size", "", "virtual size (default: the backing's)")
	f.StringVar(&fl.clusterSize, "cluster-size", "", "qcow2 cluster size (default 64K)")
	cmd.MarkFlagRequired("pool")
	cmd.MarkFlagRequired("name")
	return cmd
}

func runOverlayCreate(out io.Writer, fl overlayCreateFlags) error {
	if (fl.backing == "") == (fl.backingVolume == "") {
		return fmt.Errorf("give exactly one of --backing (with --backing-format) and --backing-volume")
	}
	if fl.backing != "" && fl.backingFormat == "" {
		return fmt.Errorf("--backing %q needs --backing-format raw or qcow2: volagent never guesses a format", fl.backing)
	}
	var size uint64
	if fl.size != "" {
		n, err := parseSizeFlag("--size", fl.size)
		if err != nil {
			return err
		}
		size = uint64(n)
	}
	opts := map[string]dbus.Variant{}
	if fl.clusterSize != "" {
		n, err := parseSizeFlag("--cluster-size", fl.clusterSize)
		if err != nil {
			return err
		}
		opts["cluster-size"] = dbus.MakeVariant(uint64(n))
	}
	conn, err := dialDaemon(fl.clientFlags)
	if err != nil {
		return err
	}
	defer conn.Close()

	backing, format := fl.backing, fl.backingFormat
	if fl.backingVolume != "" {
		objs, err := getManagedObjects(conn)
		if err != nil {
			return err
		}
		path, err := findVolume(objs, fl.backingVolume)
		if err != nil {
			return fmt.Errorf("--backing-volume: %w", err)
		}
		backing = string(path)
	}
	var vol dbus.ObjectPath
	err = conn.Object(dbusapi.BusName, dbusapi.ManagerPath).Call(dbusapi.ManagerIface+".CreateOverlay", 0,
		fl.pool, fl.name, backing, format, size, opts).Store(&vol)
	if err != nil {
		return daemonError(err)
	}
	var props map[string]dbus.Variant
	err = conn.Object(dbusapi.BusName, vol).Call(dbusapi.PropertiesIface+".GetAll", 0, dbusapi.VolumeIface).Store(&props)
	if err != nil {
		return daemonError(err)
	}
	v := volumeFromProps(objectProps{path: vol, props: props}, map[string]string{})
	if fl.json {
		return printJSON(out, v)
	}
	fmt.Fprintf(out, "created %s/%s: %s on %s, backing %s (%s)\n", v.Pool, v.Name, bytesize.Format(v.VirtualSize),
		v.DevicePath, quoteIfNeeded(v.BackingName), quoteIfNeeded(v.BackingFormat))
	fmt.Fprintf(out, "object: %s\n", vol)
	return nil
}

// findVolume resolves a volume given as an object path, an ID, POOL/NAME
// or a NAME that is unique across pools.
func findVolume(objs managedObjects, ref string) (dbus.ObjectPath, error) {
	pools := objs.poolNames()
	var matches []dbus.ObjectPath
	for _, o := range objs.ofInterface(dbusapi.VolumeIface) {
		v := volumeFromProps(o, pools)
		if ref == string(o.path) || ref == v.ID || ref == v.Pool+"/"+v.Name || ref == v.Name {
			matches = append(matches, o.path)
		}
	}
	switch len(matches) {
	case 0:
		return "", fmt.Errorf("no volume %q (see `volagent volumes`)", ref)
	case 1:
		return matches[0], nil
	}
	names := make([]string, len(matches))
	for i, m := range matches {
		names[i] = string(m)
	}
	return "", fmt.Errorf("%q names %d volumes (%s); use POOL/NAME", ref, len(matches), strings.Join(names, ", "))
}
