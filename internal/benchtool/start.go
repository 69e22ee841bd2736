package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/hostblk"
)

// setMeta: set-meta -pool-dir DIR -role ROLE NAME...
func setMeta(args []string) error {
	fs := flag.NewFlagSet("set-meta", flag.ExitOnError)
	dir := fs.String("pool-dir", "", "the loop pool's directory")
	role := fs.String("role", "base", "the volumes' role")
	fs.Parse(args)
	pool, err := hostblk.OpenLoopPool(*dir, hostblk.LoopOptions{})
	if err != nil {
		return err
	}
	for _, name := range fs.Args() {
		if err := pool.SetMeta(name, hostblk.VolumeMeta{Role: *role}); err != nil {
			return err
		}
	}
	return nil
}

// startTime runs the daemon and times its start (see the package comment).
func startTime(bus, bin, config, disk string, timeout time.Duration) error {
	if bin == "" || config == "" || disk == "" {
		return errors.New("start needs -volagent, -config and -disk")
	}
	cmd := exec.Command(bin, "--config", config, "--bus-address", bus)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	checksDone := make(chan struct{})
	var mu sync.Mutex
	var lastLines []string // the daemon's first lines, for errors
	firstLines := func() string {
		mu.Lock()
		defer mu.Unlock()
		return strings.Join(lastLines, "\n")
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		closed := false
		for sc.Scan() {
			line := sc.Text()
			mu.Lock()
			if len(lastLines) < 20 {
				lastLines = append(lastLines, line)
			}
			mu.Unlock()
			if !closed && strings.Contains(line, "background checks finished") {
				close(checksDone)
				closed = true
			}
		}
	}()

	conn, err := dbus.Connect(bus)
	if err != nil {
		return fmt.Errorf("connecting to %s: %w", bus, err)
	}
	defer conn.Close()
	for {
		var owned bool
		if err := conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, dbusapi.BusName).Store(&owned); err != nil {
			return err
		}
		if owned {
			break
		}
		if time.Since(start) > 2*time.Minute {
			return fmt.Errorf("%s not owned within 2 minutes: %s", dbusapi.BusName, firstLines())
		}
		time.Sleep(2 * time.Millisecond)
	}
	owned := time.Since(start)
	xml := fmt.Sprintf(`<domain type='kvm'><name>bench-start</name><devices><disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='%s'/><target dev='vda' bus='virtio'/></disk></devices></domain>`, disk)
	var allowed bool
	var report string
	if err := conn.Object(dbusapi.BusName, dbusapi.ManagerPath).Call(dbusapi.ManagerIface+".CheckDomain", 0, xml, map[string]dbus.Variant{}).Store(&allowed, &report); err != nil {
		return fmt.Errorf("CheckDomain: %w", err)
	}
	answered := time.Since(start)
	if !allowed {
		return fmt.Errorf("CheckDomain refused the domain over %s: %s", disk, report)
	}
	select {
	case <-checksDone:
	case <-time.After(timeout):
		return fmt.Errorf("bus name owned after %.1f ms, CheckDomain answered after %.1f ms, but the background checks did not finish within %v",
			float64(owned)/1e6, float64(answered)/1e6, timeout)
	}
	fmt.Printf("%.1f %.1f %.1f\n", float64(owned)/1e6, float64(answered)/1e6, time.Since(start).Seconds())
	return nil
}
