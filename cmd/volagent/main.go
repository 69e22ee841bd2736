// Command volagent creates and checks qcow2 overlays on host block devices
// without ever guessing an image format. Subcommands live one per file.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/volagent/volagent/internal/version"
)

// Exit statuses shared by every subcommand.
const (
	exitOK      = 0
	exitFailure = 2 // usage, I/O or internal error
	exitRefused = 3 // the image is malformed, hostile or against the policy
)

// exitError carries a specific exit status out of a command.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// refused wraps err so that volagent exits with status 3.
func refused(err error) error { return &exitError{code: exitRefused, err: err} }

var rootCmd = &cobra.Command{
	Use:   "volagent",
	Short: "qcow2 overlays on host block devices, with formats always explicit",
	Long: `volagent creates qcow2 overlays directly on host block devices (LVM logical
volumes, loop devices) with the backing file's format always recorded in the
image. It never guesses ("probes") an image format, and treats every image
header as hostile input.

Exit status: 0 success, 2 usage or I/O error, 3 image refused (malformed,
hostile, or against the policy).`,
	Version:       version.Version,
	SilenceUsage:  true,
	SilenceErrors: true,
}

// Help groups: one meaning per name, and the help says which commands
// need the daemon.
const (
	groupLocal       = "local"
	groupDaemon      = "daemon"
	groupIntegration = "integration"
)

func init() {
	rootCmd.AddGroup(
		&cobra.Group{ID: groupLocal, Title: "Image tools (local, no daemon):"},
		&cobra.Group{ID: groupDaemon, Title: "Daemon clients (D-Bus, to volagentd):"},
		&cobra.Group{ID: groupIntegration, Title: "Integration:"},
	)
}

func main() {
	os.Exit(run(os.Args[1:]))
}

// run executes the command line and returns the exit status.
func run(args []string) (code int) {
	defer func() {
		// A panic is a defect; never let one look like a verdict.
		if r := recover(); r != nil {
			fmt.Fprintf(os.Stderr, "volagent: internal error (please report): %v\n", r)
			code = exitFailure
		}
	}()
	rootCmd.SetArgs(args)
	err := rootCmd.Execute()
	if err == nil {
		return exitOK
	}
	fmt.Fprintf(os.Stderr, "volagent: %v\n", err)
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return exitFailure
}
