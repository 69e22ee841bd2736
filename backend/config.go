package backend

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/volagent/volagent/hostblk"
	"github.com/volagent/volagent/internal/bytesize"
)

// Config is the daemon configuration: one [[pool]] table per pool, and an
// optional [libvirt] table.
type Config struct {
	Pools   []PoolConfig  `toml:"pool"`
	Libvirt LibvirtConfig `toml:"libvirt"`
	// Hosts names the hosts that share volume groups by their sanlock
	// host_id (the [hosts] table: 1 = "alpha"), so messages and ActiveOn
	// say "alpha" rather than "host_id 1".
	Hosts map[int]string
}

// LibvirtConfig is the [libvirt] table. Without it (URI "") volagent does
// not connect to libvirt.
type LibvirtConfig struct {
	// URI is the libvirt connection, e.g. "qemu:///system". Required in
	// the table.
	URI string `toml:"uri"`
	// RequestDir holds the request pools, one directory per volagent pool.
	// Default DefaultRequestDir.
	RequestDir string `toml:"request_dir"`
	// ReconcileInterval is how often request pools are rescanned, as a Go
	// duration ("30s"). Default DefaultReconcileInterval.
	ReconcileInterval time.Duration `toml:"reconcile_interval"`
	// OnViolation is what happens, in enforce mode, to a running domain
	// that gains a disk breaking the policy (a hot-plugged disk or a
	// media change, which pass no hook): ViolationPause (default) pauses
	// it, ViolationLog only logs and signals.
	OnViolation string `toml:"on_violation"`
}

// What [libvirt] on_violation may say.
const (
	ViolationPause = "pause"
	ViolationLog   = "log"
)

// PoolConfig is one [[pool]] table. ParseConfig fills in the defaults, so
// a Config it returns has every field set that its pool type uses.
type PoolConfig struct {
	Name        string   `toml:"name"`         // [a-zA-Z0-9_-]{1,32}
	Type        PoolType `toml:"type"`         // "lvm" | "loop"
	VolumeGroup string   `toml:"volume_group"` // lvm only
	// Activation is how LVs become block devices (lvm only):
	// "device-mapper" or "loop". Required: it is never guessed.
	Activation string `toml:"activation"`
	Directory  string `toml:"directory"` // loop only: an absolute path
	// BackingRoots are absolute directories backing files may come from.
	// The devices (and loop-pool files) of managed volumes are always
	// allowed besides.
	BackingRoots []string `toml:"backing_roots"`
	// InitialSize is the device size thin volumes start at (at least what
	// the qcow2 metadata needs). A byte count, or a string with a binary
	// suffix ("1G"). Default DefaultInitialSize.
	InitialSize int64 `toml:"initial_size"`
	// ChunkSize is what a thin volume's device grows by when the qcow2
	// writer runs out of space. Default DefaultChunkSize.
	ChunkSize int64 `toml:"chunk_size"`
	// Policy is "enforce" (default) or "audit".
	Policy PolicyMode `toml:"policy"`
	// Shared (lvm only) says the volume group is on storage several hosts
	// see and is shared through lvmlockd (vgcreate --shared): volagent
	// starts its lockspace and activates each LV with the lock that
	// follows its use (shared.go).
	Shared bool `toml:"shared"`
	// LockType is the shared VG's lock manager; only LockSanlock. Set
	// (to its default) only when Shared.
	LockType string `toml:"lock_type"`
}

// LockSanlock is the lock manager of shared pools.
const LockSanlock = "sanlock"

// MaxHostID is sanlock's (and so lvmlockd's) largest host_id.
const MaxHostID = 2000

// Defaults of ParseConfig.
const (
	DefaultRequestDir        = "/var/lib/volagent/requests"
	DefaultReconcileInterval = 30 * time.Second

	DefaultInitialSize = 1 << 30
	DefaultChunkSize   = 1 << 30
	// sizeAlignment: device sizes must be whole loop sectors (4096) so
	// loop pools and loop activation can map them.
	sizeAlignment = 4096
)

// rawConfig mirrors Config for decoding: sizes may be strings or integers,
// which only an untyped field can take.
type rawConfig struct {
	Pools   []rawPool         `toml:"pool"`
	Libvirt *rawLibvirt       `toml:"libvirt"`
	Hosts   map[string]string `toml:"hosts"`
}

type rawLibvirt struct {
	URI               string `toml:"uri"`
	RequestDir        string `toml:"request_dir"`
	ReconcileInterval string `toml:"reconcile_interval"`
	OnViolation       string `toml:"on_violation"`
}

type rawPool struct {
	Name         string   `toml:"name"`
	Type         string   `toml:"type"`
	VolumeGroup  string   `toml:"volume_group"`
	Activation   string   `toml:"activation"`
	Directory    string   `toml:"directory"`
	BackingRoots []string `toml:"backing_roots"`
	InitialSize  any      `toml:"initial_size"`
	ChunkSize    any      `toml:"chunk_size"`
	Policy       string   `toml:"policy"`
	Shared       bool     `toml:"shared"`
	LockType     string   `toml:"lock_type"`
}

// LoadConfig reads and parses the configuration file at path. Errors name
// the file, the key and the value.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: reading configuration: %w", ErrInvalidArgument, err)
	}
	return ParseConfig(data, path)
}

// ParseConfig parses a TOML configuration; source names it in errors.
// Unknown keys are errors, so a typo never silently falls back to a
// default. Every error wraps ErrInvalidArgument and names the key, e.g.
// `volagent.toml: pool[1] ("fast").chunk_size: "12Q" is not a size`.
func ParseConfig(data []byte, source string) (*Config, error) {
	var raw rawConfig
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&raw); err != nil {
		return nil, fmt.Errorf("%w: %s", ErrInvalidArgument, describeTOMLError(source, err))
	}
	cfg := &Config{}
	seen := map[string]int{}
	for i, rp := range raw.Pools {
		pc, err := rp.build()
		where := fmt.Sprintf("%s: pool[%d]", source, i)
		if rp.Name != "" {
			where += fmt.Sprintf(" (%q)", rp.Name)
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %s.%w", ErrInvalidArgument, where, err)
		}
		if j, dup := seen[pc.Name]; dup {
			return nil, fmt.Errorf("%w: %s.name: %q is already the name of pool[%d]", ErrInvalidArgument, where, pc.Name, j)
		}
		seen[pc.Name] = i
		if err := sharedStorage(cfg.Pools, pc); err != nil {
			return nil, fmt.Errorf("%w: %s.%w", ErrInvalidArgument, where, err)
		}
		cfg.Pools = append(cfg.Pools, pc)
	}
	if raw.Libvirt != nil {
		lc, err := raw.Libvirt.build()
		if err != nil {
			return nil, fmt.Errorf("%w: %s: libvirt.%w", ErrInvalidArgument, source, err)
		}
		cfg.Libvirt = lc
	}
	if len(raw.Hosts) > 0 {
		cfg.Hosts = map[int]string{}
		for k, name := range raw.Hosts {
			id, err := strconv.Atoi(k)
			if err != nil || id < 1 || id > MaxHostID || strconv.Itoa(id) != k {
				return nil, fmt.Errorf("%w: %s: hosts.%s: want a sanlock host_id from 1 to %d as the key", ErrInvalidArgument, source, k, MaxHostID)
			}
			if !hostNamePattern.MatchString(name) {
				return nil, fmt.Errorf("%w: %s: hosts.%s: %q: want 1 to 64 characters of [a-zA-Z0-9._-]", ErrInvalidArgument, source, k, name)
			}
			cfg.Hosts[id] = name
		}
	}
	return cfg, nil
}

// hostNamePattern is what a [hosts] name may be: a host name, printable
// in messages and ActiveOn as it is.
var hostNamePattern = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$`)

// sharedStorage refuses a pool whose volume group or directory an earlier
// pool has: two pools over the same storage would each take the other's
// volumes for their own (and delete them as leftovers of a crash).
func sharedStorage(earlier []PoolConfig, pc PoolConfig) error {
	for j, other := range earlier {
		switch {
		case pc.Type == PoolLVM && other.Type == PoolLVM && pc.VolumeGroup == other.VolumeGroup:
			return fmt.Errorf("volume_group: %q is already the volume group of pool[%d] (%q): give each pool its own volume group", pc.VolumeGroup, j, other.Name)
		case pc.Type == PoolLoop && other.Type == PoolLoop && sameDirectory(pc.Directory, other.Directory):
			return fmt.Errorf("directory: %q is already the directory of pool[%d] (%q, %q): give each pool its own directory", pc.Directory, j, other.Name, other.Directory)
		}
	}
	return nil
}

// sameDirectory compares two cleaned directories by name and, where both
// exist, by what they are (a symlink or bind mount is the same directory).
func sameDirectory(a, b string) bool {
	if a == b {
		return true
	}
	fa, errA := os.Stat(a)
	fb, errB := os.Stat(b)
	return errA == nil && errB == nil && os.SameFile(fa, fb)
}

// build checks the [libvirt] table and applies the defaults. Errors start
// with the key name.
func (rl rawLibvirt) build() (LibvirtConfig, error) {
	lc := LibvirtConfig{URI: rl.URI, RequestDir: rl.RequestDir, ReconcileInterval: DefaultReconcileInterval, OnViolation: rl.OnViolation}
	switch lc.OnViolation {
	case "":
		lc.OnViolation = ViolationPause
	case ViolationPause, ViolationLog:
	default:
		return lc, fmt.Errorf("on_violation: %q: want %q or %q", rl.OnViolation, ViolationPause, ViolationLog)
	}
	if lc.URI == "" {
		return lc, fmt.Errorf(`uri: required in the [libvirt] table, e.g. "qemu:///system" (leave the table out for no libvirt)`)
	}
	if lc.RequestDir == "" {
		lc.RequestDir = DefaultRequestDir
	} else if !filepath.IsAbs(lc.RequestDir) || filepath.Clean(lc.RequestDir) != lc.RequestDir {
		return lc, fmt.Errorf("request_dir: %q: want a clean absolute path", lc.RequestDir)
	}
	if rl.ReconcileInterval != "" {
		d, err := time.ParseDuration(rl.ReconcileInterval)
		if err != nil || d < time.Second {
			return lc, fmt.Errorf("reconcile_interval: %q: want a duration of at least 1s, e.g. \"30s\"", rl.ReconcileInterval)
		}
		lc.ReconcileInterval = d
	}
	return lc, nil
}

// describeTOMLError turns go-toml's errors into "source: line N: ..."
// naming the key.
func describeTOMLError(source string, err error) string {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) {
		var parts []string
		for _, e := range strict.Errors {
			row, _ := e.Position()
			parts = append(parts, fmt.Sprintf("%s: line %d: unknown key %s", source, row, strings.Join(e.Key(), ".")))
		}
		return strings.Join(parts, "; ")
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		key := strings.Join(de.Key(), ".")
		if key != "" {
			return fmt.Sprintf("%s: line %d column %d: key %s: %v", source, row, col, key, de)
		}
		return fmt.Sprintf("%s: line %d column %d: %v", source, row, col, de)
	}
	return fmt.Sprintf("%s: %v", source, err)
}

// build checks one pool table and applies the defaults. Errors start with
// the key name (the caller prefixes the pool).
func (rp rawPool) build() (PoolConfig, error) {
	pc := PoolConfig{
		Name: rp.Name, Type: PoolType(rp.Type), VolumeGroup: rp.VolumeGroup, Activation: rp.Activation,
		Directory: rp.Directory, Policy: PolicyMode(rp.Policy), Shared: rp.Shared,
	}
	if !poolNamePattern().MatchString(rp.Name) {
		return pc, fmt.Errorf("name: %q: want 1 to %d characters of %s", rp.Name, MaxPoolNameLength, PoolNameChars)
	}
	switch pc.Type {
	case PoolLVM:
		if err := hostblk.ValidateVGName(rp.VolumeGroup); err != nil {
			return pc, fmt.Errorf("volume_group: %q: %w", rp.VolumeGroup, err)
		}
		if rp.Activation == "" {
			return pc, fmt.Errorf("activation: missing: give %q or %q (it is never guessed)", hostblk.ActivationDeviceMapper, hostblk.ActivationLoop)
		}
		if _, err := hostblk.ParseActivationMode(rp.Activation); err != nil {
			return pc, fmt.Errorf("activation: %q: want %q or %q", rp.Activation, hostblk.ActivationDeviceMapper, hostblk.ActivationLoop)
		}
		if rp.Directory != "" {
			return pc, fmt.Errorf("directory: %q: only loop pools have a directory", rp.Directory)
		}
		if rp.Shared {
			switch rp.LockType {
			case "", LockSanlock:
				pc.LockType = LockSanlock
			case "dlm", "idm":
				return pc, fmt.Errorf("lock_type: %q: volagent supports shared volume groups with %q only so far (create the VG with vgcreate --shared --locktype sanlock)", rp.LockType, LockSanlock)
			default:
				return pc, fmt.Errorf("lock_type: %q: want %q", rp.LockType, LockSanlock)
			}
			if rp.Activation != string(hostblk.ActivationDeviceMapper) {
				return pc, fmt.Errorf("activation: %q: a shared pool needs %q (lvmlockd's locks are taken by lvm's own activation)", rp.Activation, hostblk.ActivationDeviceMapper)
			}
		} else if rp.LockType != "" {
			return pc, fmt.Errorf("lock_type: %q: only a shared pool (shared = true) has a lock type", rp.LockType)
		}
	case PoolLoop:
		if rp.Directory == "" || !filepath.IsAbs(rp.Directory) {
			return pc, fmt.Errorf("directory: %q: want an absolute path", rp.Directory)
		}
		pc.Directory = filepath.Clean(rp.Directory)
		if rp.VolumeGroup != "" {
			return pc, fmt.Errorf("volume_group: %q: only lvm pools have a volume group", rp.VolumeGroup)
		}
		if rp.Activation != "" {
			return pc, fmt.Errorf("activation: %q: only lvm pools have an activation mode", rp.Activation)
		}
		if rp.Shared || rp.LockType != "" {
			return pc, fmt.Errorf("shared: only lvm pools can be shared between hosts (lvmlockd)")
		}
	case "":
		return pc, fmt.Errorf("type: missing: give %q or %q", PoolLVM, PoolLoop)
	default:
		return pc, fmt.Errorf("type: %q: want %q or %q", rp.Type, PoolLVM, PoolLoop)
	}
	for i, root := range rp.BackingRoots {
		if root == "" || !filepath.IsAbs(root) {
			return pc, fmt.Errorf("backing_roots[%d]: %q: want an absolute directory", i, root)
		}
		pc.BackingRoots = append(pc.BackingRoots, filepath.Clean(root))
	}
	var err error
	if pc.InitialSize, err = configSize("initial_size", rp.InitialSize, DefaultInitialSize); err != nil {
		return pc, err
	}
	if pc.ChunkSize, err = configSize("chunk_size", rp.ChunkSize, DefaultChunkSize); err != nil {
		return pc, err
	}
	switch pc.Policy {
	case "":
		pc.Policy = PolicyEnforce
	case PolicyEnforce, PolicyAudit:
	default:
		return pc, fmt.Errorf("policy: %q: want %q or %q", rp.Policy, PolicyEnforce, PolicyAudit)
	}
	return pc, nil
}

// configSize converts an integer or a size string; nil means the default.
func configSize(key string, v any, def int64) (int64, error) {
	var n int64
	switch v := v.(type) {
	case nil:
		return def, nil
	case int64:
		n = v
	case string:
		var err error
		if n, err = bytesize.Parse(v); err != nil {
			return 0, fmt.Errorf("%s: %q is not a size (bytes, or a number with K, M, G, T or P, binary)", key, v)
		}
	default:
		return 0, fmt.Errorf("%s: %v (%T) is not a size: give an integer or a string such as \"1G\"", key, v, v)
	}
	if n <= 0 || n%sizeAlignment != 0 {
		return 0, fmt.Errorf("%s: %d: want a positive multiple of %d bytes", key, n, sizeAlignment)
	}
	return n, nil
}
