package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/volagent/volagent/hostblk"
)

// lockForReading takes qemu-img's reader locks on f (the image the user
// named) for a command that needs the image not to change while it
// reads: an image another process writes (a running guest) is refused.
// With forceShare it takes qemu-img -U's locks instead and, when the
// image is in use, warns that the result may be inconsistent. The locks
// go when f is closed.
func lockForReading(f *os.File, path string, forceShare bool, warn io.Writer) error {
	_, err := hostblk.LockImage(f, hostblk.ReaderLocks)
	if err == nil {
		return nil
	}
	if !errors.Is(err, hostblk.ErrImageInUse) {
		return err
	}
	if !forceShare {
		return fmt.Errorf("%w; --force-share (-U) reads it anyway, with a result that may be inconsistent", err)
	}
	if _, serr := hostblk.LockImage(f, hostblk.SharedReaderLocks); serr != nil {
		return serr
	}
	fmt.Fprintf(warn, "volagent: warning: --force-share: %v; reading it anyway, the result may be inconsistent\n", err)
	return nil
}
