// Command startfloor measures floors for `make bench`: built like volagent
// (static, no cgo), with no arguments it does nothing, which is what any
// Go command costs on this host before it does any work. With the
// argument proc-locks it reads /proc/locks once, as the lock checks of
// volagent's writers and of the libvirt hook must for a block device: the
// kernel makes that read wait for an RCU grace period.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "proc-locks" {
		if _, err := os.ReadFile("/proc/locks"); err != nil {
			fmt.Fprintln(os.Stderr, "startfloor:", err)
			os.Exit(1)
		}
	}
}
