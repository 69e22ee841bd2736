package hostblk

import (
	"os/exec"
	"strings"
	"testing"
)

// The loop index must see what other processes do to loop devices: a
// device losetup attached is found, one losetup detached is not returned.
func TestLoopIndexSeesOtherProcesses(t *testing.T) {
	testRoot(t)
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Fatal("losetup is required: ", err)
	}
	dir := testDir(t)
	a := sparseFile(t, dir, "a.img", 1<<20)
	b := sparseFile(t, dir, "b.img", 1<<20)
	// Build the index (and attach one device through it).
	mine := attachTestLoop(t, a, LoopOptions{})
	if got, err := FindLoops(a); err != nil || len(got) != 1 || got[0].Path != mine.Path {
		t.Fatalf("FindLoops(a) = %+v, %v; want [%s]", got, err, mine.Path)
	}

	out, err := exec.Command("losetup", "--find", "--show", b).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup --find --show %s: %v: %s", b, err, out)
	}
	theirs := strings.TrimSpace(string(out))
	t.Cleanup(func() { detachAllOver(t, b) })
	got, err := FindLoops(b)
	if err != nil || len(got) != 1 || got[0].Path != theirs {
		t.Fatalf("FindLoops(b) after losetup attached %s = %+v, %v", theirs, got, err)
	}

	if out, err := exec.Command("losetup", "-d", mine.Path).CombinedOutput(); err != nil {
		t.Fatalf("losetup -d %s: %v: %s", mine.Path, err, out)
	}
	if got, err := FindLoops(a); err != nil || len(got) != 0 {
		t.Fatalf("FindLoops(a) after losetup detached %s = %+v, %v; want none", mine.Path, got, err)
	}
}
