package main

// `volagent hook qemu`: libvirt's qemu hook. libvirt runs it as
// /etc/libvirt/hooks/qemu.d/volagent DOMAIN OPERATION SUB-OPERATION EXTRA
// with the domain XML on stdin, and refuses to start the domain when it
// exits non-zero, showing its stderr in the error. A hook must never call
// libvirt (it would deadlock the daemon), so this one asks volagent's
// daemon over D-Bus, or judges locally.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/spf13/cobra"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/hostblk"
)

// exitHookRefused is the status that makes libvirt refuse the start.
const exitHookRefused = 1

// hookDefaultConfigPath is where the daemon's configuration lives; the hook
// reads it only to know which disks are volagent's when the daemon
// cannot be asked.
const hookDefaultConfigPath = "/etc/volagent/volagent.toml"

// What the hook does when it cannot get the daemon's verdict.
const (
	unreachableRefuseManaged = "refuse-managed" // refuse domains that use volagent's volumes, allow the rest
	unreachableRefuseAll     = "refuse-all"
	unreachableAllow         = "allow"
	unreachableCheckLocally  = "check-locally" // run the policy in the hook itself
)

// hookOptions are the hook's flags. libvirt passes none: the installed
// hook script is where an administrator sets them.
type hookOptions struct {
	config       string
	busAddress   string
	mode         string
	unreachable  string
	offline      bool
	allowBacking []string
	timeout      time.Duration
	// allowHeaderInRaw makes a raw disk that starts with an image header a
	// warning (local checks only; the daemon has its own setting).
	allowHeaderInRaw bool
	// operation is libvirt's OPERATION argument, passed to the daemon's
	// CheckDomain (a "migrate" of a shared pool's volume is refused).
	operation string
}

var hookCmd = &cobra.Command{
	GroupID: groupIntegration,
	Use:     "hook",
	Short:   "Hooks other programs run (libvirt)",
}

func newHookQemuCmd() *cobra.Command {
	opts := hookOptions{}
	cmd := &cobra.Command{
		Use:   "qemu [flags] DOMAIN OPERATION SUB-OPERATION [EXTRA...]",
		Short: "libvirt's qemu hook: refuse to start domains that would make qemu guess an image format",
		Long: `Installed as /etc/libvirt/hooks/qemu.d/volagent (see packaging/libvirt),
libvirt runs it at every domain lifecycle step. On "prepare begin",
"restore begin" and "migrate begin" it reads the domain XML on stdin and
asks the volagent daemon (D-Bus Manager.CheckDomain) whether the domain
follows the no-probing policy; every other step exits 0 at once.

In enforce mode a refused domain makes the hook print one line per
violation on stderr (libvirt shows them in the error of virsh start) and
exit 1. In audit mode it prints them and exits 0.

When the daemon cannot be asked (no bus, nothing owns
org.volagent.VolAgent1, a time-out), --when-unreachable decides:
  refuse-managed  refuse domains with a disk of a volagent pool, allow the
                  rest (default). Pools come from --config; without it,
                  a disk is volagent's if it is a loop device whose file
                  carries volagent's metadata (loop pools). LVM pools are
                  recognised only through --config.
  refuse-all      refuse every domain
  allow           allow every domain
  check-locally   judge the domain in the hook, with the pools' backing
                  roots from --config and --allow-backing
--offline always judges locally and never uses D-Bus.

Flags must come before DOMAIN: everything from DOMAIN on is libvirt's.`,
		Args: cobra.MinimumNArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runHookQemu(cmd.Context(), opts, args, cmd.InOrStdin(), cmd.ErrOrStderr())
		},
	}
	// libvirt's arguments may look like flags ("-"); stop parsing at DOMAIN.
	cmd.Flags().SetInterspersed(false)
	f := cmd.Flags()
	f.StringVar(&opts.config, "config", hookDefaultConfigPath, "the daemon's configuration, read for the pools (a missing file is not an error)")
	f.StringVar(&opts.busAddress, "bus-address", "", "D-Bus address of the daemon's bus (default: $DBUS_SYSTEM_BUS_ADDRESS, else the system bus)")
	f.StringVar(&opts.mode, "mode", string(backend.PolicyEnforce), "enforce (refuse violating domains) or audit (report, allow)")
	f.StringVar(&opts.unreachable, "when-unreachable", unreachableRefuseManaged, "refuse-managed, refuse-all, allow or check-locally: what to do when the daemon cannot be asked")
	f.BoolVar(&opts.offline, "offline", false, "judge locally; never ask the daemon")
	f.StringArrayVar(&opts.allowBacking, "allow-backing", nil, "a directory backing files may come from, for local checks (repeatable; added to the pools' backing_roots)")
	f.BoolVar(&opts.allowHeaderInRaw, "allow-header-in-raw", false, "for local checks: allow a raw disk that starts with an image header (by default refused: libvirt turns a disk without <driver type> into raw, and probing tools would misread it)")
	f.DurationVar(&opts.timeout, "timeout", 30*time.Second, "how long to wait for the daemon's verdict")
	return cmd
}

func init() {
	hookCmd.AddCommand(newHookQemuCmd())
	rootCmd.AddCommand(hookCmd)
}

// hookChecksOperation reports whether libvirt's OPERATION SUB-OPERATION
// is one where a domain's disks are about to be opened.
func hookChecksOperation(operation, sub string) bool {
	if sub != "begin" {
		return false
	}
	switch operation {
	case "prepare", "restore", "migrate":
		return true
	}
	return false
}

// hookVerdict is the outcome of one check.
type hookVerdict struct {
	allowed bool
	lines   []string // one per violation, for stderr
	source  string   // who judged: "daemon", "local", "fallback"
	// report is the policy's report, with each disk's chain, when the
	// daemon or the local policy judged ("fallback" has none).
	report *backend.DomainReport
}

func runHookQemu(ctx context.Context, opts hookOptions, args []string, stdin io.Reader, stderr io.Writer) error {
	domainName, operation, sub := args[0], args[1], args[2]
	if !hookChecksOperation(operation, sub) {
		return nil // nothing is read: libvirt tolerates a hook that leaves stdin unread
	}
	if opts.mode != string(backend.PolicyEnforce) && opts.mode != string(backend.PolicyAudit) {
		return fmt.Errorf("--mode %q: want enforce or audit", opts.mode)
	}
	switch opts.unreachable {
	case unreachableRefuseManaged, unreachableRefuseAll, unreachableAllow, unreachableCheckLocally:
	default:
		return fmt.Errorf("--when-unreachable %q: want %s, %s, %s or %s", opts.unreachable,
			unreachableRefuseManaged, unreachableRefuseAll, unreachableAllow, unreachableCheckLocally)
	}
	// Reading /proc/locks waits for the kernel (see hostblk.LockTable):
	// overlap that with the daemon's verdict. Only block devices need it;
	// a domain with none does not wait for it.
	lockTable := hostblk.NewLockTable()
	lockTable.Prefetch()
	domainXML, err := io.ReadAll(io.LimitReader(stdin, maxHookXML+1))
	if err != nil {
		return hookRefusal(opts, stderr, fmt.Errorf("domain %q: reading the domain XML from stdin: %w", domainName, err))
	}
	if len(domainXML) > maxHookXML {
		return hookRefusal(opts, stderr, fmt.Errorf("domain %q: the domain XML on stdin exceeds %d bytes", domainName, maxHookXML))
	}
	if ctx == nil {
		ctx = context.Background()
	}
	opts.operation = operation
	v, err := judgeDomain(ctx, opts, domainXML, stderr)
	if err != nil {
		return hookRefusal(opts, stderr, fmt.Errorf("domain %q: %w", domainName, err))
	}
	if busy := sharedBusy(v); len(busy) > 0 {
		// Not a policy matter either: qemu could not open them here.
		rep := backend.DomainReport{Domain: domainName, Violations: busy}
		for _, line := range rep.Lines() {
			fmt.Fprintln(stderr, line)
		}
		return &exitError{code: exitHookRefused, err: fmt.Errorf("domain %q refused: %d of its disks are volumes of a shared pool that another host holds", domainName, len(busy))}
	}
	if operation == "migrate" {
		if refused := migrationRefused(opts, domainXML, v); len(refused) > 0 {
			// In audit mode too: a volume exclusive on the source while
			// the destination writes is corrupted, not a policy matter.
			rep := backend.DomainReport{Domain: domainName, Violations: refused}
			for _, line := range rep.Lines() {
				fmt.Fprintln(stderr, line)
			}
			return &exitError{code: exitHookRefused, err: fmt.Errorf("domain %q: live migration refused: %d of its disks are volumes of a shared pool", domainName, len(refused))}
		}
	}
	// Whatever the policy's mode: qemu would refuse these itself if it
	// saw the locks (libvirt gives it a private /dev, where it does not).
	if inUse := disksInUse(domainXML, v.report, lockTable); len(inUse) > 0 {
		for _, line := range append(inUse, v.lines...) {
			fmt.Fprintln(stderr, line)
		}
		why := fmt.Sprintf("%d of its images are in use by another process", len(inUse))
		if !v.allowed {
			why += fmt.Sprintf(", and %d violation(s) of the no-probing policy (%s verdict)", len(v.lines), v.source)
		}
		return &exitError{code: exitHookRefused, err: fmt.Errorf("domain %q refused: %s", domainName, why)}
	}
	if v.allowed {
		return nil
	}
	for _, line := range v.lines {
		fmt.Fprintln(stderr, line)
	}
	if opts.mode == string(backend.PolicyAudit) {
		fmt.Fprintf(stderr, "volagent: domain %q breaks the policy; allowed (audit mode)\n", domainName)
		return nil
	}
	return &exitError{code: exitHookRefused, err: fmt.Errorf("domain %q refused (%s verdict): %d violation(s) of the no-probing policy", domainName, v.source, len(v.lines))}
}

// maxHookXML bounds what the hook reads from stdin.
const maxHookXML = 16 << 20

// hookRefusal turns an error that left no verdict into a refusal (enforce)
// or a warning (audit).
func hookRefusal(opts hookOptions, stderr io.Writer, err error) error {
	if opts.mode == string(backend.PolicyAudit) {
		fmt.Fprintf(stderr, "volagent: %v (allowed: audit mode)\n", err)
		return nil
	}
	return &exitError{code: exitHookRefused, err: err}
}

// judgeDomain gets a verdict: the daemon's, or the local or fallback one.
func judgeDomain(ctx context.Context, opts hookOptions, domainXML []byte, stderr io.Writer) (hookVerdict, error) {
	if opts.offline {
		return judgeLocally(opts, domainXML)
	}
	v, err := askDaemon(ctx, opts, domainXML)
	if err == nil {
		return v, nil
	}
	var bad *daemonRefusedInput
	if errors.As(err, &bad) {
		return hookVerdict{}, err // the daemon judged the XML unreadable: no fallback would do better
	}
	fmt.Fprintf(stderr, "volagent: cannot ask the volagent daemon (%v); applying --when-unreachable=%s\n", err, opts.unreachable)
	return judgeUnreachable(opts, domainXML)
}

// daemonRefusedInput is the daemon's InvalidArgument answer.
type daemonRefusedInput struct{ msg string }

func (e *daemonRefusedInput) Error() string { return "the daemon refused the domain XML: " + e.msg }

// askDaemon calls Manager.CheckDomain(s domain_xml, a{sv} options) -> (b allowed, s report_json).
func askDaemon(ctx context.Context, opts hookOptions, domainXML []byte) (hookVerdict, error) {
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	conn, err := dbusapi.Connect(opts.busAddress, dbus.WithContext(ctx))
	if err != nil {
		return hookVerdict{}, fmt.Errorf("connecting to the bus: %w", err)
	}
	defer conn.Close()
	var allowed bool
	var reportJSON string
	options := map[string]dbus.Variant{}
	if opts.operation != "" {
		options["operation"] = dbus.MakeVariant(opts.operation)
	}
	call := conn.Object(dbusapi.BusName, dbusapi.ManagerPath).CallWithContext(ctx, dbusapi.ManagerIface+".CheckDomain", 0, string(domainXML), options)
	if err := call.Store(&allowed, &reportJSON); err != nil {
		var de dbus.Error
		if errors.As(err, &de) && de.Name == dbusapi.ErrorPrefix+"InvalidArgument" {
			return hookVerdict{}, &daemonRefusedInput{msg: de.Error()}
		}
		return hookVerdict{}, err
	}
	var rep backend.DomainReport
	if err := json.Unmarshal([]byte(reportJSON), &rep); err != nil {
		return hookVerdict{}, fmt.Errorf("the daemon's report is not JSON: %w", err)
	}
	return hookVerdict{allowed: allowed, lines: rep.Lines(), source: "daemon", report: &rep}, nil
}

// hookConfig reads the daemon's configuration if there is one.
func hookConfig(path string) (*backend.Config, error) {
	if path == "" {
		return nil, nil
	}
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return backend.LoadConfig(path)
}

// judgeLocally runs the policy in the hook: backing roots from the
// configuration's pools and --allow-backing; the pools' volumes are
// allowed as backings.
func judgeLocally(opts hookOptions, domainXML []byte) (hookVerdict, error) {
	cfg, err := hookConfig(opts.config)
	if err != nil {
		return hookVerdict{}, err
	}
	policy := backend.DomainPolicyOptions{AllowedRoots: append([]string{}, opts.allowBacking...), AllowHeaderInRaw: opts.allowHeaderInRaw}
	if cfg != nil {
		for _, pc := range cfg.Pools {
			policy.AllowedRoots = append(policy.AllowedRoots, pc.BackingRoots...)
			switch pc.Type {
			case backend.PoolLoop:
				policy.ManagedDevices = append(policy.ManagedDevices, pc.Directory)
			case backend.PoolLVM:
				lvs, _ := filepath.Glob(filepath.Join("/dev", pc.VolumeGroup, "*"))
				policy.ManagedDevices = append(policy.ManagedDevices, lvs...)
			}
		}
	}
	if _, sources, err := backend.ParseDomainDisks(domainXML); err == nil {
		for _, src := range sources {
			if hookIsManaged(cfg, src) {
				policy.ManagedDevices = append(policy.ManagedDevices, src)
			}
		}
	}
	rep, err := backend.CheckDomain(domainXML, policy)
	if err != nil {
		return hookVerdict{}, err
	}
	return hookVerdict{allowed: rep.Allowed(), lines: rep.Lines(), source: "local", report: rep}, nil
}

// judgeUnreachable applies --when-unreachable.
func judgeUnreachable(opts hookOptions, domainXML []byte) (hookVerdict, error) {
	switch opts.unreachable {
	case unreachableAllow:
		return hookVerdict{allowed: true, source: "fallback"}, nil
	case unreachableCheckLocally:
		return judgeLocally(opts, domainXML)
	}
	name, sources, err := backend.ParseDomainDisks(domainXML)
	if err != nil {
		return hookVerdict{}, err
	}
	if opts.unreachable == unreachableRefuseAll {
		return hookVerdict{source: "fallback", lines: []string{fmt.Sprintf("domain %q: the volagent daemon cannot be asked, and --when-unreachable=refuse-all", name)}}, nil
	}
	cfg, err := hookConfig(opts.config)
	if err != nil {
		return hookVerdict{}, err
	}
	var lines []string
	for _, src := range sources {
		if hookIsManaged(cfg, src) {
			lines = append(lines, fmt.Sprintf("domain %q: disk %s is a volagent volume, and the volagent daemon cannot be asked to check it", name, src))
		}
	}
	return hookVerdict{allowed: len(lines) == 0, lines: lines, source: "fallback"}, nil
}

// hookIsManaged says whether a disk source is a volagent volume, from the
// configuration when there is one, else from the loop pools' metadata.
func hookIsManaged(cfg *backend.Config, src string) bool {
	if cfg != nil {
		_, ok := backend.ConfigManagesPath(cfg, src)
		return ok
	}
	return hostblk.IsLoopPoolVolume(src)
}

// disksInUse checks every local image of the domain's disks against the
// qemu image locks others hold, as the domain's qemu would take them (the
// top image as a guest device does, backing images as backings): one line
// per image in use. libvirt starts qemu in a private /dev, where it locks
// a device node of its own and cannot see the locks a writer such as
// volagent import holds on the host's node; the hook, run on the host
// before qemu starts, sees both. The chains come from the policy's report
// (every layer it read), else from the XML. locks is one reading of
// /proc/locks for all of them.
func disksInUse(domainXML []byte, rep *backend.DomainReport, locks *hostblk.LockTable) []string {
	disks, err := backend.DomainDiskLayers(domainXML, rep)
	if err != nil {
		return nil // the policy reported the XML already
	}
	var lines []string
	for _, d := range disks {
		for i, path := range d.Layers {
			set := hostblk.BackingLocks
			if i == 0 {
				set = hostblk.GuestDiskLocks(d.ReadOnly, d.Shareable)
			}
			if err := hostblk.CheckImageLocksPath(locks, path, set); errors.Is(err, hostblk.ErrImageInUse) {
				lines = append(lines, fmt.Sprintf("disk %s: %v", d.Target, err))
			}
		}
	}
	return lines
}

// migrationRefused lists the disks of a domain about to migrate that are
// shared pools' volumes: as the daemon found them (its report), and as the
// configuration says, so the refusal holds when the daemon cannot be
// asked.
func migrationRefused(opts hookOptions, domainXML []byte, v hookVerdict) []backend.DomainViolation {
	var out []backend.DomainViolation
	seen := map[string]bool{}
	if v.report != nil {
		for _, x := range v.report.Violations {
			if x.Code == backend.CodeSharedMigration && !seen[x.Disk] {
				seen[x.Disk] = true
				out = append(out, x)
			}
		}
	}
	cfg, err := hookConfig(opts.config)
	if err != nil || cfg == nil {
		return out
	}
	for _, x := range backend.MigrationRefusal(cfg, domainXML, v.report) {
		if !seen[x.Disk] {
			seen[x.Disk] = true
			out = append(out, x)
		}
	}
	return out
}

// sharedBusy lists the disks the daemon could not activate here because
// another host holds their shared pool's volume.
func sharedBusy(v hookVerdict) []backend.DomainViolation {
	var out []backend.DomainViolation
	if v.report != nil {
		for _, x := range v.report.Violations {
			if x.Code == backend.CodeSharedBusy {
				out = append(out, x)
			}
		}
	}
	return out
}
