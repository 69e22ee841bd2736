package hostblk

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Sentinel errors recognised in lvm's stderr. Test with errors.Is; the
// concrete error is always an *LVMError carrying the full details.
var (
	ErrVGNotFound = errors.New("volume group not found")
	ErrLVNotFound = errors.New("logical volume not found")
	ErrLVExists   = errors.New("logical volume already exists")
	ErrNoSpace    = errors.New("not enough free space in volume group")
)

// LVMError is a failed lvm command. Args is the full argument list after the
// lvm binary, ExitCode the process exit code (-1 if it did not exit, e.g.
// killed on context cancellation), Stderr everything lvm wrote to stderr.
type LVMError struct {
	Args     []string
	ExitCode int
	Stderr   string
	// cause is the error from os/exec or the context, kept for Unwrap.
	cause error
}

func (e *LVMError) Error() string {
	msg := strings.Join(meaningfulStderr(e.Stderr), "; ")
	if msg == "" && e.cause != nil {
		msg = e.cause.Error()
	}
	return fmt.Sprintf("lvm %s: exit code %d: %s", strings.Join(e.Args, " "), e.ExitCode, msg)
}

// Unwrap exposes the exec or context error (context.Canceled, ...).
func (e *LVMError) Unwrap() error { return e.cause }

// stderrPatterns recognise the sentinels in lvm's messages. LVM has no
// machine-readable error codes (almost everything is exit code 5), so the
// messages are the contract; the exec layer forces LC_ALL=C so they are
// always in English. Each pattern matches within one line. Compiled on
// first use: the static volagent starts at every domain start.
var stderrPatterns = sync.OnceValue(func() map[error]*regexp.Regexp {
	m := map[error]*regexp.Regexp{
		ErrVGNotFound: regexp.MustCompile(`(?i)volume group "[^"\n]*" not found`),
		// "Failed to find logical volume "vg/lv"" (lvs, lvchange, lvremove),
		// "Existing logical volume "lv" not found in volume group" (lvrename).
		ErrLVNotFound: regexp.MustCompile(`(?i)failed to find logical volume "|logical volume "[^"\n]*" not found`),
		ErrLVExists:   regexp.MustCompile(`(?i)logical volume "[^"\n]*" already exists in volume group`),
		ErrNoSpace:    regexp.MustCompile(`(?i)insufficient (free space|free extents|suitable)`),
	}
	addSharedStderrPatterns(m)
	return m
})

// Is matches the sentinels ErrVGNotFound, ErrLVNotFound, ErrLVExists and
// ErrNoSpace against lvm's stderr.
func (e *LVMError) Is(target error) bool {
	re, ok := stderrPatterns()[target]
	return ok && re.MatchString(e.Stderr)
}

// meaningfulStderr drops the warning lvm prints on every command when
// device-mapper activation is disabled, so error messages show the cause.
func meaningfulStderr(stderr string) []string {
	var lines []string
	for _, line := range strings.Split(stderr, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.Contains(line, "Activation disabled. No device-mapper interaction") {
			continue
		}
		lines = append(lines, line)
	}
	return lines
}

// LVM is the single exec layer over the lvm command. Every LVM operation in
// volagent goes through one of its methods. Commands that touch one volume
// group run one at a time per volume group, in this process.
//
// The zero value runs "lvm" from PATH with device-mapper activation. An LVM
// must not be copied after first use.
type LVM struct {
	// Command is the lvm binary; empty means "lvm" looked up in PATH.
	Command string
	// NoDeviceMapper is for hosts without device-mapper in the kernel. Every
	// command then runs with --driverloaded n, and lvcreate does not try to
	// activate, zero or wipe the new LV. It must match the Activator in use
	// (NewActivator checks).
	NoDeviceMapper bool
	// Devices, if set, restricts LVM to exactly these devices (lvm's
	// --devices option), hiding every other disk on the host. Tests use it
	// to isolate their volume groups.
	Devices []string
	// ExtraArgs are passed to every command after the subcommand, e.g.
	// "--config", "devices{...}".
	ExtraArgs []string
	// CommandTimeout bounds each command when the context has no deadline;
	// zero means 5 minutes. A hung lvm must not hang the daemon forever.
	CommandTimeout time.Duration

	mu      sync.Mutex
	vgLocks map[string]*sync.Mutex
}

// lockVG serialises commands on one volume group. LVM has its own file
// locks, but they make concurrent callers fail or wait invisibly; one
// command at a time keeps errors meaningful and read-modify-write sequences
// (check size, then extend) consistent within the process.
func (l *LVM) lockVG(vg string) func() {
	if vg == "" {
		return func() {}
	}
	l.mu.Lock()
	if l.vgLocks == nil {
		l.vgLocks = make(map[string]*sync.Mutex)
	}
	m, ok := l.vgLocks[vg]
	if !ok {
		m = &sync.Mutex{}
		l.vgLocks[vg] = m
	}
	l.mu.Unlock()
	m.Lock()
	return m.Unlock
}

// args builds the argument list after the lvm binary.
func (l *LVM) args(subcommand string, args []string) []string {
	all := []string{subcommand}
	if l.NoDeviceMapper {
		all = append(all, "--driverloaded", "n")
	}
	if len(l.Devices) > 0 {
		all = append(all, "--devices", strings.Join(l.Devices, ","))
	}
	all = append(all, l.ExtraArgs...)
	return append(all, args...)
}

// lvmEnv is the environment of every lvm command: the C locale so error
// messages can be matched, and no warnings about descriptors inherited from
// the Go runtime or systemd.
func lvmEnv() []string {
	env := []string{"LC_ALL=C", "LANG=C", "LVM_SUPPRESS_FD_WARNINGS=1"}
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if name == "LANG" || name == "LANGUAGE" || strings.HasPrefix(name, "LC_") || name == "LVM_SUPPRESS_FD_WARNINGS" {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// command prepares one lvm invocation.
func (l *LVM) command(ctx context.Context, argv []string) *exec.Cmd {
	bin := l.Command
	if bin == "" {
		bin = "lvm"
	}
	cmd := exec.CommandContext(ctx, bin, argv...)
	cmd.Env = lvmEnv()
	// SIGTERM first: lvm blocks signals while it writes metadata and exits
	// cleanly after; SIGKILL only if it does not exit in time.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	return cmd
}

func (l *LVM) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	d := l.CommandTimeout
	if d == 0 {
		d = 5 * time.Minute
	}
	return context.WithTimeout(ctx, d)
}

// Run runs "lvm subcommand args..." with this LVM's options and returns its
// stdout. It does not take a volume group lock; use it for commands this
// package has no method for (pvcreate, vgcreate, vgremove, ...).
func (l *LVM) Run(ctx context.Context, subcommand string, args ...string) ([]byte, error) {
	var out bytes.Buffer
	err := l.run(ctx, subcommand, args, func(r io.Reader) error {
		_, err := io.Copy(&out, r)
		return err
	})
	return out.Bytes(), err
}

// runVG is Run under the lock of volume group vg.
func (l *LVM) runVG(ctx context.Context, vg, subcommand string, args ...string) error {
	defer l.lockVG(vg)()
	_, err := l.Run(ctx, subcommand, args...)
	return err
}

// run executes one command and hands its stdout, as a stream, to consume.
// If the command fails, its *LVMError wins over any error from consume
// (lvm may print a partial report before failing).
func (l *LVM) run(ctx context.Context, subcommand string, args []string, consume func(io.Reader) error) error {
	ctx, cancel := l.withTimeout(ctx)
	defer cancel()
	argv := l.args(subcommand, args)
	cmd := l.command(ctx, argv)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return &LVMError{Args: argv, ExitCode: -1, cause: err}
	}
	if err := cmd.Start(); err != nil {
		return &LVMError{Args: argv, ExitCode: -1, cause: err}
	}
	consumeErr := consume(stdout)
	// Drain what consume left so lvm never blocks on a full pipe.
	_, _ = io.Copy(io.Discard, stdout)
	waitErr := cmd.Wait()
	if waitErr != nil {
		e := &LVMError{Args: argv, ExitCode: -1, Stderr: stderr.String(), cause: waitErr}
		var exitErr *exec.ExitError
		if errors.As(waitErr, &exitErr) {
			e.ExitCode = exitErr.ExitCode()
		}
		if ctx.Err() != nil {
			e.cause = fmt.Errorf("%w (%w)", ctx.Err(), waitErr)
		}
		return e
	}
	if consumeErr != nil {
		return fmt.Errorf("lvm %s: reading output: %w", strings.Join(argv, " "), consumeErr)
	}
	return nil
}

// report runs an lvm reporting command (vgs, lvs) and decodes the JSON
// report named kind ("vg", "lv", "seg") from its output stream.
func (l *LVM) report(ctx context.Context, subcommand string, args []string, kind string) ([]reportRow, error) {
	var rows []reportRow
	err := l.run(ctx, subcommand, args, func(r io.Reader) (err error) {
		rows, err = decodeReport(r, kind)
		return err
	})
	return rows, err
}

// VG is one volume group as reported by vgs. Sizes are in bytes.
type VG struct {
	Name        string
	UUID        string
	Size        uint64
	Free        uint64
	ExtentSize  uint64
	ExtentCount uint64
	FreeExtents uint64
	Tags        []string
}

// LV is one logical volume as reported by lvs. Size is in bytes.
type LV struct {
	Name string
	VG   string
	UUID string
	// Path is /dev/VG/LV; it exists only under device-mapper activation.
	Path string
	Size uint64
	// Attr is lvm's lv_attr string, e.g. "-wi-a-----".
	Attr string
	// AllocationPolicy is e.g. "inherit" or "contiguous".
	AllocationPolicy string
	Tags             []string
}

// PV is one physical volume as reported by pvs. Sizes are in bytes;
// PEStart is the byte offset of the first physical extent on the device.
type PV struct {
	Name    string
	VG      string
	Size    uint64
	PEStart uint64
}

// Segment is one segment of an LV: LV extents [LVStartExtent,
// LVStartExtent+Extents) map to Ranges on physical volumes.
type Segment struct {
	// LV is the name of the logical volume the segment belongs to.
	LV            string
	LVStartExtent uint64
	Extents       uint64
	Type          string
	Stripes       uint64
	Ranges        []PERange
}

// PERange is the physical extents [Start, End] (inclusive, as lvm prints
// them) on device PV.
type PERange struct {
	PV    string
	Start uint64
	End   uint64
}

var reportArgs = []string{"--reportformat", "json", "--units", "b", "--nosuffix"}

// VolumeGroups lists every volume group LVM can see.
func (l *LVM) VolumeGroups(ctx context.Context) ([]VG, error) {
	return l.listVGs(ctx, "")
}

// VolumeGroup returns one volume group; ErrVGNotFound if it does not exist.
func (l *LVM) VolumeGroup(ctx context.Context, name string) (VG, error) {
	if err := validateVGName(name); err != nil {
		return VG{}, err
	}
	vgs, err := l.listVGs(ctx, name)
	if err != nil {
		return VG{}, err
	}
	if len(vgs) != 1 {
		return VG{}, fmt.Errorf("vgs %s: expected 1 volume group, got %d", name, len(vgs))
	}
	return vgs[0], nil
}

func (l *LVM) listVGs(ctx context.Context, vg string) ([]VG, error) {
	args := append(append([]string{}, reportArgs...),
		"-o", "vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count,vg_tags")
	if vg != "" {
		args = append(args, "--", vg)
		defer l.lockVG(vg)()
	}
	rows, err := l.report(ctx, "vgs", args, "vg")
	if err != nil {
		return nil, err
	}
	return parseVGs(rows)
}

// PhysicalVolumes lists the physical volumes of volume group vg.
func (l *LVM) PhysicalVolumes(ctx context.Context, vg string) ([]PV, error) {
	if err := validateVGName(vg); err != nil {
		return nil, err
	}
	defer l.lockVG(vg)()
	// vgs, not pvs: pvs has no volume group argument, and a selection
	// (-S vg_name=...) matches nothing instead of failing for a missing VG.
	args := append(append([]string{}, reportArgs...),
		"-o", "pv_name,vg_name,pv_size,pe_start", "--", vg)
	rows, err := l.report(ctx, "vgs", args, "vg")
	if err != nil {
		return nil, err
	}
	return parsePVs(rows)
}

// LogicalVolumes lists the logical volumes of volume group vg.
func (l *LVM) LogicalVolumes(ctx context.Context, vg string) ([]LV, error) {
	if err := validateVGName(vg); err != nil {
		return nil, err
	}
	defer l.lockVG(vg)()
	return l.listLVs(ctx, vg)
}

// LogicalVolume returns one logical volume; ErrVGNotFound or ErrLVNotFound
// if it does not exist.
func (l *LVM) LogicalVolume(ctx context.Context, vg, name string) (LV, error) {
	if err := validateNames(vg, name); err != nil {
		return LV{}, err
	}
	defer l.lockVG(vg)()
	return l.getLV(ctx, vg, name)
}

var lvFields = "lv_name,vg_name,lv_uuid,lv_path,lv_size,lv_attr,lv_allocation_policy,lv_tags"

func (l *LVM) listLVs(ctx context.Context, target string) ([]LV, error) {
	args := append(append([]string{}, reportArgs...), "-o", lvFields, "--", target)
	rows, err := l.report(ctx, "lvs", args, "lv")
	if err != nil {
		return nil, err
	}
	return parseLVs(rows)
}

func (l *LVM) getLV(ctx context.Context, vg, name string) (LV, error) {
	lvs, err := l.listLVs(ctx, vg+"/"+name)
	if err != nil {
		return LV{}, err
	}
	if len(lvs) != 1 {
		return LV{}, fmt.Errorf("lvs %s/%s: expected 1 logical volume, got %d", vg, name, len(lvs))
	}
	return lvs[0], nil
}

// Segments returns the segments of LV vg/name in LV order.
func (l *LVM) Segments(ctx context.Context, vg, name string) ([]Segment, error) {
	if err := validateNames(vg, name); err != nil {
		return nil, err
	}
	defer l.lockVG(vg)()
	args := append(append([]string{"--segments"}, reportArgs...),
		"-o", segFields, "--", vg+"/"+name)
	rows, err := l.report(ctx, "lvs", args, "seg")
	if err != nil {
		return nil, err
	}
	return parseSegments(rows)
}

var segFields = "lv_name,seg_start_pe,seg_size_pe,segtype,stripes,seg_pe_ranges"

// SegmentsOfVG returns the segments of every logical volume of vg, by LV
// name: one lvs command for all of them.
func (l *LVM) SegmentsOfVG(ctx context.Context, vg string) (map[string][]Segment, error) {
	if err := validateVGName(vg); err != nil {
		return nil, err
	}
	defer l.lockVG(vg)()
	args := append(append([]string{"--segments"}, reportArgs...),
		"-o", segFields, "--", vg)
	rows, err := l.report(ctx, "lvs", args, "seg")
	if err != nil {
		return nil, err
	}
	segs, err := parseSegments(rows)
	if err != nil {
		return nil, err
	}
	byLV := map[string][]Segment{}
	for _, seg := range segs {
		byLV[seg.LV] = append(byLV[seg.LV], seg)
	}
	return byLV, nil
}

// CreateOptions are the optional parts of CreateLV.
type CreateOptions struct {
	// Tags are added at creation, in the same metadata commit.
	Tags []string
	// Contiguous allocates the LV, and every later extension, as one run of
	// extents (--alloc contiguous). Loop activation needs it: it can only
	// map an LV that is one contiguous range of one physical volume.
	Contiguous bool
}

// CreateLV creates LV vg/name of at least size bytes (LVM rounds up to
// whole extents) and returns it as lvs reports it. Errors: ErrVGNotFound,
// ErrLVExists, ErrNoSpace. Under NoDeviceMapper the LV is created inactive
// and not zeroed; otherwise LVM's defaults apply (activated, first 4 KiB
// zeroed, signatures wiped).
func (l *LVM) CreateLV(ctx context.Context, vg, name string, size uint64, opts CreateOptions) (LV, error) {
	if err := validateNames(vg, name); err != nil {
		return LV{}, err
	}
	if size == 0 {
		return LV{}, fmt.Errorf("create LV %s/%s: size is 0", vg, name)
	}
	args := []string{"--yes", "--name", name, "--size", sizeArg(size)}
	if l.NoDeviceMapper {
		args = append(args, "--activate", "n", "--zero", "n", "--wipesignatures", "n")
	}
	if opts.Contiguous {
		args = append(args, "--alloc", "contiguous")
	}
	for _, tag := range opts.Tags {
		if err := validateTag(tag); err != nil {
			return LV{}, err
		}
		args = append(args, "--addtag", tag)
	}
	args = append(args, "--", vg)
	defer l.lockVG(vg)()
	if _, err := l.Run(ctx, "lvcreate", args...); err != nil {
		return LV{}, err
	}
	return l.getLV(ctx, vg, name)
}

// ExtendLV grows LV vg/name to at least size bytes and returns it. An LV
// that is already that large is left alone, so a retried extend after a
// crash succeeds. Errors: ErrVGNotFound, ErrLVNotFound, ErrNoSpace.
// Under loop activation call Activator.Refresh afterwards.
func (l *LVM) ExtendLV(ctx context.Context, vg, name string, size uint64) (LV, error) {
	if err := validateNames(vg, name); err != nil {
		return LV{}, err
	}
	defer l.lockVG(vg)()
	// lvextend first, the size asked only after: two commands on the
	// growth path of a running guest instead of three. lvextend refuses a
	// size the LV has already; the LV is then returned as it is.
	if _, err := l.Run(ctx, "lvextend", "--size", sizeArg(size), "--", vg+"/"+name); err != nil {
		lv, lerr := l.getLV(ctx, vg, name)
		if lerr == nil && lv.Size >= size {
			return lv, nil
		}
		if lerr != nil && !errors.Is(err, ErrLVNotFound) && !errors.Is(err, ErrVGNotFound) {
			return LV{}, errors.Join(err, lerr)
		}
		return LV{}, err
	}
	return l.getLV(ctx, vg, name)
}

// RenameLV renames LV vg/from to vg/to. Errors: ErrVGNotFound,
// ErrLVNotFound (as reported by lvrename), ErrLVExists.
func (l *LVM) RenameLV(ctx context.Context, vg, from, to string) error {
	if err := validateNames(vg, from); err != nil {
		return err
	}
	if err := validateLVName(to); err != nil {
		return err
	}
	return l.runVG(ctx, vg, "lvrename", "--", vg, from, to)
}

// RemoveLV removes LV vg/name. Errors: ErrVGNotFound, ErrLVNotFound. Under
// device-mapper activation an active LV that is open fails (lvm refuses);
// under loop activation deactivate it first.
func (l *LVM) RemoveLV(ctx context.Context, vg, name string) error {
	if err := validateNames(vg, name); err != nil {
		return err
	}
	return l.runVG(ctx, vg, "lvremove", "--yes", "--", vg+"/"+name)
}

// AddLVTags adds tags to LV vg/name in one metadata commit. Adding a tag
// the LV already has is not an error.
func (l *LVM) AddLVTags(ctx context.Context, vg, name string, tags ...string) error {
	return l.changeTags(ctx, vg, name, "--addtag", tags)
}

// DeleteLVTags removes tags from LV vg/name in one metadata commit.
// Removing a tag the LV does not have is not an error.
func (l *LVM) DeleteLVTags(ctx context.Context, vg, name string, tags ...string) error {
	return l.changeTags(ctx, vg, name, "--deltag", tags)
}

func (l *LVM) changeTags(ctx context.Context, vg, name, flag string, tags []string) error {
	if err := validateNames(vg, name); err != nil {
		return err
	}
	if len(tags) == 0 {
		return nil
	}
	var args []string
	for _, tag := range tags {
		if err := validateTag(tag); err != nil {
			return err
		}
		args = append(args, flag, tag)
	}
	args = append(args, "--", vg+"/"+name)
	return l.runVG(ctx, vg, "lvchange", args...)
}

// sizeArg is a size in bytes as lvm's --size wants it.
func sizeArg(size uint64) string { return strconv.FormatUint(size, 10) + "b" }

// validateLVName applies LVM's name rules, so a bad name fails with a clear
// error here instead of an lvm usage error, and can never become an option.
// These are LVM's own limits for any LV or VG, including ones volagent did
// not name; the stricter rule for the names volagent gives its volumes and
// pools is backend.ValidateVolumeName.
func validateLVName(name string) error { return validateName("logical volume", name) }

func validateVGName(name string) error { return validateName("volume group", name) }

// ValidateVGName checks a volume group name against LVM's rules (for the
// configuration, before any lvm command runs).
func ValidateVGName(name string) error { return validateVGName(name) }

func validateNames(vg, lv string) error {
	if err := validateVGName(vg); err != nil {
		return err
	}
	return validateLVName(lv)
}

func validateName(what, name string) error {
	if name == "" {
		return fmt.Errorf("%s name is empty", what)
	}
	if len(name) > 127 {
		return fmt.Errorf("%s name %q: longer than 127 characters", what, name)
	}
	if name[0] == '-' || name == "." || name == ".." {
		return fmt.Errorf("%s name %q: not allowed by LVM", what, name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		ok := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '+' || c == '_' || c == '.' || c == '-'
		if !ok {
			return fmt.Errorf("%s name %q: character %q not allowed (LVM allows [a-zA-Z0-9+_.-])", what, name, c)
		}
	}
	return nil
}

// validateTag applies LVM's tag rules; use KeyValueTag or EncodeTagValue to
// make a valid tag from arbitrary data.
func validateTag(tag string) error {
	if tag == "" {
		return fmt.Errorf("LV tag is empty")
	}
	if len(tag) > maxTagLen {
		return fmt.Errorf("LV tag %.40q...: %d bytes, LVM allows at most %d", tag, len(tag), maxTagLen)
	}
	for i := 0; i < len(tag); i++ {
		c := tag[i]
		if !isTagLiteral(c) && c != '+' && c != '=' {
			return fmt.Errorf("LV tag %q: character %q not allowed (LVM allows [A-Za-z0-9_+.-/=!:&#])", tag, c)
		}
	}
	return nil
}
