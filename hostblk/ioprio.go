package hostblk

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// ioprio_set(2) constants (linux/ioprio.h); x/sys/unix has the system
// call number only.
const (
	ioprioWhoProcess = 1
	ioprioClassIdle  = 3
	ioprioClassShift = 13
)

// SetThreadIdleIOPriority puts the calling thread's I/O in the idle class
// (ioprio_set IOPRIO_CLASS_IDLE): its requests are served when no one else
// uses the disk. Linux I/O priorities are per thread, so the caller must
// have locked its goroutine to the thread (runtime.LockOSThread) and never
// unlock it: the thread then ends with the goroutine, and no other
// goroutine runs at idle priority by accident.
func SetThreadIdleIOPriority() error {
	// who = 0 with IOPRIO_WHO_PROCESS is the calling thread.
	_, _, errno := unix.Syscall(unix.SYS_IOPRIO_SET, ioprioWhoProcess, 0, ioprioClassIdle<<ioprioClassShift)
	if errno != 0 {
		return fmt.Errorf("ioprio_set IOPRIO_CLASS_IDLE: %w", errno)
	}
	return nil
}
