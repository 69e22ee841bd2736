package dbusapi

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/dbusapi/dbustest"
)

// helperEnv makes the test binary act as a D-Bus client instead of running
// tests, so a test can make calls busctl cannot (file descriptors) as
// another user.
const helperEnv = "DBUSAPI_TEST_HELPER"

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(runHelper(mode, os.Args[len(os.Args)-1]))
	}
	os.Exit(m.Run())
}

// runHelper: "inspect FILE" calls Manager.Inspect on FILE and prints the
// report or the error.
func runHelper(mode, arg string) int {
	conn, err := dbus.Connect(os.Getenv("DBUS_SYSTEM_BUS_ADDRESS"))
	if err != nil {
		fmt.Println("connect:", err)
		return 1
	}
	defer conn.Close()
	switch mode {
	case "inspect":
		f, err := os.Open(arg)
		if err != nil {
			fmt.Println(err)
			return 1
		}
		var report string
		err = conn.Object(BusName, ManagerPath).Call(ManagerIface+".Inspect", 0, dbus.UnixFD(f.Fd()), "raw", map[string]dbus.Variant{}).Store(&report)
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		fmt.Println(report)
		return 0
	case "inspect-many":
		return inspectMany(conn, arg)
	}
	fmt.Println("unknown helper mode", mode)
	return 2
}

// inspectMany calls Inspect on file from 16 goroutines at once, round
// after round, until its standard input closes. It prints "started" once
// the first round is out, "round N" after each, and at the end how the
// calls ended.
func inspectMany(conn *dbus.Conn, file string) int {
	f, err := os.Open(file)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	stop := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(stop) }()
	var mu sync.Mutex
	ended := map[string]int{}
	for round := 0; ; round++ {
		var wg sync.WaitGroup
		for range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var report string
				err := conn.Object(BusName, ManagerPath).Call(ManagerIface+".Inspect", 0, dbus.UnixFD(f.Fd()), "qcow2", map[string]dbus.Variant{}).Store(&report)
				kind := "ok"
				if err != nil {
					kind = dbusErrorName(err)
				}
				mu.Lock()
				ended[kind]++
				mu.Unlock()
			}()
		}
		if round == 0 {
			fmt.Println("started")
		}
		wg.Wait()
		fmt.Println("round", round+1)
		select {
		case <-stop:
			fmt.Println(ended)
			return 0
		default:
		}
	}
}

// runAsNobody runs the test binary as a helper under UID 65534 and returns
// its output.
func runAsNobody(t *testing.T, bus *dbustest.Bus, mode, arg string) string {
	t.Helper()
	cmd := nobodyHelper(t, bus, mode, arg)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper as nobody: %v\n%s", err, out)
	}
	return string(out)
}

// nobodyHelper is the command that runs the test binary as a helper
// under UID 65534 (not started).
func nobodyHelper(t *testing.T, bus *dbustest.Bus, mode, arg string) *exec.Cmd {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The build directory is private to root; nobody runs a copy.
	helper := filepath.Join(bus.Dir, "helper")
	src, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(helper, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	dst.Close()
	// The file to read must be readable by nobody, too.
	os.Chmod(filepath.Dir(arg), 0o755)
	os.Chmod(filepath.Dir(filepath.Dir(arg)), 0o755)
	os.Chmod(arg, 0o644)
	uid := strconv.Itoa(dbustest.NobodyUID)
	cmd := exec.Command("setpriv", "--reuid="+uid, "--regid="+uid, "--clear-groups", helper)
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, "DBUS_SYSTEM_BUS_ADDRESS="+bus.Address)
	cmd.Args = append(cmd.Args, arg)
	return cmd
}
