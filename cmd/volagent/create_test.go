package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/volagent/volagent/internal/bytesize"
	"github.com/volagent/volagent/internal/looptest"
	"github.com/volagent/volagent/internal/testutil"
)

// createBackingsForCLI writes a raw backing of 0x5a bytes and a qcow2
// backing whose data reads 0x3c, both 64 MiB, into dir.
func createBackingsForCLI(t *testing.T, dir string) (rawPath, qcowPath string) {
	t.Helper()
	testutil.RequireTool(t, "qemu-img", "qemu-io")
	rawPath = filepath.Join(dir, "base.raw")
	if err := os.WriteFile(rawPath, bytes.Repeat([]byte{0x5a}, 64<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	qcowPath = filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", qcowPath, "64M")
	testutil.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 64M", qcowPath)
	return rawPath, qcowPath
}

func createPatternOf(format string) string {
	if format == "raw" {
		return "0x5a"
	}
	return "0x3c"
}

// createdFacts is the part of `volagent create --json` the tests compare.
type createdFacts struct {
	TargetType       string `json:"target-type"`
	LogicalBlockSize int    `json:"logical-block-size"`
	DirectIO         bool   `json:"direct-io"`
	VirtualSize      int64  `json:"virtual-size"`
	ClusterSize      int64  `json:"cluster-size"`
	BackingFile      string `json:"backing-file"`
	BackingFormat    string `json:"backing-format"`
	MetadataBytes    int64  `json:"metadata-bytes"`
}

// runCreateJSON runs `volagent create --json ARGS...`, requires exit 0 and
// returns the printed facts.
func runCreateJSON(t *testing.T, args ...string) createdFacts {
	t.Helper()
	stdout, stderr, code := runVolagent(t, append([]string{"create", "--json"}, args...)...)
	if code != 0 {
		t.Fatalf("volagent create %q: exit %d\nstderr: %s", args, code, stderr)
	}
	var facts createdFacts
	if err := json.Unmarshal([]byte(stdout), &facts); err != nil {
		t.Fatalf("volagent create --json output %q: %v", stdout, err)
	}
	return facts
}

// qemuJudgesCreated runs qemu-img check on the image alone (backing not
// opened) and qemu-img info, and compares info with what was asked.
func qemuJudgesCreated(t *testing.T, path string, virtualSize, clusterSize int64, backing, format string) {
	t.Helper()
	driver := "file"
	if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeDevice != 0 {
		driver = "host_device"
	}
	spec := fmt.Sprintf(`json:{"driver":"qcow2","file":{"driver":%q,"filename":%q},"backing":null}`, driver, path)
	out, err := exec.Command("qemu-img", "check", "--output=json", spec).CombinedOutput()
	var check struct {
		CheckErrors int `json:"check-errors"`
		Corruptions int `json:"corruptions"`
		Leaks       int `json:"leaks"`
	}
	if err != nil || json.Unmarshal(out, &check) != nil || check.CheckErrors+check.Corruptions+check.Leaks != 0 {
		t.Fatalf("qemu-img check %s: %v\n%s", path, err, out)
	}
	out = testutil.Run(t, "qemu-img", "info", "--output=json", "-f", "qcow2", path)
	var info struct {
		VirtualSize   int64  `json:"virtual-size"`
		ClusterSize   int64  `json:"cluster-size"`
		BackingFile   string `json:"backing-filename"`
		BackingFormat string `json:"backing-filename-format"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info %s: %v\n%s", path, err, out)
	}
	if info.VirtualSize != virtualSize || info.ClusterSize != clusterSize || info.BackingFile != backing || info.BackingFormat != format {
		t.Fatalf("qemu-img info %s:\n%s\nwant virtual size %d, cluster size %d, backing %q format %q",
			path, out, virtualSize, clusterSize, backing, format)
	}
}

// qemuIOOnCreated runs one qemu-io command on the image with its backing and
// fails on any failure, a pattern mismatch included.
func qemuIOOnCreated(t *testing.T, path, command string) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", command, path).CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("failed")) {
		t.Fatalf("qemu-io -c %q %s: %v\n%s", command, path, err, out)
	}
}

// exerciseCreated reads unwritten data as the backing's, writes 64 KiB,
// checks the image again and reads the write back.
func exerciseCreated(t *testing.T, path, backingFormat string, virtualSize, clusterSize int64, backing string) {
	t.Helper()
	qemuIOOnCreated(t, path, "read -P "+createPatternOf(backingFormat)+" 0 1M")
	qemuIOOnCreated(t, path, "write -P 0xab 0 64k")
	qemuJudgesCreated(t, path, virtualSize, clusterSize, backing, backingFormat)
	qemuIOOnCreated(t, path, "read -P 0xab 0 64k")
	qemuIOOnCreated(t, path, "read -P "+createPatternOf(backingFormat)+" 64k 64k")
}

func TestCreateCLIOnFiles(t *testing.T) {
	dir := t.TempDir()
	rawBase, qcowBase := createBackingsForCLI(t, dir)
	for _, format := range []string{"raw", "qcow2"} {
		for _, cs := range []string{"512", "4K", "64K", "2M"} {
			t.Run(format+"/cluster"+cs, func(t *testing.T) {
				base := rawBase
				if format == "qcow2" {
					base = qcowBase
				}
				target := filepath.Join(t.TempDir(), "overlay.qcow2")
				facts := runCreateJSON(t, "--backing", base, "--backing-format", format, "--cluster-size", cs, target)
				csBytes, _ := bytesize.Parse(cs)
				if facts.TargetType != "file" || facts.VirtualSize != 64<<20 || facts.ClusterSize != csBytes ||
					facts.BackingFile != base || facts.BackingFormat != format {
					t.Errorf("facts %+v: want a file, 64 MiB (the backing's size), cluster %d, backing %s (%s)", facts, csBytes, base, format)
				}
				if st, err := os.Stat(target); err != nil || st.Size() != facts.MetadataBytes {
					t.Errorf("new file: %v, size %d; want the metadata size %d", err, st.Size(), facts.MetadataBytes)
				}
				qemuJudgesCreated(t, target, 64<<20, csBytes, base, format)
				exerciseCreated(t, target, format, 64<<20, csBytes, base)
			})
		}
	}

	t.Run("relative backing is recorded absolute", func(t *testing.T) {
		target := filepath.Join(t.TempDir(), "rel.qcow2")
		cmd := exec.Command(binaryUnderTest(t), "create", "--backing", "base.raw", "--backing-format", "raw", "--size", "1G", target)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("volagent create: %v\n%s", err, out)
		}
		qemuJudgesCreated(t, target, 1<<30, 64<<10, rawBase, "raw")
	})

	t.Run("no backing, large sparse", func(t *testing.T) {
		target := filepath.Join(t.TempDir(), "big.qcow2")
		facts := runCreateJSON(t, "--no-backing", "--size", "16T", target)
		if facts.BackingFile != "" || facts.VirtualSize != 16<<40 {
			t.Errorf("facts %+v", facts)
		}
		qemuJudgesCreated(t, target, 16<<40, 64<<10, "", "")
		qemuIOOnCreated(t, target, "write -P 0xcd 15T 64k")
		qemuJudgesCreated(t, target, 16<<40, 64<<10, "", "")
		qemuIOOnCreated(t, target, "read -P 0xcd 15T 64k")
	})

	t.Run("existing file needs --force", func(t *testing.T) {
		target := filepath.Join(t.TempDir(), "precious")
		if err := os.WriteFile(target, []byte("keep me"), 0o600); err != nil {
			t.Fatal(err)
		}
		_, stderr, code := runVolagent(t, "create", "--backing", rawBase, "--backing-format", "raw", target)
		if code != exitFailure || !strings.Contains(stderr, "--force") {
			t.Errorf("exit %d, stderr %q; want exit %d naming --force", code, stderr, exitFailure)
		}
		if b, _ := os.ReadFile(target); string(b) != "keep me" {
			t.Fatalf("existing file changed to %q", b)
		}
		runCreateJSON(t, "--force", "--backing", rawBase, "--backing-format", "raw", target)
		qemuJudgesCreated(t, target, 64<<20, 64<<10, rawBase, "raw")
	})
}

func TestCreateCLIErrors(t *testing.T) {
	dir := t.TempDir()
	rawBase, _ := createBackingsForCLI(t, dir)
	notQcow2 := filepath.Join(dir, "junk.qcow2")
	if err := os.WriteFile(notQcow2, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	vmdkBacked := filepath.Join(dir, "vmdk-backed.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", rawBase, "-F", "vmdk", vmdkBacked, "1M")
	cases := []struct {
		name    string
		args    []string
		code    int
		mention string
	}{
		{"missing backing format", []string{"--backing", rawBase}, exitFailure, "--backing-format"},
		{"bad backing format", []string{"--backing", rawBase, "--backing-format", "vmdk"}, exitFailure, `"vmdk"`},
		{"no backing choice", []string{"--size", "1G"}, exitFailure, "--no-backing"},
		{"no-backing with backing", []string{"--no-backing", "--backing", rawBase, "--size", "1G"}, exitFailure, "excludes"},
		{"no-backing without size", []string{"--no-backing"}, exitFailure, "--size"},
		{"size not multiple of 512", []string{"--backing", rawBase, "--backing-format", "raw", "--size", "1000"}, exitFailure, "multiple of 512"},
		{"bad size suffix", []string{"--no-backing", "--size", "1X"}, exitFailure, `"X"`},
		{"bad cluster size", []string{"--no-backing", "--size", "1G", "--cluster-size", "3K"}, exitFailure, "3072"},
		{"missing backing", []string{"--backing", filepath.Join(dir, "nope"), "--backing-format", "raw"}, exitFailure, "no such file"},
		{"qcow2 backing that is not qcow2", []string{"--backing", notQcow2, "--backing-format", "qcow2"}, exitRefused, "not a qcow2 image"},
		{"qcow2 backing with a vmdk backing", []string{"--backing", vmdkBacked, "--backing-format", "qcow2"}, exitRefused, "vmdk"},
		{"control character in backing path", []string{"--backing", filepath.Join(dir, "a\nb"), "--backing-format", "raw"}, exitRefused, "control character"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			target := filepath.Join(t.TempDir(), "overlay.qcow2")
			args := append(append([]string{"create"}, tc.args...), target)
			_, stderr, code := runVolagent(t, args...)
			if code != tc.code || !strings.Contains(stderr, tc.mention) {
				t.Errorf("volagent %q: exit %d, stderr %q; want exit %d mentioning %q", args, code, stderr, tc.code, tc.mention)
			}
			if _, err := os.Lstat(target); err == nil {
				t.Errorf("a failed create left %s behind", target)
			}
		})
	}
}

// TestCreateCLIOnLoopDevice runs the binary against loop devices with 512
// and 4096-byte sectors that hold stale 0xff bytes.
func TestCreateCLIOnLoopDevice(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	rawBase, qcowBase := createBackingsForCLI(t, dir)
	for _, sector := range []int{512, 4096} {
		for _, tc := range []struct {
			format, clusterSize string
			size                int64
		}{
			{"raw", "64K", 0},         // virtual size from the backing
			{"qcow2", "512", 1 << 30}, // L1 of 512 clusters, 3 refcount blocks
			{"raw", "4K", 64 << 30},   // L1 of 64 clusters
			{"qcow2", "64K", 16 << 40},
			{"raw", "2M", 4 << 40},
		} {
			t.Run(fmt.Sprintf("sector%d/%s/cluster%s/size%d", sector, tc.format, tc.clusterSize, tc.size), func(t *testing.T) {
				dev := looptest.Device(t, 64<<20, sector)
				fillCreateTargetForCLI(t, dev, 0xff)
				base := rawBase
				if tc.format == "qcow2" {
					base = qcowBase
				}
				args := []string{"--backing", base, "--backing-format", tc.format, "--cluster-size", tc.clusterSize}
				size := tc.size
				if size == 0 {
					size = 64 << 20
				} else {
					args = append(args, "--size", fmt.Sprint(size))
				}
				facts := runCreateJSON(t, append(args, dev)...)
				csBytes, _ := bytesize.Parse(tc.clusterSize)
				if facts.TargetType != "block-device" || facts.LogicalBlockSize != sector || !facts.DirectIO ||
					facts.MetadataBytes%int64(sector) != 0 || facts.VirtualSize != size {
					t.Errorf("facts %+v: want a block device with %d-byte sectors, direct I/O, aligned metadata, virtual size %d",
						facts, sector, size)
				}
				qemuJudgesCreated(t, dev, size, csBytes, base, tc.format)
				exerciseCreated(t, dev, tc.format, size, csBytes, base)
			})
		}
	}

	t.Run("device too small", func(t *testing.T) {
		dev := looptest.Device(t, 4<<20, 4096)
		_, stderr, code := runVolagent(t, "create", "--backing", rawBase, "--backing-format", "raw", "--cluster-size", "2M", dev)
		if code != exitFailure || !strings.Contains(stderr, "too small") || !strings.Contains(stderr, "4194304") {
			t.Errorf("exit %d, stderr %q; want exit %d, too small, naming the size", code, stderr, exitFailure)
		}
	})

	t.Run("read-only device", func(t *testing.T) {
		dev := looptest.Device(t, 4<<20, 512)
		testutil.Run(t, "blockdev", "--setro", dev)
		t.Cleanup(func() { exec.Command("blockdev", "--setrw", dev).Run() })
		_, stderr, code := runVolagent(t, "create", "--backing", rawBase, "--backing-format", "raw", dev)
		if code != exitFailure || !strings.Contains(stderr, "read-only") {
			t.Errorf("exit %d, stderr %q; want exit %d saying read-only", code, stderr, exitFailure)
		}
	})

	t.Run("target is the backing device", func(t *testing.T) {
		dev := looptest.Device(t, 4<<20, 512)
		testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", dev, "1M")
		_, stderr, code := runVolagent(t, "create", "--backing", dev, "--backing-format", "qcow2", dev)
		if code != exitFailure || !strings.Contains(stderr, "backing itself") {
			t.Errorf("exit %d, stderr %q; want exit %d saying the target is the backing", code, stderr, exitFailure)
		}
	})

	t.Run("device in use", func(t *testing.T) {
		dev := looptest.Device(t, 4<<20, 512)
		fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		_, stderr, code := runVolagent(t, "create", "--backing", rawBase, "--backing-format", "raw", dev)
		if code != exitFailure || !strings.Contains(stderr, "in use") {
			t.Errorf("exit %d, stderr %q; want exit %d saying in use", code, stderr, exitFailure)
		}
	})
}

// fillCreateTargetForCLI overwrites the whole device with b, standing in for
// a previous tenant's data.
func fillCreateTargetForCLI(t *testing.T, dev string, b byte) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := f.Seek(0, 2)
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte{b}, 1<<20)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		if _, err := f.WriteAt(chunk[:min(int64(len(chunk)), size-off)], off); err != nil {
			t.Fatalf("filling %s: %v", dev, err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func TestCreateParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512": 512, "64K": 64 << 10, "64k": 64 << 10, "64KiB": 64 << 10, "2M": 2 << 20, "20G": 20 << 30, "4T": 4 << 40, "1P": 1 << 50, "7B": 7} {
		if got, err := parseSizeFlag("--size", in); err != nil || got != want {
			t.Errorf("parseSizeFlag(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "K", "-1", "1.5G", "1X", "1KK", "8E", "99999999999T"} {
		if got, err := parseSizeFlag("--size", in); err == nil {
			t.Errorf("parseSizeFlag(%q) = %d, want an error", in, got)
		}
	}
}
