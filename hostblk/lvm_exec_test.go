package hostblk

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeLVM writes a shell script that stands in for the lvm binary: it
// records its arguments and environment under dir, then runs body.
func fakeLVM(t *testing.T, body string) (bin, dir string) {
	t.Helper()
	dir = t.TempDir()
	bin = filepath.Join(dir, "lvm")
	script := "#!/bin/sh\n" +
		"dir=" + dir + "\n" +
		"printf '%s\\n' \"$@\" > \"$dir/args\"\n" +
		"{ printf '%s\\037' \"$@\"; echo; } >> \"$dir/calls\"\n" +
		"env > \"$dir/env\"\n" +
		body + "\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin, dir
}

func fakeArgs(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "args"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// fakeCalls returns the argument lists of every call of the fake lvm.
func fakeCalls(t *testing.T, dir string) [][]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "calls"))
	if err != nil {
		t.Fatal(err)
	}
	var calls [][]string
	for _, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		calls = append(calls, strings.Split(strings.TrimSuffix(line, "\x1f"), "\x1f"))
	}
	return calls
}

func TestLVMCommandLineAndEnvironment(t *testing.T) {
	bin, dir := fakeLVM(t, `echo '{"report":[{"lv":[]}]}'`)
	t.Setenv("LC_ALL", "de_DE.UTF-8")
	t.Setenv("LC_MESSAGES", "de_DE.UTF-8")
	l := &LVM{
		Command:        bin,
		NoDeviceMapper: true,
		Devices:        []string{"/dev/loop1", "/dev/loop2"},
		ExtraArgs:      []string{"--config", "devices{scan_lvs=0}"},
	}
	if _, err := l.LogicalVolumes(context.Background(), "vg0"); err != nil {
		t.Fatal(err)
	}
	want := []string{"lvs", "--driverloaded", "n", "--devices", "/dev/loop1,/dev/loop2",
		"--config", "devices{scan_lvs=0}", "--reportformat", "json", "--units", "b", "--nosuffix",
		"-o", lvFields, "--", "vg0"}
	if got := fakeArgs(t, dir); !slices.Equal(got, want) {
		t.Errorf("args\n got %q\nwant %q", got, want)
	}
	env, err := os.ReadFile(filepath.Join(dir, "env"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(env), "\n")
	for _, kv := range []string{"LC_ALL=C", "LVM_SUPPRESS_FD_WARNINGS=1"} {
		if !slices.Contains(lines, kv) {
			t.Errorf("environment lacks %s", kv)
		}
	}
	for _, line := range lines {
		if strings.HasPrefix(line, "LC_MESSAGES=") || line == "LC_ALL=de_DE.UTF-8" {
			t.Errorf("environment keeps the caller's locale: %s", line)
		}
	}
}

func TestLVMCreateLVArguments(t *testing.T) {
	for _, tc := range []struct {
		name string
		lvm  *LVM
		opts CreateOptions
		want []string
	}{
		{"device-mapper", &LVM{}, CreateOptions{},
			[]string{"lvcreate", "--yes", "--name", "v", "--size", "8388608b", "--", "vg0"}},
		{"no-device-mapper", &LVM{NoDeviceMapper: true}, CreateOptions{Contiguous: true, Tags: []string{"volagent", "volagent.role=a+20b"}},
			[]string{"lvcreate", "--driverloaded", "n", "--yes", "--name", "v", "--size", "8388608b",
				"--activate", "n", "--zero", "n", "--wipesignatures", "n", "--alloc", "contiguous",
				"--addtag", "volagent", "--addtag", "volagent.role=a+20b", "--", "vg0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bin, dir := fakeLVM(t, `case "$1" in lvs) echo '{"report":[{"lv":[{"lv_name":"v","vg_name":"vg0","lv_uuid":"u","lv_path":"/dev/vg0/v","lv_size":"8388608","lv_attr":"-wi-------","lv_allocation_policy":"contiguous","lv_tags":"volagent"}]}]}';; esac`)
			tc.lvm.Command = bin
			lv, err := tc.lvm.CreateLV(context.Background(), "vg0", "v", 8<<20, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			want := LV{Name: "v", VG: "vg0", UUID: "u", Path: "/dev/vg0/v", Size: 8 << 20, Attr: "-wi-------",
				AllocationPolicy: "contiguous", Tags: []string{"volagent"}}
			if !reflect.DeepEqual(lv, want) {
				t.Errorf("CreateLV returned %+v, want %+v", lv, want)
			}
			calls := fakeCalls(t, dir)
			if len(calls) != 2 || !slices.Equal(calls[0], tc.want) || calls[1][0] != "lvs" {
				t.Errorf("calls\n got %q\nwant %q then lvs", calls, tc.want)
			}
		})
	}
}

func TestLVMErrorKeepsExitCodeAndStderr(t *testing.T) {
	bin, _ := fakeLVM(t, `echo '  WARNING: Activation disabled. No device-mapper interaction will be attempted.' >&2
echo '  Volume group "nosuchvg" not found' >&2
echo '  Cannot process volume group nosuchvg' >&2
exit 5`)
	l := &LVM{Command: bin}
	_, err := l.CreateLV(context.Background(), "nosuchvg", "v", 1<<20, CreateOptions{})
	var lvmErr *LVMError
	if !errors.As(err, &lvmErr) {
		t.Fatalf("error %v (%T) is not an *LVMError", err, err)
	}
	if lvmErr.ExitCode != 5 || !strings.Contains(lvmErr.Stderr, `Volume group "nosuchvg" not found`) {
		t.Errorf("LVMError = %+v", lvmErr)
	}
	if lvmErr.Args[0] != "lvcreate" {
		t.Errorf("Args = %q, want lvcreate first", lvmErr.Args)
	}
	if !errors.Is(err, ErrVGNotFound) {
		t.Error("not ErrVGNotFound")
	}
	for _, other := range []error{ErrLVNotFound, ErrLVExists, ErrNoSpace} {
		if errors.Is(err, other) {
			t.Errorf("also matches %v", other)
		}
	}
	msg := err.Error()
	if strings.Contains(msg, "Activation disabled") || !strings.Contains(msg, "exit code 5") || !strings.Contains(msg, "nosuchvg") {
		t.Errorf("Error() = %q: want exit code and cause, without the activation warning", msg)
	}
}

func TestLVMErrorSentinels(t *testing.T) {
	for _, tc := range []struct {
		stderr string
		want   error
	}{
		{`  Volume group "vg9" not found`, ErrVGNotFound},
		{`  Failed to find logical volume "vg0/nolv"`, ErrLVNotFound},
		{`  Existing logical volume "nolv" not found in volume group "vg0"`, ErrLVNotFound},
		{`  Some other failure`, nil},
		{"  Volume group \"vg0\" has insufficient metadata space\n  Failed to write \" not found", nil},
		{`  Logical Volume "lv1" already exists in volume group "vg0"`, ErrLVExists},
		{`  Volume group "vg0" has insufficient free space (11 extents): 200 required.`, ErrNoSpace},
		{`  Insufficient free space: 252 extents needed, but only 9 available`, ErrNoSpace},
		{`  Insufficient suitable contiguous allocatable extents for logical volume a: 2 more required`, ErrNoSpace},
	} {
		err := error(&LVMError{Args: []string{"x"}, ExitCode: 5, Stderr: tc.stderr})
		for _, sentinel := range []error{ErrVGNotFound, ErrLVNotFound, ErrLVExists, ErrNoSpace} {
			if got := errors.Is(err, sentinel); got != (sentinel == tc.want) {
				t.Errorf("stderr %q: errors.Is(%v) = %v", tc.stderr, sentinel, got)
			}
		}
	}
}

func TestLVMContextCancellation(t *testing.T) {
	bin, _ := fakeLVM(t, `exec sleep 30`)
	l := &LVM{Command: bin}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := l.VolumeGroups(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v, want context.DeadlineExceeded", err)
	}
	if time.Since(start) > 10*time.Second {
		t.Errorf("cancellation took %v", time.Since(start))
	}
}

func TestLVMReportDecodeErrorIsReported(t *testing.T) {
	bin, _ := fakeLVM(t, `echo '{"report":[{"vg":[{"vg_name":"vg0","vg_size":"8.00m"}]}]}'`)
	l := &LVM{Command: bin}
	_, err := l.VolumeGroups(context.Background())
	if err == nil || !strings.Contains(err.Error(), "vg_") {
		t.Fatalf("error %v, want one naming the bad field", err)
	}
}

// TestLVMSerialisesCommandsPerVG runs commands on one VG concurrently; the
// fake lvm detects overlapping runs with an atomic mkdir.
func TestLVMSerialisesCommandsPerVG(t *testing.T) {
	bin, dir := fakeLVM(t, `
if ! mkdir "$dir/running" 2>/dev/null; then echo overlap >> "$dir/overlaps"; fi
sleep 0.05
rmdir "$dir/running" 2>/dev/null
exit 0`)
	l := &LVM{Command: bin}
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = l.AddLVTags(context.Background(), "vg0", "lv", "t")
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "overlaps")); err == nil {
		t.Fatalf("commands on one VG overlapped %d times", strings.Count(string(b), "overlap"))
	}
}

func TestLVMValidatesNamesAndTagsBeforeRunning(t *testing.T) {
	bin, dir := fakeLVM(t, `exit 0`)
	l := &LVM{Command: bin}
	ctx := context.Background()
	for _, err := range []error{
		func() error { _, err := l.CreateLV(ctx, "vg0", "-rf", 1, CreateOptions{}); return err }(),
		func() error { _, err := l.CreateLV(ctx, "vg/0", "lv", 1, CreateOptions{}); return err }(),
		func() error { _, err := l.CreateLV(ctx, "vg0", "lv", 0, CreateOptions{}); return err }(),
		func() error {
			_, err := l.CreateLV(ctx, "vg0", "lv", 1, CreateOptions{Tags: []string{"a tag"}})
			return err
		}(),
		l.AddLVTags(ctx, "vg0", "lv", "bad,tag"),
		l.RenameLV(ctx, "vg0", "lv", "new name"),
		l.RemoveLV(ctx, "", "lv"),
	} {
		if err == nil {
			t.Error("invalid input accepted")
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "args")); err == nil {
		t.Errorf("lvm ran for invalid input: %q", fakeArgs(t, dir))
	}
}

func TestDeviceMapperActivatorCommands(t *testing.T) {
	bin, dir := fakeLVM(t, `case "$1" in lvs) echo '{"report":[{"lv":[{"lv_name":"v","vg_name":"vg0","lv_uuid":"u","lv_path":"/dev/vg0/v","lv_size":"8388608","lv_attr":"-wi-a-----","lv_allocation_policy":"inherit","lv_tags":""}]}]}';; esac`)
	l := &LVM{Command: bin}
	a, err := NewActivator(ActivationDeviceMapper, l)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	path, err := a.Activate(ctx, "vg0", "v")
	if err != nil || path != "/dev/vg0/v" {
		t.Fatalf("Activate = %q, %v", path, err)
	}
	if got, want := fakeArgs(t, dir), []string{"lvchange", "--activate", "y", "--", "vg0/v"}; !slices.Equal(got, want) {
		t.Errorf("activate args %q, want %q", got, want)
	}
	if path, err := a.DevicePath(ctx, "vg0", "v"); err != nil || path != "/dev/vg0/v" {
		t.Errorf("DevicePath = %q, %v", path, err)
	}
	if err := a.Refresh(ctx, "vg0", "v"); err != nil {
		t.Fatal(err)
	}
	if got, want := fakeArgs(t, dir), []string{"lvchange", "--refresh", "--", "vg0/v"}; !slices.Equal(got, want) {
		t.Errorf("refresh args %q, want %q", got, want)
	}
	if err := a.Deactivate(ctx, "vg0", "v"); err != nil {
		t.Fatal(err)
	}
	if got, want := fakeArgs(t, dir), []string{"lvchange", "--activate", "n", "--", "vg0/v"}; !slices.Equal(got, want) {
		t.Errorf("deactivate args %q, want %q", got, want)
	}
}

func TestDeviceMapperActivatorInactiveLV(t *testing.T) {
	bin, _ := fakeLVM(t, `echo '{"report":[{"lv":[{"lv_name":"v","vg_name":"vg0","lv_uuid":"u","lv_path":"/dev/vg0/v","lv_size":"8388608","lv_attr":"-wi-------","lv_allocation_policy":"inherit","lv_tags":""}]}]}'`)
	a, err := NewActivator(ActivationDeviceMapper, &LVM{Command: bin})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.DevicePath(context.Background(), "vg0", "v"); !errors.Is(err, ErrNotActive) {
		t.Errorf("DevicePath(inactive) = %v, want ErrNotActive", err)
	}
}

func TestActivationModeIsExplicit(t *testing.T) {
	for _, s := range []string{"", "dm", "Loop", "auto"} {
		if _, err := ParseActivationMode(s); err == nil {
			t.Errorf("ParseActivationMode(%q) succeeded", s)
		}
	}
	for _, m := range []ActivationMode{ActivationDeviceMapper, ActivationLoop} {
		if got, err := ParseActivationMode(string(m)); err != nil || got != m {
			t.Errorf("ParseActivationMode(%q) = %q, %v", m, got, err)
		}
	}
	if _, err := NewActivator(ActivationLoop, &LVM{}); err == nil {
		t.Error("loop activation accepted an LVM that uses device-mapper")
	}
	if _, err := NewActivator(ActivationDeviceMapper, &LVM{NoDeviceMapper: true}); err == nil {
		t.Error("device-mapper activation accepted an LVM with NoDeviceMapper")
	}
	if _, err := NewActivator("", &LVM{}); err == nil {
		t.Error("empty activation mode accepted")
	}
	if a, err := NewActivator(ActivationLoop, &LVM{NoDeviceMapper: true}); err != nil || a.Mode() != ActivationLoop {
		t.Errorf("NewActivator(loop) = %v, %v", a, err)
	}
}

func TestDeviceMapperActivateAllOneCommand(t *testing.T) {
	bin, dir := fakeLVM(t, `exit 0`)
	a, err := NewActivator(ActivationDeviceMapper, &LVM{Command: bin})
	if err != nil {
		t.Fatal(err)
	}
	lvs := []LV{
		{Name: "up", Attr: "-wi-a-----"},
		{Name: "down1", Attr: "-wi-------"},
		{Name: "down2", Attr: "-wi-------"},
	}
	got := a.ActivateAll(context.Background(), "vg0", lvs)
	want := map[string]Activation{
		"up":    {Path: "/dev/vg0/up"},
		"down1": {Path: "/dev/vg0/down1"},
		"down2": {Path: "/dev/vg0/down2"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ActivateAll = %+v, want %+v", got, want)
	}
	// The active LV needs no command; the inactive ones share one.
	calls := fakeCalls(t, dir)
	if wantCall := []string{"lvchange", "--activate", "y", "--", "vg0/down1", "vg0/down2"}; len(calls) != 1 || !slices.Equal(calls[0], wantCall) {
		t.Errorf("lvm calls %q, want only %q", calls, wantCall)
	}
}

func TestDeviceMapperActivateAllAllActiveRunsNothing(t *testing.T) {
	bin, dir := fakeLVM(t, `exit 0`)
	a, err := NewActivator(ActivationDeviceMapper, &LVM{Command: bin})
	if err != nil {
		t.Fatal(err)
	}
	got := a.ActivateAll(context.Background(), "vg0", []LV{{Name: "up", Attr: "-wi-ao----"}})
	if got["up"] != (Activation{Path: "/dev/vg0/up"}) {
		t.Errorf("ActivateAll = %+v", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "calls")); err == nil {
		t.Errorf("lvm ran for an LV already active: %q", fakeCalls(t, dir))
	}
}

func TestDeviceMapperActivateAllFailureNamesEachLV(t *testing.T) {
	// lvchange fails as a whole when one LV cannot be activated; each is
	// then tried alone so the good one is activated and the bad one
	// carries lvm's own message.
	bin, _ := fakeLVM(t, `case "$*" in
*vg0/bad*) echo '  Failed to find logical volume "vg0/bad"' >&2; exit 5;;
esac
exit 0`)
	a, err := NewActivator(ActivationDeviceMapper, &LVM{Command: bin})
	if err != nil {
		t.Fatal(err)
	}
	got := a.ActivateAll(context.Background(), "vg0", []LV{{Name: "good", Attr: "-wi-------"}, {Name: "bad", Attr: "-wi-------"}})
	if got["good"] != (Activation{Path: "/dev/vg0/good"}) {
		t.Errorf("good: %+v, want activated", got["good"])
	}
	if r := got["bad"]; !errors.Is(r.Err, ErrLVNotFound) || r.Path != "" {
		t.Errorf("bad: %+v, want ErrLVNotFound and no device", r)
	}
}
