// Command volagentd is the volagent daemon: pools, volumes and jobs over
// D-Bus (org.volagent.VolAgent1), and the libvirt integration. It is the
// only binary that links libvirt; the volagent command (clients, local
// image tools, the libvirt hook) is static and starts in a millisecond.
package main

import (
	"fmt"
	"os"

	"github.com/volagent/volagent/internal/version"
)

// Exit statuses: 0 after a clean stop, 2 when the daemon cannot start or
// loses the bus.
const (
	exitOK      = 0
	exitFailure = 2
)

func main() {
	os.Exit(run(os.Args[1:]))
}

// run executes the command line and returns the exit status.
func run(args []string) (code int) {
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(os.Stderr, "volagentd: internal error (please report): %v\n", r)
			code = exitFailure
		}
	}()
	cmd := newServeCmd()
	cmd.Version = version.Version
	cmd.SilenceUsage = true
	cmd.SilenceErrors = true
	cmd.SetArgs(args)
	if err := cmd.Execute(); err != nil {
		fmt.Fprintf(os.Stderr, "volagentd: %v\n", err)
		return exitFailure
	}
	return exitOK
}
