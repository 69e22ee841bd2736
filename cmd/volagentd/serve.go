package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/spf13/cobra"

	"github.com/volagent/volagent/backend"
	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/internal/version"
	"github.com/volagent/volagent/systemd"
	"github.com/volagent/volagent/virt"
)

// defaultConfigPath is where the daemon reads its configuration.
const defaultConfigPath = "/etc/volagent/volagent.toml"

type serveOptions struct {
	config     string
	busAddress string
	debug      bool
	// libvirtURI enables the libvirt integration ("" leaves it off). The
	// flags override the configuration's [libvirt] table.
	libvirtURI        string
	requestDir        string
	reconcileInterval time.Duration
	// flagSet reports whether a flag was given on the command line.
	flagSet func(name string) bool
}

// applyLibvirtConfig takes the [libvirt] table's values for every libvirt
// flag not given on the command line.
func (o *serveOptions) applyLibvirtConfig(lc backend.LibvirtConfig) {
	given := func(name string) bool { return o.flagSet != nil && o.flagSet(name) }
	if !given("libvirt-uri") {
		o.libvirtURI = lc.URI
	}
	if !given("request-dir") && lc.RequestDir != "" {
		o.requestDir = lc.RequestDir
	}
	if !given("reconcile-interval") && lc.ReconcileInterval != 0 {
		o.reconcileInterval = lc.ReconcileInterval
	}
}

func newServeCmd() *cobra.Command {
	var opts serveOptions
	cmd := &cobra.Command{
		Use:   "volagentd [--config PATH] [--bus-address ADDRESS] [--debug] [--libvirt-uri URI]",
		Short: "The volagent daemon: serves org.volagent.VolAgent1 on the system bus",
		Long: `volagentd is the volagent daemon. It reads the configuration (TOML, one
[[pool]] table per pool), opens the pools - removing what an interrupted
operation left behind - and serves the D-Bus API org.volagent.VolAgent1 on
the system bus (or the bus at --bus-address, or at DBUS_SYSTEM_BUS_ADDRESS).

Under systemd (Type=notify) it reports READY=1 once the bus name is owned
and the pools are loaded, keeps STATUS= current, pings the watchdog when
WatchdogSec= is set, and logs to the journal with structured fields
(otherwise to standard error). SIGTERM or SIGINT stop it gracefully:
running jobs are cancelled and their half-made volumes removed.

With --libvirt-uri (e.g. qemu:///system) it also connects to libvirt, and
reconnects whenever libvirtd restarts: it audits running domains against
the no-probing policy (hot-plugged disks included), defines for each pool a
libvirt "dir" pool of the same name on --request-dir/POOL whose
"virsh vol-create" requests it materializes as overlays (and whose
"virsh vol-delete" deletes them), and grows the overlays running domains
write to (block thresholds, and ENOSPC pauses).

Exit status: 0 after a clean stop, 2 when it cannot start (the message
names the configuration key at fault) or loses the bus.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.flagSet = cmd.Flags().Changed
			return runServe(opts)
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.config, "config", defaultConfigPath, "configuration file")
	f.StringVar(&opts.busAddress, "bus-address", "", "D-Bus address to serve on (default: the system bus)")
	f.BoolVar(&opts.debug, "debug", false, "log debug messages")
	f.StringVar(&opts.libvirtURI, "libvirt-uri", "", "libvirt connection URI, e.g. qemu:///system (default: the configuration's [libvirt] uri, else no libvirt integration)")
	f.StringVar(&opts.requestDir, "request-dir", backend.DefaultRequestDir, "directory of the libvirt request pools, one subdirectory per pool (default: the configuration's [libvirt] request_dir)")
	f.DurationVar(&opts.reconcileInterval, "reconcile-interval", backend.DefaultReconcileInterval, "how often the request pools are rescanned (default: the configuration's [libvirt] reconcile_interval)")
	return cmd
}

func runServe(opts serveOptions) error {
	level := slog.LevelInfo
	if opts.debug {
		level = slog.LevelDebug
	}
	log := slog.New(systemd.NewLogHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)

	// Signals are caught from the start, so a SIGTERM during loading still
	// stops cleanly (after loading, which cleans up what it finds).
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	systemd.Status("reading " + opts.config)
	cfg, err := backend.LoadConfig(opts.config)
	if err != nil {
		return fmt.Errorf("bad configuration: %w", err)
	}
	opts.applyLibvirtConfig(cfg.Libvirt)
	mgr, err := backend.NewManager(cfg, backend.ManagerOptions{Logger: log})
	if err != nil {
		return fmt.Errorf("bad configuration %s: %w", opts.config, err)
	}
	defer mgr.Close()

	loading := fmt.Sprintf("loading %d pool(s)", len(cfg.Pools))
	for _, pc := range cfg.Pools {
		if pc.Shared {
			// READY only once the lockspaces are started (or given up).
			loading += "; starting the lvmlockd lockspaces of shared pools (sanlock: up to a few minutes)"
			break
		}
	}
	systemd.Status(loading)
	loadErr := mgr.Load(context.Background())
	if loadErr != nil {
		// The pools that did load are served; the others are named here
		// and in the status line.
		log.Error("some pools could not be loaded", "error", loadErr)
	}

	srv := dbusapi.NewServer(mgr, dbusapi.Options{Version: version.Version, Logger: log})
	conn, err := dbusapi.Connect(opts.busAddress, dbus.WithHandler(srv))
	if err != nil {
		return fmt.Errorf("connecting to the bus: %w", err)
	}
	defer conn.Close()
	srv.Start(conn)
	defer srv.Stop()

	reply, err := conn.RequestName(dbusapi.BusName, dbus.NameFlagDoNotQueue)
	if err != nil {
		return fmt.Errorf("owning bus name %s: %w (the bus policy file org.volagent.VolAgent1.conf lets only root own it)", dbusapi.BusName, err)
	}
	if reply != dbus.RequestNameReplyPrimaryOwner {
		return fmt.Errorf("bus name %s is already owned by another process: is another volagentd running?", dbusapi.BusName)
	}

	// After the name is owned: the qemu hook, which libvirt runs when a
	// domain starts, asks this daemon.
	stopLibvirt := func() {}
	if opts.libvirtURI != "" {
		if stopLibvirt, err = startLibvirt(mgr, cfg, opts, log); err != nil {
			return err
		}
		defer stopLibvirt()
	}

	pools, volumes := mgr.Pools(), mgr.Volumes()
	status := fmt.Sprintf("serving %d of %d pool(s), %d volume(s)", len(pools), len(cfg.Pools), len(volumes))
	if loadErr != nil {
		status += "; not loaded: " + loadErr.Error()
	}
	if err := systemd.Ready(status); err != nil {
		log.Warn("notifying the service manager", "error", err)
	}
	log.Info("ready", "bus_name", dbusapi.BusName, "pools", len(pools), "volumes", len(volumes), "version", version.Version)
	// Load read headers and refcounts only; every table is checked now,
	// one volume at a time at idle I/O priority.
	mgr.StartBackgroundChecks()
	// Shared pools: other hosts' changes show here without a Rescan.
	go mgr.WatchSharedPools(ctx)

	go systemd.RunWatchdog(ctx, func() error {
		if !conn.Connected() {
			return errors.New("the bus connection is closed")
		}
		return nil
	}, log)

	var lost error
	select {
	case <-ctx.Done():
		log.Info("stopping on signal")
	case <-conn.Context().Done():
		lost = errors.New("lost the connection to the bus")
		log.Error("stopping", "error", lost)
	}

	systemd.Stopping("stopping: cancelling jobs")
	// Before the Manager closes: nothing may call it afterwards.
	stopLibvirt()
	// Jobs are cancelled while the daemon still owns its name, so that
	// clients watching them (matching on the name) see Completed(false).
	if err := mgr.Close(); err != nil {
		log.Error("closing the pools", "error", err)
	}
	srv.Stop()
	if conn.Connected() {
		if _, err := conn.ReleaseName(dbusapi.BusName); err != nil {
			log.Warn("releasing the bus name", "error", err)
		}
	}
	log.Info("stopped")
	return lost
}

// startLibvirt connects to libvirt (in the background, reconnecting after
// every libvirtd restart) with the domain auditor, the request pools and
// the thin-provisioning controller, and returns what stops them all
// (idempotent).
func startLibvirt(mgr *backend.Manager, cfg *backend.Config, opts serveOptions, log *slog.Logger) (func(), error) {
	var pools []string
	for _, p := range mgr.Pools() {
		pools = append(pools, p.Name)
	}
	if len(pools) < len(cfg.Pools) {
		log.Warn("request pools only for the pools that loaded", "loaded", len(pools), "configured", len(cfg.Pools))
	}
	vlog := log.With("component", "libvirt")
	auditor := virt.NewAuditor(mgr, vlog, nil)
	requests := virt.NewRequestWatcher(mgr, virt.RequestWatcherOptions{Pools: pools, BaseDir: opts.requestDir, ReconcileInterval: opts.reconcileInterval, Logger: vlog})
	if cfg.Libvirt.OnViolation != backend.ViolationLog {
		auditor.PauseOnViolation(mgr.SignalPolicyViolation)
	}
	thin := virt.NewThinController(mgr, vlog)
	if err := requests.Start(); err != nil {
		return nil, fmt.Errorf("libvirt request pools: %w", err)
	}
	handlers := thin.Handlers(requests.Handlers(auditor.Handlers(virt.Handlers{})))
	conn, err := virt.Dial(virt.Options{URI: opts.libvirtURI, Logger: vlog}, handlers)
	if err != nil {
		requests.Close()
		return nil, fmt.Errorf("libvirt %s: %w", opts.libvirtURI, err)
	}
	auditor.Bind(conn)
	requests.Bind(conn)
	thin.Bind(conn)
	mgr.SetDomains(virt.NewDomains(conn))
	log.Info("libvirt integration started", "uri", opts.libvirtURI, "request_dir", opts.requestDir, "pools", pools)
	var once sync.Once
	return func() {
		once.Do(func() {
			// The watcher first: it calls libvirt through conn.
			requests.Close()
			// mgr keeps its Domains: once closed they answer
			// ErrDisconnected, and the Manager refuses what needs them.
			thin.Close()
			conn.Close()
			log.Info("libvirt integration stopped")
		})
	}, nil
}
