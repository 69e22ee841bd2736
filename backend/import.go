package backend

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/qcow2"
)

// importSource is the guest view of an import's source.
type importSource interface {
	io.ReaderAt
	Size() int64
}

// rawSource reads a raw SourceFile; past its end it reads zeros, so a
// size rounded up to 512 bytes reads like qemu shows it.
type rawSource struct {
	f    SourceFile
	size int64
}

func (r rawSource) Size() int64 { return r.size }

func (r rawSource) ReadAt(p []byte, off int64) (int, error) { return r.f.ReadAt(p, off) }

// Import starts a job that makes a new base volume (a qcow2 image without
// backing, role "base") in req.Pool and fills it with the guest view of
// req.Source read as req.SourceFormat. It returns as soon as the request
// is checked and the job runs; the volume is listed (EventVolumeAdded)
// only when the data is complete and flushed, just before the job
// completes. A job that fails or is cancelled removes the half-made
// volume; after a crash, Load does.
//
// Import always takes ownership of req.Source and closes it (when the job
// ends, or at once on an error).
//
// Checks before the job starts: ErrInvalidArgument (names, format, sizes,
// a qcow2 source that names a backing file — import self-contained
// images); ErrPolicyViolation for a qcow2 source whose header is refused
// (in either policy mode: such an image cannot be read) and, in enforce
// mode, for a raw source that starts with an image header; ErrNotFound
// for the pool; ErrFailed if the source cannot be read.
func (m *Manager) Import(ctx context.Context, c Caller, req ImportRequest) (JobInfo, error) {
	if req.Source == nil {
		return JobInfo{}, fmt.Errorf("%w: import: no source", ErrInvalidArgument)
	}
	owned := true
	defer func() {
		if owned {
			req.Source.Close()
		}
	}()
	done, err := m.beginOp("Import")
	if err != nil {
		return JobInfo{}, err
	}
	defer done()
	p, err := m.openedPool(req.Pool)
	if err != nil {
		return JobInfo{}, err
	}
	if err := ValidateVolumeName(req.Name); err != nil {
		return JobInfo{}, err
	}
	src, err := m.openImportSource(p, req)
	if err != nil {
		return JobInfo{}, err
	}
	vsize := req.VirtualSize
	switch {
	case vsize == 0:
		vsize = roundUp(src.Size(), 512)
	case vsize < 0 || vsize%512 != 0:
		return JobInfo{}, fmt.Errorf("%w: virtual size %d: want 0 (the source's size) or a positive multiple of 512", ErrInvalidArgument, vsize)
	case vsize < src.Size():
		return JobInfo{}, fmt.Errorf("%w: virtual size %d is smaller than the source's %d bytes", ErrInvalidArgument, vsize, src.Size())
	}
	if vsize == 0 {
		return JobInfo{}, fmt.Errorf("%w: the source is empty; give VirtualSize for an empty disk", ErrInvalidArgument)
	}
	opts := qcow2.CreateOptions{VirtualSize: vsize}
	if _, err := qcow2.MaxImageSize(opts); err != nil {
		return JobInfo{}, fmt.Errorf("%w: %w", ErrInvalidArgument, err)
	}
	id := VolumeID(p.cfg.Name, req.Name)
	if err := m.reserve(id, "import", p.cfg.Name, req.Name); err != nil {
		return JobInfo{}, err
	}
	// Registered with the wait group under m.mu, so a concurrent Close
	// either refuses the job or waits for it.
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		m.release(id)
		return JobInfo{}, errShuttingDown("Import")
	}
	m.jobWG.Add(1)
	m.mu.Unlock()
	j, jctx := m.startJob("import", id, c, src.Size())
	owned = false
	go m.runImport(jctx, j, p, req.Name, id, src, req.Source, opts)
	return j.snapshot(), nil
}

// openImportSource applies the policy to the source and returns its guest
// view. For qcow2 that is a validated image; for raw, the bytes.
func (m *Manager) openImportSource(p *pool, req ImportRequest) (importSource, error) {
	size, err := req.Source.Stat()
	if err != nil {
		return nil, fmt.Errorf("%w: import source: %w", ErrFailed, err)
	}
	format, err := qcow2.ParseFormat(req.SourceFormat)
	if err != nil {
		return nil, fmt.Errorf("%w: import source for %q: source format: %w", ErrInvalidArgument, req.Name, err)
	}
	if format == qcow2.FormatRaw {
		head := make([]byte, qcow2.DetectSize)
		n, err := req.Source.ReadAt(head, 0)
		if err != nil && err != io.EOF {
			return nil, fmt.Errorf("%w: reading the import source: %w", ErrFailed, err)
		}
		if found := qcow2.DetectImageHeader(head[:n]); found != "" {
			refusal := &qcow2.FieldError{Field: "first sector", Value: found, Err: qcow2.ErrHeaderInRaw,
				Reason: "the raw source starts with a " + found + " header; was it meant to be imported as " + found + "?"}
			if err := m.policyRefusal(p, fmt.Sprintf("import source for %q", req.Name), refusal); err != nil {
				return nil, err
			}
		}
		return rawSource{f: req.Source, size: size}, nil
	}
	h, err := qcow2.ReadHeader(req.Source, size)
	if err != nil {
		if qcow2.IsRefusal(err) {
			return nil, fmt.Errorf("%w: import source for %q: qcow2 header refused (an image volagent cannot read is refused in audit mode too): %w", ErrPolicyViolation, req.Name, err)
		}
		return nil, fmt.Errorf("%w: reading the import source: %w", ErrFailed, err)
	}
	if h.HasBacking() {
		return nil, fmt.Errorf("%w: import source for %q names backing file %q (%s); import self-contained images (qemu-img convert flattens one)", ErrInvalidArgument, req.Name, h.BackingFile, h.BackingFormat)
	}
	img, err := qcow2.OpenImage(req.Source, size, nil)
	if err != nil {
		if qcow2.IsRefusal(err) {
			return nil, fmt.Errorf("%w: import source for %q: %w", ErrPolicyViolation, req.Name, err)
		}
		return nil, fmt.Errorf("%w: import source for %q: %w", ErrFailed, req.Name, err)
	}
	return img, nil
}

// runImport is the import job: make the volume, copy, flush, commit.
func (m *Manager) runImport(ctx context.Context, j *job, p *pool, name, id string, src importSource, source SourceFile, opts qcow2.CreateOptions) {
	defer m.jobWG.Done()
	defer m.release(id)
	defer source.Close()
	if closer, ok := src.(io.Closer); ok {
		defer closer.Close()
	}
	fail := func(err error) {
		state := JobFailed
		if ctx.Err() != nil && !errors.Is(err, errSimulatedCrash) {
			state = JobCancelled
			m.log.Debug("import cancelled", "pool", p.cfg.Name, "volume", name, "id", id, "cause", err)
			err = fmt.Errorf("%w: import of %q cancelled; the volume was removed (%w)", ErrCancelled, name, context.Cause(ctx))
		}
		m.log.Warn("import failed", "pool", p.cfg.Name, "volume", name, "id", id, "state", state, "err", err)
		j.mu.Lock()
		j.err = err
		j.mu.Unlock()
		m.finishJob(j, state, err.Error())
	}
	meta := hostblk.VolumeMeta{Role: string(RoleBase), State: stateImporting}
	dev, file, _, err := m.makeVolume(ctx, p, "import", name, opts, meta)
	if err != nil {
		fail(err)
		return
	}
	v := &volume{info: VolumeInfo{ID: id, Name: name, Pool: p.cfg.Name, DevicePath: dev}, meta: meta, file: file}
	err = m.copyImport(ctx, j, p, v, src)
	if err == nil {
		err = m.crashPoint("import:data")
	}
	if err != nil {
		if !errors.Is(err, errSimulatedCrash) {
			if rerr := m.removeDevice(context.WithoutCancel(ctx), p, name); rerr != nil {
				m.log.Error("could not remove a half-imported volume; the next Load removes it", "pool", p.cfg.Name, "volume", name, "err", rerr)
			}
		}
		fail(err)
		return
	}
	// The data is flushed: finish even if cancelled now.
	if err := m.commit(context.WithoutCancel(ctx), p, "import", name, dev, meta); err != nil {
		fail(err)
		return
	}
	meta.State = ""
	nv := m.readVolume(p, name, dev, file, meta)
	m.register(nv)
	m.poolChanged(p)
	m.progress(j, src.Size())
	m.finishJob(j, JobSucceeded, "")
	m.log.Info("import finished", "pool", p.cfg.Name, "volume", name, "id", id, "bytes", src.Size())
}

// copyImport copies the source's guest view into the new volume's image
// with qcow2.CopyGuest, growing the device as the writer needs. Runs of
// zero clusters are skipped: the new image has no backing and reads zeros.
func (m *Manager) copyImport(ctx context.Context, j *job, p *pool, v *volume, src importSource) error {
	s, err := m.openWriteSession(p, v)
	if err != nil {
		return err
	}
	defer s.close()
	if m.hooks.importChunk != nil {
		m.hooks.importChunk(ctx, 0)
	}
	_, err = qcow2.CopyGuest(ctx, growingWriter{ctx: ctx, s: s}, src, qcow2.CopyOptions{
		SkipZeros:   true,
		BufferAlign: headerBlockSize,
		Progress: func(done, total int64) {
			m.progress(j, done)
			if m.hooks.importChunk != nil && done < total {
				m.hooks.importChunk(ctx, done) // before the next chunk
			}
		},
	})
	switch {
	case err == nil:
	case ctx.Err() != nil && Kind(err) == nil:
		return fmt.Errorf("%w: %w", ErrCancelled, err)
	case Kind(err) != nil:
		return err // the write session's, already of a kind
	default:
		return fmt.Errorf("%w: volume %q: %w", ErrFailed, v.info.Name, err)
	}
	if err := s.close(); err != nil {
		return fmt.Errorf("%w: volume %q: flushing: %w", ErrFailed, v.info.Name, err)
	}
	return nil
}

// growingWriter is a write session as qcow2.CopyGuest sees it: a write
// that finds the device full grows it and is retried (writeSession.do).
type growingWriter struct {
	ctx context.Context
	s   *writeSession
}

func (g growingWriter) Header() *qcow2.Header { return g.s.w.Header() }

func (g growingWriter) WriteAt(p []byte, off int64) (int, error) {
	err := g.s.do(g.ctx, int64(len(p)), func(w *qcow2.Writer) error {
		_, err := w.WriteAt(p, off)
		return err
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func (g growingWriter) WriteZeroes(off, n int64) error {
	return g.s.do(g.ctx, 0, func(w *qcow2.Writer) error { return w.WriteZeroes(off, n) })
}

func (g growingWriter) Flush() error {
	return g.s.do(g.ctx, 0, func(w *qcow2.Writer) error { return w.Flush() })
}
