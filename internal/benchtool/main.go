// Command benchtool is the D-Bus client of scripts/bench.sh: one client
// connection timing calls to a running `volagentd`. It is a benchmark
// helper, not part of the product.
//
//	benchtool wait     -bus ADDR [-timeout 60s]
//	benchtool create   -bus ADDR -pool P -backing PATH [-n 30] [-prefix bench-create-]
//	benchtool inspect  -bus ADDR -image PATH [-duration 5s]
//	benchtool populate -bus ADDR -pool P -backing PATH -n 1000 [-parallel 2]
//	benchtool delete   -bus ADDR -pool P [-parallel 2]
//	benchtool loop-remove N...
//	benchtool set-meta -pool-dir DIR -role base NAME...
//	benchtool grow     -type loop|lvm -dir DIR [-n 20]
//	benchtool start    -bus ADDR -volagentd BIN -config FILE -disk DEV [-timeout 10m]
//
// create prints the median call-to-reply latency in milliseconds (and
// deletes the volumes again, untimed); inspect prints calls per second;
// populate prints how many volumes it made (it stops at the first error,
// which it reports on stderr); delete prints how many it deleted.
// set-meta gives files NAME.img put into a loop pool's directory by hand
// the pool's volume metadata (a base volume: no backing). start runs
// `BIN` (volagentd) and prints, in milliseconds from its exec, when it owned
// its bus name and when it answered CheckDomain for a domain whose qcow2
// disk is DEV, then in seconds when it logged that its background checks
// finished; it stops the daemon then.
// loop-remove removes unattached loop devices /dev/loopN (LOOP_CTL_REMOVE):
// the kernel keeps every loop device the pools made it create, and each
// one slows every later scan of the loop devices.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/dbusapi"
	"github.com/volagent/volagent/hostblk"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: benchtool wait|create|inspect|populate|delete [flags]")
		os.Exit(2)
	}
	cmd := os.Args[1]
	if cmd == "loop-remove" {
		if err := loopRemove(os.Args[2:]); err != nil {
			fail(err)
		}
		return
	}
	if cmd == "grow" {
		if err := growLatency(os.Args[2:]); err != nil {
			fail(err)
		}
		return
	}
	if cmd == "set-meta" {
		if err := setMeta(os.Args[2:]); err != nil {
			fail(err)
		}
		return
	}
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	bus := fs.String("bus", "", "D-Bus address of the private bus")
	pool := fs.String("pool", "", "pool name")
	backing := fs.String("backing", "", "raw backing file of the overlays")
	image := fs.String("image", "", "image to Inspect")
	n := fs.Int("n", 30, "number of calls or volumes")
	prefix := fs.String("prefix", "bench-", "volume name prefix")
	parallel := fs.Int("parallel", 2, "calls in flight (populate, delete)")
	duration := fs.Duration("duration", 5*time.Second, "how long inspect calls")
	timeout := fs.Duration("timeout", 60*time.Second, "how long wait waits (start: for the background checks)")
	daemonBin := fs.String("volagentd", "", "start: the volagentd binary")
	config := fs.String("config", "", "start: the daemon's configuration")
	disk := fs.String("disk", "", "start: the qcow2 device of the domain CheckDomain judges")
	fs.Parse(os.Args[2:])
	if *bus == "" {
		fail(errors.New("-bus is required"))
	}
	if cmd == "start" {
		if err := startTime(*bus, *daemonBin, *config, *disk, *timeout); err != nil {
			fail(err)
		}
		return
	}
	conn, err := dbus.Connect(*bus)
	if err != nil {
		fail(fmt.Errorf("connecting to %s: %w", *bus, err))
	}
	defer conn.Close()
	switch cmd {
	case "wait":
		err = wait(conn, *timeout)
	case "create":
		err = create(conn, *pool, *backing, *prefix, *n)
	case "inspect":
		err = inspect(conn, *image, *duration)
	case "populate":
		err = populate(conn, *pool, *backing, *prefix, *n, *parallel)
	case "delete":
		err = deleteAll(conn, *pool, *parallel)
	default:
		err = fmt.Errorf("unknown subcommand %q", cmd)
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "benchtool:", err)
	os.Exit(1)
}

func manager(conn *dbus.Conn) dbus.BusObject {
	return conn.Object(dbusapi.BusName, dbusapi.ManagerPath)
}

// wait returns once the daemon owns its name and answers.
func wait(conn *dbus.Conn, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		var owned bool
		err := conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, dbusapi.BusName).Store(&owned)
		if err == nil && owned {
			if _, err = manager(conn).GetProperty(dbusapi.ManagerIface + ".Version"); err == nil {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not served within %v (last error: %v)", dbusapi.BusName, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func createOverlay(conn *dbus.Conn, pool, name, backing string) (dbus.ObjectPath, error) {
	var path dbus.ObjectPath
	err := manager(conn).Call(dbusapi.ManagerIface+".CreateOverlay", 0,
		pool, name, backing, "raw", uint64(0), map[string]dbus.Variant{}).Store(&path)
	if err != nil {
		return "", fmt.Errorf("CreateOverlay %s/%s: %w", pool, name, err)
	}
	return path, nil
}

func deleteVolume(conn *dbus.Conn, path dbus.ObjectPath) error {
	if err := conn.Object(dbusapi.BusName, path).Call(dbusapi.VolumeIface+".Delete", 0, map[string]dbus.Variant{}).Err; err != nil {
		return fmt.Errorf("Delete %s: %w", path, err)
	}
	return nil
}

// create times n CreateOverlay calls, one at a time: the reply comes after
// the daemon has flushed the image and marked the volume complete.
func create(conn *dbus.Conn, pool, backing, prefix string, n int) error {
	var times []time.Duration
	var made []dbus.ObjectPath
	var err error
	for i := 0; i < n && err == nil; i++ {
		start := time.Now()
		var p dbus.ObjectPath
		if p, err = createOverlay(conn, pool, fmt.Sprintf("%s%d", prefix, i), backing); err == nil {
			times = append(times, time.Since(start))
			made = append(made, p)
		}
	}
	for _, p := range made {
		if derr := deleteVolume(conn, p); derr != nil && err == nil {
			err = derr
		}
	}
	if err != nil {
		return err
	}
	fmt.Printf("%.3f\n", float64(median(times))/1e6)
	return nil
}

func median(d []time.Duration) time.Duration {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	if len(d)%2 == 1 {
		return d[len(d)/2]
	}
	return (d[len(d)/2-1] + d[len(d)/2]) / 2
}

// inspect calls Inspect back to back for duration, passing the same open
// image each time (the bus duplicates the descriptor per message).
func inspect(conn *dbus.Conn, image string, duration time.Duration) error {
	f, err := os.Open(image)
	if err != nil {
		return err
	}
	defer f.Close()
	call := func() error {
		var report string
		err := manager(conn).Call(dbusapi.ManagerIface+".Inspect", 0, dbus.UnixFD(f.Fd()), "qcow2", map[string]dbus.Variant{}).Store(&report)
		if err == nil && !strings.Contains(report, `"verdict":"accepted"`) {
			err = fmt.Errorf("unexpected report %s", report)
		}
		return err
	}
	for i := 0; i < 50; i++ { // warm up connections and caches
		if err := call(); err != nil {
			return fmt.Errorf("Inspect: %w", err)
		}
	}
	calls := 0
	start := time.Now()
	for time.Since(start) < duration {
		if err := call(); err != nil {
			return fmt.Errorf("Inspect: %w", err)
		}
		calls++
	}
	fmt.Printf("%.0f\n", float64(calls)/time.Since(start).Seconds())
	return nil
}

// populate makes n overlays, a few calls in flight; it stops at the first
// error (usually: no more loop devices) and reports how many it made.
func populate(conn *dbus.Conn, pool, backing, prefix string, n, parallel int) error {
	var next, made atomic.Int64
	var once sync.Once
	var firstErr error
	var stop atomic.Bool
	var wg sync.WaitGroup
	for w := 0; w < parallel; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				if _, err := createOverlay(conn, pool, fmt.Sprintf("%s%04d", prefix, i), backing); err != nil {
					once.Do(func() { firstErr = err })
					stop.Store(true)
					return
				}
				made.Add(1)
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		fmt.Fprintf(os.Stderr, "benchtool: populate stopped after %d volumes: %v\n", made.Load(), firstErr)
	}
	fmt.Println(made.Load())
	return nil
}

// deleteAll deletes every volume of pool.
func deleteAll(conn *dbus.Conn, pool string, parallel int) error {
	var objs map[dbus.ObjectPath]map[string]map[string]dbus.Variant
	if err := manager(conn).Call(dbusapi.ObjectManagerIface+".GetManagedObjects", 0).Store(&objs); err != nil {
		return fmt.Errorf("GetManagedObjects: %w", err)
	}
	paths := make(chan dbus.ObjectPath, len(objs))
	poolPath := dbusapi.PoolPath(pool)
	for p, ifaces := range objs {
		if props, ok := ifaces[dbusapi.VolumeIface]; ok {
			if v, ok := props["Pool"].Value().(dbus.ObjectPath); ok && v == poolPath {
				paths <- p
			}
		}
	}
	close(paths)
	var deleted atomic.Int64
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for w := 0; w < parallel; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range paths {
				if err := deleteVolume(conn, p); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					continue
				}
				deleted.Add(1)
			}
		}()
	}
	wg.Wait()
	fmt.Println(deleted.Load())
	return errors.Join(errs...)
}

// loopRemove removes the given loop devices; the kernel refuses (EBUSY)
// those attached or open, which are left alone.
func loopRemove(numbers []string) error {
	removed := 0
	for _, a := range numbers {
		n, err := strconv.Atoi(a)
		if err != nil {
			return fmt.Errorf("loop device number %q: %v", a, err)
		}
		if hostblk.RemoveLoopDevice(n) == nil {
			removed++
		}
	}
	fmt.Println(removed)
	return nil
}
