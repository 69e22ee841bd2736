package backend

import (
	"fmt"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/qcow2"
)

// Opening an image for writing joins the device (hostblk) and the format
// (qcow2); it lives here, above both, and the CLI's import uses it too.

// ChainWriter is a Writer open on an image with the image's backing
// chain open through a gate: the writer reads its backing through the
// chain. Close closes the writer (flushing it), the chain and the target.
type ChainWriter struct {
	*qcow2.Writer
	Target *hostblk.Target
	// Chain is the image as read through the gate, backing included.
	Chain *qcow2.Image
}

// Close flushes and closes the writer, then closes the chain and the
// target; it returns the writer's error.
func (cw *ChainWriter) Close() error {
	err := cw.Writer.Close()
	cw.Chain.Close()
	cw.Target.Close()
	return err
}

// borrowedBacking lends a chain's backing disk to the writer; the chain
// closes it.
type borrowedBacking struct{ qcow2.Disk }

func (borrowedBacking) Close() error { return nil }

// OpenWriterWithChain opens the qcow2 image at path for writing, in the
// one safe order: the exclusive open of the target first (so nobody else
// writes it while its chain is opened and checked), then its backing
// chain through gate, then the writer over the target with the chain's
// backing. buffered is hostblk.OpenTarget's.
//
// Errors: hostblk.OpenTarget's (ErrTargetBusy, ErrNoDirectIO, ...); OpenChain's
// refusals for the image or its chain; OpenWriter's; ErrTargetBusy when
// the header the writer reads differs from the one the chain read (the
// image changed in between). Every error names path.
func OpenWriterWithChain(path string, gate *qcow2.Gate, buffered bool) (*ChainWriter, error) {
	tgt, err := hostblk.OpenTarget(path, buffered)
	if err != nil {
		return nil, err
	}
	chain, err := qcow2.OpenChain(path, "qcow2", gate)
	if err != nil {
		tgt.Close()
		return nil, err
	}
	top, ok := chain.(*qcow2.Image)
	if !ok {
		chain.Close()
		tgt.Close()
		return nil, fmt.Errorf("%s: opened as qcow2 but not read as a qcow2 image", path)
	}
	var backing qcow2.Disk
	if top.Backing() != nil {
		backing = borrowedBacking{top.Backing()}
	}
	w, err := qcow2.OpenWriter(tgt, tgt.Size, qcow2.WriterOptions{BlockSize: tgt.BlockSize, Backing: backing, ContainerSize: tgt.ContainerSize()})
	if err != nil {
		chain.Close()
		tgt.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if h, seen := w.Header(), top.Header(); h.BackingFile != seen.BackingFile || h.BackingFormat != seen.BackingFormat || h.Size != seen.Size {
		w.Close()
		chain.Close()
		tgt.Close()
		return nil, fmt.Errorf("%s changed while it was being opened: %w", path, hostblk.ErrTargetBusy)
	}
	return &ChainWriter{Writer: w, Target: tgt, Chain: top}, nil
}
