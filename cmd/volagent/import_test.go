package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
)

// importSource writes a raw source of size bytes: random data with zero
// stretches of several lengths (sub-cluster, whole clusters, many).
func importSource(t *testing.T, path string, size int64, seed uint64) []byte {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	for _, z := range [][2]int64{{0, 65536}, {1 << 20, 3 << 20}, {5<<20 + 100, 5000}, {size - 200<<10, 200 << 10}} {
		clear(b[z[0] : z[0]+z[1]])
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}

// qemuCheckJSON runs qemu-img check --output=json and returns its counts.
func qemuCheckJSON(t *testing.T, image string) (corruptions, leaks int) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "-f", "qcow2", "--output=json", image).Output()
	var exit *exec.ExitError
	if err != nil && !(errors.As(err, &exit) && (exit.ExitCode() == 2 || exit.ExitCode() == 3)) {
		t.Fatalf("qemu-img check %s: %v %s", image, err, out)
	}
	var res struct {
		Corruptions int `json:"corruptions"`
		Leaks       int `json:"leaks"`
		CheckErrors int `json:"check-errors"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("qemu-img check %s: %v: %s", image, err, out)
	}
	return res.Corruptions + res.CheckErrors, res.Leaks
}

// requireIdentical: qemu reads the same guest bytes from both images.
func requireIdentical(t *testing.T, rawSource, image string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "qcow2", rawSource, image).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img compare %s %s: %v\n%s", rawSource, image, err, out)
	}
}

// requireCleanBoth: qemu-img check and volagent check both find nothing.
func requireCleanBoth(t *testing.T, image string) {
	t.Helper()
	if c, l := qemuCheckJSON(t, image); c != 0 || l != 0 {
		t.Fatalf("qemu-img check %s: %d corruptions, %d leaks", image, c, l)
	}
	if stdout, stderr, code := runVolagent(t, "check", image); code != exitOK {
		t.Fatalf("volagent check %s: exit %d\n%s%s", image, code, stdout, stderr)
	}
}

// zeroExtents returns qemu-img map's extents that read zeros without data.
func zeroExtents(t *testing.T, image string) [][2]int64 {
	t.Helper()
	out := testutil.QemuImg(t, "map", "-f", "qcow2", "--output=json", image)
	var extents []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Depth  int   `json:"depth"`
		Zero   bool  `json:"zero"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal(out, &extents); err != nil {
		t.Fatal(err)
	}
	var zeros [][2]int64
	for _, e := range extents {
		if e.Zero && !e.Data && e.Depth == 0 {
			zeros = append(zeros, [2]int64{e.Start, e.Length})
		}
	}
	return zeros
}

func covered(extents [][2]int64, start, length int64) bool {
	for _, e := range extents {
		if e[0] <= start && start+length <= e[0]+e[1] {
			return true
		}
	}
	return false
}

// TestImportIntoLoopOverlay imports a raw disk into fresh overlays on loop
// devices (512- and 4096-byte sectors, direct I/O) whose backing differs
// from it: qemu sees the source exactly, the whole-cluster zero stretches
// became zero clusters (no data), and both checkers find nothing.
func TestImportIntoLoopOverlay(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "qemu-img")
	const size = 24 << 20
	for _, sector := range []int{512, 4096} {
		t.Run(fmt.Sprint("sector-", sector), func(t *testing.T) {
			dir := t.TempDir()
			source, base := filepath.Join(dir, "source.raw"), filepath.Join(dir, "base.raw")
			importSource(t, source, size, uint64(sector))
			importSource(t, base, size, uint64(sector)+1)
			dev := looptest.Device(t, 64<<20, sector)
			testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", dev, fmt.Sprint(size))
			stdout, stderr, code := runVolagent(t, "import", "--allow-backing", dir, source, dev)
			if code != exitOK {
				t.Fatalf("import: exit %d\n%s%s", code, stdout, stderr)
			}
			requireIdentical(t, source, dev)
			requireCleanBoth(t, dev)
			zeros := zeroExtents(t, dev)
			for _, z := range [][2]int64{{0, 65536}, {1 << 20, 3 << 20}} {
				if !covered(zeros, z[0], z[1]) {
					t.Errorf("zero range %d+%d of the source is not a zero cluster range in the overlay: %v", z[0], z[1], zeros)
				}
			}
		})
	}
}

// TestImportQcow2SourceIntoFile: a compressed qcow2 source into a qcow2
// file without backing: zero ranges are skipped (they read zeros already).
func TestImportQcow2SourceIntoFile(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	const size = 16 << 20
	dir := t.TempDir()
	rawSource := filepath.Join(dir, "source.raw")
	importSource(t, rawSource, size, 9)
	source := filepath.Join(dir, "source.qcow2")
	testutil.QemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", rawSource, source)
	target := filepath.Join(dir, "target.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", target, fmt.Sprint(size+4<<20))
	stdout, stderr, code := runVolagent(t, "import", "--source-format", "qcow2", "--json", source, target)
	if code != exitOK {
		t.Fatalf("import: exit %d\n%s%s", code, stdout, stderr)
	}
	// --json: one object per line, the last one "done".
	var last map[string]any
	sc := bufio.NewScanner(strings.NewReader(stdout))
	for sc.Scan() {
		last = nil
		if err := json.Unmarshal(sc.Bytes(), &last); err != nil {
			t.Fatalf("--json line %q: %v", sc.Text(), err)
		}
	}
	if last["event"] != "done" || last["bytes-total"] != float64(size+4<<20) {
		t.Fatalf("last --json line: %v", last)
	}
	// The target is 4 MiB larger: that tail reads zeros.
	padded := filepath.Join(dir, "padded.raw")
	testutil.Run(t, "cp", rawSource, padded)
	if err := os.Truncate(padded, size+4<<20); err != nil {
		t.Fatal(err)
	}
	requireIdentical(t, padded, target)
	requireCleanBoth(t, target)
	if data := last["data-bytes"].(float64); data >= size {
		t.Errorf("%v data bytes written for a source with zero ranges", data)
	}
}

// TestImportRefusals: usage and target errors, with their exit statuses.
func TestImportRefusals(t *testing.T) {
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	source := filepath.Join(dir, "source.raw")
	importSource(t, source, 8<<20, 3)
	small := filepath.Join(dir, "small.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", small, "4M")
	if _, stderr, code := runVolagent(t, "import", source, small); code != exitFailure || !strings.Contains(stderr, "larger than the virtual size") {
		t.Errorf("source larger than target: exit %d, %s", code, stderr)
	}
	target := filepath.Join(dir, "target.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", target, "8M")
	if _, stderr, code := runVolagent(t, "import", "--source-format", "vmdk", source, target); code != exitFailure {
		t.Errorf("--source-format vmdk: exit %d, %s", code, stderr)
	}
	// A second writer is refused while the first holds the image.
	held, err := hostblk.OpenTarget(target, false)
	if err != nil {
		t.Fatal(err)
	}
	_, stderr, code := runVolagent(t, "import", source, target)
	held.Close()
	if code != exitFailure || !strings.Contains(stderr, "another writer") {
		t.Errorf("import into a held image: exit %d, %s", code, stderr)
	}
	// A raw file named as TARGET is not a qcow2 image: refused (3).
	other := filepath.Join(dir, "other.raw")
	importSource(t, other, 8<<20, 4)
	if _, stderr, code := runVolagent(t, "import", source, other); code != exitRefused {
		t.Errorf("import into a raw file: exit %d, %s", code, stderr)
	}
	if _, stderr, code := runVolagent(t, "import", "--source-format", "qcow2", target, target); code != exitFailure || !strings.Contains(stderr, "same file") {
		t.Errorf("import of an image into itself: exit %d, %s", code, stderr)
	}
	// The target's backing file outside --allow-backing is refused.
	over := filepath.Join(dir, "over.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-b", source, "-F", "raw", over)
	if _, stderr, code := runVolagent(t, "import", source, over); code != exitRefused {
		t.Errorf("backing not allowed: exit %d, %s", code, stderr)
	}
}

// TestImportKilled kills import with SIGKILL at random moments while it
// writes to an overlay on a loop device: qemu-img check never finds
// corruption (leaks are allowed), volagent check agrees, and the part of
// SOURCE that --json progress reported durable reads back intact.
func TestImportKilled(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "qemu-img")
	const size = 2*importFlushBytes + 32<<20
	dir := t.TempDir()
	source, base := filepath.Join(dir, "source.raw"), filepath.Join(dir, "base.raw")
	want := importSource(t, source, size, 5)
	importSource(t, base, size, 6)
	dev := looptest.Device(t, size+64<<20, 512)
	bin := binaryUnderTest(t)
	guest := filepath.Join(dir, "guest.raw")

	// How long an uninterrupted import takes, to spread the kills over it.
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", dev, fmt.Sprint(size))
	start := time.Now()
	if _, stderr, code := runVolagent(t, "import", "--allow-backing", dir, source, dev); code != exitOK {
		t.Fatalf("import: exit %d: %s", code, stderr)
	}
	full := time.Since(start)
	requireIdentical(t, source, dev)

	r := rand.New(rand.NewPCG(11, 12))
	sawDurable := false
	// Kills 0-5 land at random moments; kill 6 lands right after the first
	// durable point is reported, so the durability check always runs.
	const kills = 7
	for i := range kills {
		testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", dev, fmt.Sprint(size))
		cmd := exec.Command(bin, "import", "--json", "--allow-backing", dir, source, dev)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		durable := make(chan int64, 1)
		// closed at the first durable point
		firstDurable := make(chan struct{})
		go func() { // the last durable-bytes reported before the kill
			var last int64
			signalled := false
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				var ev struct {
					Durable int64 `json:"durable-bytes"`
				}
				if json.Unmarshal(sc.Bytes(), &ev) == nil {
					last = max(last, ev.Durable)
				}
				if last > 0 && !signalled {
					close(firstDurable)
					signalled = true
				}
			}
			durable <- last
		}()
		delay := full/5 + time.Duration(r.Int64N(int64(full)))*7/10
		if i == kills-1 {
			// Not a sleep standing in for synchronisation: the random
			// moment is the point of kills 0-5. This one waits for the
			// positive signal instead.
			begun := time.Now()
			select {
			case <-firstDurable:
			case <-time.After(5*full + 30*time.Second):
				cmd.Process.Kill()
				t.Fatalf("kill %d: import --json reported no durable-bytes within %v (a full import takes %v)", i, 5*full+30*time.Second, full)
			}
			delay = time.Since(begun)
		} else {
			time.Sleep(delay)
		}
		cmd.Process.Signal(syscall.SIGKILL)
		flushed := <-durable
		err = cmd.Wait()
		corruptions, leaks := qemuCheckJSON(t, dev)
		t.Logf("kill %d after %v (full import %v): %v; %d bytes durable, %d leaks", i, delay, full, err, flushed, leaks)
		if corruptions != 0 {
			t.Fatalf("kill %d after %v: qemu-img check found %d corruptions", i, delay, corruptions)
		}
		_, vstderr, code := runVolagent(t, "check", dev)
		if want := map[bool]int{true: exitRefused, false: exitOK}[leaks > 0]; code != want {
			t.Fatalf("kill %d: volagent check exit %d, want %d (qemu: %d leaks): %s", i, code, want, leaks, vstderr)
		}
		if flushed > 0 {
			sawDurable = true
			testutil.QemuImg(t, "convert", "-f", "qcow2", "-O", "raw", dev, guest)
			got, err := os.ReadFile(guest)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:flushed], want[:flushed]) {
				t.Fatalf("kill %d: the first %d bytes were reported durable but do not read back", i, flushed)
			}
		}
	}
	if !sawDurable {
		t.Fatal("no kill came after a durable point, not even the one that waits for it: the durability of reported progress went unchecked")
	}
}

// TestImportForms: import is the local copy only (SOURCE TARGET); its old
// daemon form (--pool, --name, ...) fails with a usage error that names
// volumes import instead of doing anything, and volumes import is the one
// that dials the daemon.
func TestImportForms(t *testing.T) {
	dir := t.TempDir()
	source := filepath.Join(dir, "source.raw")
	importSource(t, source, 8<<20, 5)
	target := filepath.Join(dir, "target.qcow2")
	bus := "unix:path=" + filepath.Join(dir, "no-bus")
	const newName = "volagent volumes import --pool POOL --name NAME"
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"import", source}, "takes SOURCE and TARGET, not 1 arguments"},
		{[]string{"import", source, source, source}, "not 3 arguments"},
		{[]string{"import", "--pool", "p", "--name", "n", source}, "import [--pool --name]: import only copies locally"},
		{[]string{"import", "--pool", "p", "--name", "n", "--bus-address", bus, source}, "[--pool --name --bus-address]"},
		{[]string{"import", "--pool", "p", source, target}, "import [--pool]: import only copies locally"},
		{[]string{"import", "--name", "n", "--size", "1G", source, target}, "[--name --size]"},
		{[]string{"import", "--no-wait", source, target}, "[--no-wait]"},
	} {
		_, stderr, code := runVolagent(t, tc.args...)
		if code != exitFailure || !strings.Contains(stderr, tc.want) || !strings.Contains(stderr, newName) ||
			strings.Contains(stderr, "connecting to the bus") {
			t.Errorf("%q: exit %d, %s; want a usage error saying %q and naming %q", tc.args, code, stderr, tc.want, newName)
		}
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused import touched %s: %v", target, err)
	}
	// volumes import is the daemon's import: it dials the bus given (here
	// none answers).
	args := []string{"volumes", "import", "--pool", "p", "--name", "n", "--bus-address", bus, source}
	if _, stderr, code := runVolagent(t, args...); code != exitFailure || !strings.Contains(stderr, "connecting to the bus") {
		t.Errorf("%q: exit %d, %s; want it to dial the daemon", args, code, stderr)
	}
	// --help shows the local form and points to volumes import, without
	// the removed flags.
	stdout, _, code := runVolagent(t, "import", "--help")
	for _, want := range []string{"SOURCE TARGET", "volagent volumes import --pool POOL --name NAME"} {
		if code != exitOK || !strings.Contains(stdout, want) {
			t.Errorf("import --help (exit %d) does not show %q:\n%s", code, want, stdout)
		}
	}
	for _, gone := range []string{"--no-wait", "--bus-address", "--pool POOL --name NAME [--source-format raw|qcow2] [--size"} {
		if strings.Contains(stdout, gone) {
			t.Errorf("import --help still shows %q:\n%s", gone, stdout)
		}
	}
}
