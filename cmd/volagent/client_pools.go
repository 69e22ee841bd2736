package main

import (
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/internal/bytesize"
)

func init() { rootCmd.AddCommand(newPoolsCmd()) }

func newPoolsCmd() *cobra.Command {
	var fl clientFlags
	cmd := &cobra.Command{
		GroupID: groupDaemon,
		Use:     "pools [--json] [--bus-address ADDRESS]",
		Short:   "List the daemon's pools, their space and what running domains need",
		Long: `pools lists the pools the volagent daemon serves: type, policy, capacity
and free space (the volume group's for an LVM pool, the directory's
filesystem's for a loop pool), and under NEEDED what the next growth of
the thin volumes running domains use takes (each volume's next chunk, at
most what it can still grow). SPACE is "LOW" when the pool has less free
than that: a guest may pause when its volume cannot grow; extend the
volume group or free space in the directory. It asks the daemon over
D-Bus; reading is open to every user. --json prints the same fields.

Exit status: 0 success, 2 error (e.g. the daemon is not running).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runPools(cmd.OutOrStdout(), fl)
		},
	}
	fl.register(cmd)
	return cmd
}

// poolJSON is a pool as `--json` prints it; field names are stable.
type poolJSON struct {
	Object      string `json:"object"`
	Name        string `json:"name"`
	Type        string `json:"type"`
	Policy      string `json:"policy"`
	Capacity    uint64 `json:"capacity"`
	Free        uint64 `json:"free"`
	SpaceNeeded uint64 `json:"space-needed"`
	SpaceLow    bool   `json:"space-low"`
}

func runPools(out io.Writer, fl clientFlags) error {
	conn, err := dialDaemon(fl)
	if err != nil {
		return err
	}
	defer conn.Close()
	objs, err := getManagedObjects(conn)
	if err != nil {
		return err
	}
	pools := []poolJSON{}
	for _, o := range objs.ofInterface(dbusapi.PoolIface) {
		low, _ := o.props["SpaceLow"].Value().(bool)
		pools = append(pools, poolJSON{
			Object: string(o.path), Name: o.str("Name"), Type: o.str("Type"), Policy: o.str("PolicyMode"),
			Capacity: o.u64("Capacity"), Free: o.u64("Free"), SpaceNeeded: o.u64("SpaceNeeded"), SpaceLow: low,
		})
	}
	if fl.json {
		return printJSON(out, pools)
	}
	if len(pools) == 0 {
		fmt.Fprintln(out, "no pools")
		return nil
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tTYPE\tPOLICY\tCAPACITY\tFREE\tNEEDED\tSPACE")
	for _, p := range pools {
		space := "ok"
		if p.SpaceLow {
			space = "LOW"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, p.Type, p.Policy,
			bytesize.Format(p.Capacity), bytesize.Format(p.Free), bytesize.Format(p.SpaceNeeded), space)
	}
	return tw.Flush()
}
