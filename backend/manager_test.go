package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

var poolTypes = []PoolType{PoolLoop, PoolLVM}

// TestOverlayLifecycle: overlays over a raw base file and over another
// managed volume, on both pool types; qemu judges the images; listing,
// Write (with device growth), Resize, Check, Delete (refused while a
// volume is backed by it) and a restart that finds the same volumes.
func TestOverlayLifecycle(t *testing.T) {
	for _, typ := range poolTypes {
		t.Run(string(typ), func(t *testing.T) {
			e := newEnv(t, typ, PolicyEnforce)
			m := e.manager()
			ctx := context.Background()
			root := Caller{UID: 0}
			events, cancelEvents := m.Subscribe()
			defer cancelEvents()

			base := filepath.Join(e.roots, "base.raw")
			baseData := randomBytes(t, 1<<20)
			writeFile(t, base, 16<<20, map[int64][]byte{0: baseData})

			if pools := m.Pools(); len(pools) != 1 || pools[0].Name != "p" || pools[0].Type != typ || pools[0].Capacity <= 0 || pools[0].Free <= 0 {
				t.Fatalf("Pools() = %+v", pools)
			}
			if _, err := m.Pool("nope"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Pool(nope): %v", err)
			}

			lower, err := m.CreateOverlay(ctx, root, OverlayRequest{Pool: "p", Name: "lower", BackingPath: base, BackingFormat: "raw"})
			if err != nil {
				t.Fatal(err)
			}
			if lower.ID != VolumeID("p", "lower") || lower.Format != "qcow2" || lower.VirtualSize != 16<<20 ||
				lower.BackingName != base || lower.BackingFormat != "raw" || lower.Role != RoleOverlay || lower.Problem != "" {
				t.Fatalf("lower = %+v", lower)
			}
			if lower.DeviceSize < testInitialSize || lower.DeviceSize > 2*testInitialSize {
				t.Errorf("thin overlay device is %d bytes, want about the initial size %d", lower.DeviceSize, testInitialSize)
			}
			info := qemuInfo(t, lower.DevicePath)
			if info["backing-filename"] != base || info["backing-filename-format"] != "raw" || info["virtual-size"] != float64(16<<20) {
				t.Fatalf("qemu-img info of %s: %v", lower.DevicePath, info)
			}
			qemuCheck(t, lower.DevicePath)
			expectEvent(t, events, EventVolumeAdded, lower.ID)

			// An overlay over the managed volume, with a larger virtual size.
			upper, err := m.CreateOverlay(ctx, root, OverlayRequest{Pool: "p", Name: "upper", BackingVolume: lower.ID, VirtualSize: 32 << 20})
			if err != nil {
				t.Fatal(err)
			}
			info = qemuInfo(t, upper.DevicePath)
			if info["backing-filename"] != upper.BackingName || upper.BackingFormat != "qcow2" || info["backing-filename-format"] != "qcow2" || upper.VirtualSize != 32<<20 {
				t.Fatalf("upper = %+v; qemu-img info: %v", upper, info)
			}
			// The guest view goes through the whole chain.
			testutil.QemuIO(t, "qcow2", upper.DevicePath, fmt.Sprintf("read -P 0 %d 64k", 1<<20))
			got := testutil.QemuGuestBytes(t, "qcow2", upper.DevicePath)
			if string(got[:len(baseData)]) != string(baseData) {
				t.Fatal("upper's guest view does not start with the base's data")
			}

			vols := m.Volumes()
			if len(vols) != 2 || vols[0].Name != "lower" || vols[1].Name != "upper" {
				t.Fatalf("Volumes() = %+v", vols)
			}
			if v, err := m.Volume(upper.ID); err != nil || v.Name != "upper" {
				t.Fatalf("Volume(upper) = %+v, %v", v, err)
			}
			_, err = m.CreateOverlay(ctx, root, OverlayRequest{Pool: "p", Name: "upper", BackingVolume: lower.ID})
			mustErrIs(t, err, ErrInvalidArgument)

			// Write: 6 MiB does not fit the 4 MiB initial device, so it grows.
			data := pattern(0xab, 6<<20)
			if err := m.Write(ctx, root, upper.ID, 4096, data); err != nil {
				t.Fatal(err)
			}
			after, _ := m.Volume(upper.ID)
			if after.DeviceSize <= upper.DeviceSize || after.HighestAllocated < 6<<20 {
				t.Errorf("after a 6 MiB write: device %d (was %d), highest allocated %d", after.DeviceSize, upper.DeviceSize, after.HighestAllocated)
			}
			testutil.QemuIO(t, "qcow2", upper.DevicePath, "read -P 0xab 4096 6M")
			// The partial first cluster kept the base's bytes before 4096.
			got = testutil.QemuGuestBytes(t, "qcow2", upper.DevicePath)
			if string(got[:4096]) != string(baseData[:4096]) {
				t.Error("copy-on-write lost the backing's bytes before the write")
			}
			qemuCheck(t, upper.DevicePath)
			mustErrIs(t, m.Write(ctx, root, upper.ID, 32<<20-10, make([]byte, 20)), ErrInvalidArgument)

			res, err := m.Check(ctx, upper.ID)
			if err != nil || !res.Clean() {
				t.Fatalf("Check: %+v, %v", res, err)
			}

			// Resize.
			if err := m.Resize(ctx, root, upper.ID, 64<<20); err != nil {
				t.Fatal(err)
			}
			if info := qemuInfo(t, upper.DevicePath); info["virtual-size"] != float64(64<<20) {
				t.Fatalf("after resize: %v", info)
			}
			qemuCheck(t, upper.DevicePath)
			if v, _ := m.Volume(upper.ID); v.VirtualSize != 64<<20 {
				t.Fatalf("Volume after resize: %+v", v)
			}
			mustErrIs(t, m.Resize(ctx, root, upper.ID, 32<<20), ErrInvalidArgument)
			mustErrIs(t, m.Resize(ctx, root, upper.ID, 64<<20+1), ErrInvalidArgument)

			// Restart: a new Manager over the same devices sees the same.
			m2 := e.manager()
			if got := m2.Volumes(); !sameVolumes(got, m.Volumes()) {
				t.Fatalf("after restart:\n%+v\nbefore:\n%+v", got, m.Volumes())
			}

			// Delete and Write: lower backs upper.
			mustErrIs(t, m.Delete(ctx, root, lower.ID), ErrBusy)
			mustErrIs(t, m.Write(ctx, root, lower.ID, 0, []byte{1}), ErrBusy)

			if typ == PoolLVM {
				// A pool whose initial size exceeds the volume group.
				big := *e.cfg
				big.Pools = []PoolConfig{e.cfg.Pools[0]}
				big.Pools[0].InitialSize = 1 << 30
				mb, err := NewManager(&big, ManagerOptions{LVM: e.lvm})
				if err != nil {
					t.Fatal(err)
				}
				defer mb.Close()
				if err := mb.Load(ctx); err != nil {
					t.Fatal(err)
				}
				_, err = mb.CreateOverlay(ctx, root, OverlayRequest{Pool: "p", Name: "huge", BackingPath: base, BackingFormat: "raw"})
				mustErrIs(t, err, ErrNoSpace)
				if !strings.Contains(err.Error(), "the volume needs 1.0 GiB (initial size)") {
					t.Errorf("ErrNoSpace message: %v", err)
				}
			}
			if err := m.Delete(ctx, root, upper.ID); err != nil {
				t.Fatal(err)
			}
			expectEvent(t, events, EventVolumeRemoved, upper.ID)
			if err := m.Delete(ctx, root, lower.ID); err != nil {
				t.Fatal(err)
			}
			mustErrIs(t, m.Delete(ctx, root, lower.ID), ErrNotFound)
			if len(m.Volumes()) != 0 {
				t.Fatalf("volumes left: %+v", m.Volumes())
			}
			if vols, loops := e.leftovers(); len(vols) != 0 || len(loops) != 0 {
				t.Fatalf("left on the host: volumes %v, loop devices %v", vols, loops)
			}
		})
	}
}

func sameVolumes(a, b []VolumeInfo) bool {
	return slices.Equal(a, b)
}

// expectEvent waits for an event of kind about volume id, skipping others.
func expectEvent(t *testing.T, events <-chan Event, kind EventKind, id string) Event {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case e := <-events:
			if e.Kind != kind {
				continue
			}
			switch {
			case e.Volume != nil && e.Volume.ID == id, e.VolumeID == id, e.Job != nil && e.Job.Volume == id, id == "":
				return e
			}
		case <-timeout:
			t.Fatalf("no %s event for %q", kind, id)
		}
	}
}

func TestDeleteRefusesOpenDevice(t *testing.T) {
	m, v := newLoopOverlay(t)
	ctx := context.Background()
	// A "VM" holding the device exclusively.
	f, err := os.OpenFile(v.DevicePath, os.O_RDWR|syscall.O_EXCL, 0)
	if err != nil {
		t.Fatal(err)
	}
	mustErrIs(t, m.Delete(ctx, Caller{}, v.ID), ErrBusy)
	mustErrIs(t, m.Write(ctx, Caller{}, v.ID, 0, []byte{1}), ErrBusy)
	f.Close()
	if err := m.Delete(ctx, Caller{}, v.ID); err != nil {
		t.Fatal(err)
	}
}

// TestResizeMovesL1: with 4 KiB clusters one L1 cluster maps 1 GiB;
// going past it moves the L1 table (qcow2.Resize), and qemu finds the
// image clean with the new size.
func TestResizeMovesL1(t *testing.T) {
	e := newEnv(t, PoolLoop, PolicyEnforce)
	m := e.manager()
	ctx := context.Background()
	base := filepath.Join(e.roots, "base.raw")
	writeFile(t, base, 1<<20, nil)
	v, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "small", BackingPath: base, BackingFormat: "raw", ClusterSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	for _, size := range []int64{1 << 30, 1<<30 + 512, 5 << 30} {
		if err := m.Resize(ctx, Caller{}, v.ID, size); err != nil {
			t.Fatal(err)
		}
		qemuCheck(t, v.DevicePath)
		var info struct {
			VirtualSize int64 `json:"virtual-size"`
		}
		out, err := exec.Command("qemu-img", "info", "-U", "-f", "qcow2", "--output=json", v.DevicePath).Output()
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(out, &info); err != nil || info.VirtualSize != size {
			t.Fatalf("qemu-img info: virtual size %d (%v), want %d", info.VirtualSize, err, size)
		}
	}
}

func TestImport(t *testing.T) {
	for _, typ := range poolTypes {
		t.Run(string(typ), func(t *testing.T) {
			e := newEnv(t, typ, PolicyEnforce)
			m := e.manager()
			ctx := context.Background()
			events, cancelEvents := m.Subscribe()
			defer cancelEvents()

			// 20 MiB, mostly sparse, with data across the 8 MiB chunk
			// boundary and in a partial last sector.
			src := filepath.Join(e.outside, "disk.raw")
			writeFile(t, src, 20<<20+1000, map[int64][]byte{
				0:          randomBytes(t, 100<<10),
				8<<20 - 77: randomBytes(t, 3<<20),
				20 << 20:   randomBytes(t, 1000),
			})
			job, err := m.Import(ctx, Caller{UID: 1000}, ImportRequest{Pool: "p", Name: "base", Source: openSource(t, src), SourceFormat: "raw"})
			if err != nil {
				t.Fatal(err)
			}
			if job.State != JobRunning || job.Operation != "import" || job.StartedBy != 1000 || job.TotalBytes != 20<<20+1000 {
				t.Fatalf("job = %+v", job)
			}
			done := waitJob(t, m, job.ID)
			if done.State != JobSucceeded || done.Bytes != done.TotalBytes || done.Progress != 1 {
				t.Fatalf("job = %+v", done)
			}
			expectEvent(t, events, EventJobCompleted, job.Volume)
			v, err := m.Volume(job.Volume)
			if err != nil || v.Role != RoleBase || v.BackingName != "" || v.VirtualSize != 20<<20+1024 {
				t.Fatalf("imported volume %+v, %v", v, err)
			}
			qemuCheck(t, v.DevicePath)
			// qemu compares the guest views; the extra 24 bytes read zeros.
			testutil.QemuImg(t, "compare", "-f", "raw", "-F", "qcow2", src, v.DevicePath)

			// A qcow2 source, made by qemu from the raw one.
			qsrc := filepath.Join(e.outside, "disk.qcow2")
			testutil.QemuImg(t, "convert", "-f", "raw", "-O", "qcow2", src, qsrc)
			job2, err := m.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: "base2", Source: openSource(t, qsrc), SourceFormat: "qcow2", VirtualSize: 32 << 20})
			if err != nil {
				t.Fatal(err)
			}
			if done := waitJob(t, m, job2.ID); done.State != JobSucceeded {
				t.Fatalf("job = %+v", done)
			}
			v2, _ := m.Volume(job2.Volume)
			if v2.VirtualSize != 32<<20 {
				t.Fatalf("VirtualSize %d", v2.VirtualSize)
			}
			testutil.QemuImg(t, "compare", "-f", "qcow2", "-F", "qcow2", qsrc, v2.DevicePath)
			qemuCheck(t, v2.DevicePath)

			// An overlay over an imported base.
			if _, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "vm", BackingVolume: v.ID}); err != nil {
				t.Fatal(err)
			}

			// Refused sources.
			_, err = m.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: "x", Source: openSource(t, qsrc), SourceFormat: "raw"})
			mustErrIs(t, err, ErrPolicyViolation) // a qcow2 header in a raw source
			_, err = m.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: "x", Source: openSource(t, src), SourceFormat: "qcow2"})
			mustErrIs(t, err, ErrPolicyViolation) // not qcow2
			_, err = m.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: "x", Source: openSource(t, src), SourceFormat: ""})
			mustErrIs(t, err, ErrInvalidArgument)
			_, err = m.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: "base", Source: openSource(t, src), SourceFormat: "raw"})
			mustErrIs(t, err, ErrInvalidArgument) // name taken
			_, err = m.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: "x", Source: openSource(t, src), SourceFormat: "raw", VirtualSize: 1 << 20})
			mustErrIs(t, err, ErrInvalidArgument) // smaller than the source
			if vols, _ := e.leftovers(); len(vols) != 3 {
				t.Fatalf("volumes on the host: %v", vols)
			}
		})
	}
}

// TestImportProgressAndCancel: a job held at its second chunk shows its
// progress, refuses a cancel from another user, and when cancelled by
// its owner removes its volume.
func TestImportProgressAndCancel(t *testing.T) {
	for _, typ := range poolTypes {
		t.Run(string(typ), func(t *testing.T) {
			e := newEnv(t, typ, PolicyEnforce)
			m := e.manager()
			ctx := context.Background()
			atSecondChunk := make(chan struct{})
			m.hooks.importChunk = func(ctx context.Context, off int64) {
				if off == importChunkSize {
					close(atSecondChunk)
					<-ctx.Done()
				}
			}
			src := filepath.Join(e.outside, "disk.raw")
			writeFile(t, src, 24<<20, map[int64][]byte{0: randomBytes(t, 1<<20)})
			job, err := m.Import(ctx, Caller{UID: 1000}, ImportRequest{Pool: "p", Name: "big", Source: openSource(t, src), SourceFormat: "raw"})
			if err != nil {
				t.Fatal(err)
			}
			<-atSecondChunk
			info, err := m.Job(job.ID)
			if err != nil || info.State != JobRunning || info.Bytes != importChunkSize || info.Progress <= 0.3 || info.Progress >= 0.4 {
				t.Fatalf("job at the second chunk: %+v, %v", info, err)
			}
			if _, err := m.Volume(job.Volume); !errors.Is(err, ErrNotFound) {
				t.Fatalf("a volume being imported is listed: %v", err)
			}
			mustErrIs(t, m.CancelJob(Caller{UID: 1001}, job.ID), ErrNotAuthorized)
			if err := m.CancelJob(Caller{UID: 1000}, job.ID); err != nil {
				t.Fatal(err)
			}
			done := waitJob(t, m, job.ID)
			if done.State != JobCancelled || !strings.Contains(done.Message, "cancelled") {
				t.Fatalf("job = %+v", done)
			}
			// The job's error is a Cancelled that still says why.
			if j, err := m.job(job.ID); err != nil {
				t.Fatal(err)
			} else {
				mustErrIs(t, j.err, ErrCancelled)
				if !errors.Is(j.err, context.Canceled) {
					t.Fatalf("cancelled import's error %v does not match context.Canceled", j.err)
				}
			}
			mustErrIs(t, m.CancelJob(Caller{UID: 0}, job.ID), ErrInvalidArgument)
			if jobs := m.Jobs(); len(jobs) != 1 || jobs[0].ID != job.ID {
				t.Fatalf("Jobs() = %+v", jobs)
			}
			if vols, loops := e.leftovers(); len(vols) != 0 || len(loops) != 0 {
				t.Fatalf("a cancelled import left volumes %v, loop devices %v", vols, loops)
			}

			// Close cancels a running job and waits for it.
			m.hooks.importChunk = func(ctx context.Context, off int64) {
				if off == importChunkSize {
					<-ctx.Done()
				}
			}
			job, err = m.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: "big", Source: openSource(t, src), SourceFormat: "raw"})
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Close(); err != nil {
				t.Fatal(err)
			}
			if info, _ := m.Job(job.ID); info.State != JobCancelled {
				t.Fatalf("after Close: %+v", info)
			}
			if vols, loops := e.leftovers(); len(vols) != 0 || len(loops) != 0 {
				t.Fatalf("Close left volumes %v, loop devices %v", vols, loops)
			}
		})
	}
}

// TestPolicy: enforce refuses a backing outside the roots and a backing
// whose own chain leaves them; audit allows both and signals them.
func TestPolicy(t *testing.T) {
	for _, policy := range []PolicyMode{PolicyEnforce, PolicyAudit} {
		t.Run(string(policy), func(t *testing.T) {
			e := newEnv(t, PoolLoop, policy)
			m := e.manager()
			ctx := context.Background()
			events, cancelEvents := m.Subscribe()
			defer cancelEvents()

			outside := filepath.Join(e.outside, "secret.raw")
			writeFile(t, outside, 1<<20, nil)
			sneaky := filepath.Join(e.roots, "sneaky.qcow2")
			testutil.MakeQcow2(t, sneaky, "", "1M", outside, "raw")
			symlink := filepath.Join(e.roots, "link.raw")
			if err := os.Symlink(outside, symlink); err != nil {
				t.Fatal(err)
			}

			for i, req := range []OverlayRequest{
				{Pool: "p", Name: "a", BackingPath: outside, BackingFormat: "raw"},
				{Pool: "p", Name: "b", BackingPath: sneaky, BackingFormat: "qcow2"},
				{Pool: "p", Name: "c", BackingPath: symlink, BackingFormat: "raw"},
			} {
				v, err := m.CreateOverlay(ctx, Caller{}, req)
				if policy == PolicyEnforce {
					mustErrIs(t, err, ErrPolicyViolation)
					if !errors.Is(err, qcow2.ErrNotAllowed) {
						t.Fatalf("request %d: refusal %v does not match qcow2.ErrNotAllowed", i, err)
					}
					continue
				}
				if err != nil {
					t.Fatalf("request %d in audit mode: %v", i, err)
				}
				ev := expectEvent(t, events, EventPolicyViolation, "")
				if ev.Violation == nil || ev.Violation.Code != "not-allowed" {
					t.Fatalf("request %d: violation event %+v", i, ev.Violation)
				}
				if v.BackingName != req.BackingPath {
					t.Fatalf("request %d: %+v", i, v)
				}
			}
			want := 0
			if policy == PolicyAudit {
				want = 3
			}
			if vols, _ := e.leftovers(); len(vols) != want || len(m.Volumes()) != want {
				t.Fatalf("volumes: host %v, listed %+v; want %d", vols, m.Volumes(), want)
			}

			// Always refused, whatever the policy: relative paths, no
			// format, a missing file.
			_, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "d", BackingPath: "images/x.raw", BackingFormat: "raw"})
			mustErrIs(t, err, ErrInvalidArgument)
			_, err = m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "d", BackingPath: outside})
			mustErrIs(t, err, ErrInvalidArgument)
			_, err = m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "d", BackingPath: filepath.Join(e.roots, "missing.raw"), BackingFormat: "raw"})
			mustErrIs(t, err, ErrNotFound)
			_, err = m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "../d", BackingPath: outside, BackingFormat: "raw"})
			mustErrIs(t, err, ErrInvalidArgument)
			_, err = m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "nope", Name: "d", BackingPath: outside, BackingFormat: "raw"})
			mustErrIs(t, err, ErrNotFound)
			_, err = m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "d", BackingVolume: VolumeID("p", "none")})
			mustErrIs(t, err, ErrNotFound)
		})
	}
}

// TestCrashCleanup stops CreateOverlay, Import and Delete after each of
// their steps as if the process died, then loads a new Manager: it must
// remove what was half-made (no LV, file or loop device left, nothing
// listed) and keep what was complete.
func TestCrashCleanup(t *testing.T) {
	steps := map[PoolType][]string{
		PoolLoop: {"create:device", "create:header", "create:committed",
			"import:device", "import:header", "import:data", "import:committed", "delete:marked"},
		PoolLVM: {"create:device", "create:activated", "create:header", "create:committed",
			"import:device", "import:activated", "import:header", "import:data", "import:committed", "delete:marked"},
	}
	for _, typ := range poolTypes {
		t.Run(string(typ), func(t *testing.T) {
			e := newEnv(t, typ, PolicyEnforce)
			ctx := context.Background()
			base := filepath.Join(e.roots, "base.raw")
			writeFile(t, base, 4<<20, map[int64][]byte{0: randomBytes(t, 4096)})
			for _, step := range steps[typ] {
				crashed := e.manager()
				var err error
				if strings.HasPrefix(step, "delete:") {
					v, cerr := crashed.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "vol", BackingPath: base, BackingFormat: "raw"})
					if cerr != nil {
						t.Fatal(cerr)
					}
					crashed.hooks.crashAfter = func(s string) bool { return s == step }
					err = crashed.Delete(ctx, Caller{}, v.ID)
				} else {
					crashed.hooks.crashAfter = func(s string) bool { return s == step }
					if strings.HasPrefix(step, "create:") {
						_, err = crashed.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "vol", BackingPath: base, BackingFormat: "raw"})
					} else {
						var job JobInfo
						job, err = crashed.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: "vol", Source: openSource(t, base), SourceFormat: "raw"})
						if err == nil {
							info := waitJob(t, crashed, job.ID)
							if info.State != JobFailed || !strings.Contains(info.Message, "simulated crash") {
								t.Fatalf("step %s: job %+v", step, info)
							}
							err = errors.New(info.Message)
						}
					}
				}
				if err == nil || !strings.Contains(err.Error(), "simulated crash") {
					t.Fatalf("step %s: no simulated crash: %v", step, err)
				}
				if vols, _ := e.leftovers(); len(vols) == 0 && step != "delete:marked" {
					t.Fatalf("step %s: the crash left nothing to clean up; the test proves nothing", step)
				}
				crashed.Close()

				fresh := e.manager()
				listed := fresh.Volumes()
				vols, loops := e.leftovers()
				complete := strings.HasSuffix(step, ":committed")
				if complete {
					// The volume was complete: it stays, and is good.
					if len(listed) != 1 || listed[0].Name != "vol" || listed[0].Problem != "" || len(vols) != 1 || len(loops) != 1 {
						t.Fatalf("step %s: listed %+v, host volumes %v, loops %v", step, listed, vols, loops)
					}
					qemuCheck(t, listed[0].DevicePath)
					if err := fresh.Delete(ctx, Caller{}, listed[0].ID); err != nil {
						t.Fatal(err)
					}
				} else if len(listed) != 0 || len(vols) != 0 || len(loops) != 0 {
					t.Fatalf("step %s: after Load: listed %+v, host volumes %v, loops %v", step, listed, vols, loops)
				}
				// Load again: idempotent.
				if err := fresh.Load(ctx); err != nil {
					t.Fatal(err)
				}
				if vols, loops := e.leftovers(); len(vols) != 0 || len(loops) != 0 {
					t.Fatalf("step %s: after cleanup: host volumes %v, loops %v", step, vols, loops)
				}
				fresh.Close()
			}
		})
	}
}

// TestRefusedHeaderListed: a managed volume whose header is damaged is
// listed with its problem, not dropped, and can still be deleted.
func TestRefusedHeaderListed(t *testing.T) {
	m, v := newLoopOverlay(t)
	ctx := context.Background()
	// Damage the magic through the device.
	f, err := os.OpenFile(v.DevicePath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("XXXX"), 0); err != nil {
		t.Fatal(err)
	}
	f.Sync()
	f.Close()
	if err := m.Rescan(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := m.Volume(v.ID)
	if err != nil || got.Problem == "" || got.Format != "" {
		t.Fatalf("damaged volume: %+v, %v", got, err)
	}
	mustErrIs(t, m.Write(ctx, Caller{}, v.ID, 0, []byte{1}), ErrFailed)
	_, err = m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "over", BackingVolume: v.ID})
	mustErrIs(t, err, ErrPolicyViolation)
	if err := m.Delete(ctx, Caller{}, v.ID); err != nil {
		t.Fatal(err)
	}
}

func TestInspect(t *testing.T) {
	m, err := NewManager(&Config{}, ManagerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	path := filepath.Join(t.TempDir(), "x.qcow2")
	testutil.MakeQcow2(t, path, "", "1M", "/etc/passwd", "raw")
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	rep, err := m.Inspect(context.Background(), f, st.Size(), "x.qcow2", "qcow2")
	if err != nil || rep.Verdict != "accepted" || rep.Qcow2 == nil || rep.Qcow2.BackingFile != "/etc/passwd" {
		t.Fatalf("Inspect: %+v, %v", rep, err)
	}
	_, err = m.Inspect(context.Background(), f, st.Size(), "x.qcow2", "")
	mustErrIs(t, err, ErrInvalidArgument)
}

// TestImportPoolFull: an import larger than an LVM pool (loop activation,
// a 512 MiB PV) fails with ErrNoSpace naming the pool and the sizes, and
// leaves no volume behind and the pool's free space as it was. Before the
// fix a grow asked for a whole ChunkSize or nothing, so an import that
// fits failed too; that one must now succeed.
func TestImportPoolFull(t *testing.T) {
	e := newEnv(t, PoolLVM, PolicyEnforce)
	// A chunk bigger than what is left once the import is under way.
	e.cfg.Pools[0].ChunkSize = 256 << 20
	m := e.manager()
	ctx := context.Background()
	before, err := m.Pool("p")
	if err != nil {
		t.Fatal(err)
	}
	// Non-zero everywhere, so every byte needs space.
	src := filepath.Join(e.outside, "big.raw")
	const tooBig = 600 << 20
	chunks := map[int64][]byte{}
	for off := int64(0); off < tooBig; off += 8 << 20 {
		chunks[off] = pattern(0x5a, 8<<20)
	}
	writeFile(t, src, tooBig, chunks)
	job, err := m.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: "big", Source: openSource(t, src), SourceFormat: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	done := waitJob(t, m, job.ID)
	if done.State != JobFailed {
		t.Fatalf("job = %+v", done)
	}
	j, err := m.job(job.ID)
	if err != nil {
		t.Fatal(err)
	}
	mustErrIs(t, j.err, ErrNoSpace)
	for _, want := range []string{`pool "p"`, e.vg, `volume "big"`, "MiB free of", "needs its device grown from"} {
		if !strings.Contains(done.Message, want) {
			t.Errorf("message %q does not say %q", done.Message, want)
		}
	}
	if vols, loops := e.leftovers(); len(vols) != 0 || len(loops) != 0 {
		t.Fatalf("a failed import left volumes %v, loop devices %v", vols, loops)
	}
	if len(m.Volumes()) != 0 {
		t.Fatalf("volumes listed: %+v", m.Volumes())
	}
	if after, _ := m.Pool("p"); after.Free != before.Free {
		t.Fatalf("pool free space %d after the failed import, %d before", after.Free, before.Free)
	}

	// 400 MiB fit in the 508 MiB pool, though not with whole 256 MiB chunks.
	const fits = 400 << 20
	if err := os.Truncate(src, fits); err != nil {
		t.Fatal(err)
	}
	job, err = m.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: "fits", Source: openSource(t, src), SourceFormat: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	if done := waitJob(t, m, job.ID); done.State != JobSucceeded {
		t.Fatalf("job = %+v", done)
	}
	v, err := m.Volume(job.Volume)
	if err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, v.DevicePath)
	testutil.QemuImg(t, "compare", "-f", "raw", "-F", "qcow2", src, v.DevicePath)
}

// TestCloseRefusesNewWork: once Close has begun, every mutating call is
// refused with ErrBusy ("shutting down"), also when racing with Close
// (run with -race); the calls admitted before Close finish first.
func TestCloseRefusesNewWork(t *testing.T) {
	e := newEnv(t, PoolLoop, PolicyEnforce)
	m := e.manager()
	ctx := context.Background()
	base := filepath.Join(e.roots, "base.raw")
	writeFile(t, base, 8<<20, map[int64][]byte{0: randomBytes(t, 4096)})
	v, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "vm", BackingPath: base, BackingFormat: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	calls := map[string]func(i int) error{
		"CreateOverlay": func(i int) error {
			_, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: fmt.Sprintf("o%d", i), BackingPath: base, BackingFormat: "raw"})
			return err
		},
		"Import": func(i int) error {
			_, err := m.Import(ctx, Caller{}, ImportRequest{Pool: "p", Name: fmt.Sprintf("i%d", i), Source: openSource(t, base), SourceFormat: "raw"})
			return err
		},
		"Write":  func(i int) error { return m.Write(ctx, Caller{}, v.ID, int64(i)*4096, pattern(byte(i), 4096)) },
		"Resize": func(i int) error { return m.Resize(ctx, Caller{}, v.ID, 16<<20+int64(i)*512) },
		"Delete": func(i int) error { return m.Delete(ctx, Caller{}, VolumeID("p", fmt.Sprintf("o%d", i))) },
		"Rescan": func(int) error { return m.Rescan(ctx) },
		"GrowVolume": func(i int) error {
			_, err := m.GrowVolume(ctx, Caller{}, v.ID, v.DeviceSize+int64(i+1)<<20)
			return err
		},
	}
	// Racing: each call either completes as usual or is refused.
	var wg sync.WaitGroup
	for _, call := range calls {
		for i := range 3 {
			wg.Go(func() {
				if err := call(i); err != nil && strings.Contains(err.Error(), "shutting down") {
					mustErrIs(t, err, ErrBusy)
				}
			})
		}
	}
	closed := make(chan error)
	go func() { closed <- m.Close() }()
	wg.Wait()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	// After Close: every one refused, with the kind and the reason.
	for name, call := range calls {
		err := call(9)
		mustErrIs(t, err, ErrBusy)
		if !strings.Contains(err.Error(), "volagent is shutting down") || !strings.Contains(err.Error(), name) {
			t.Errorf("%s after Close: %v", name, err)
		}
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
