package main

import (
	"testing"
	"time"

	"github.com/volagent/volagent/backend"
)

// TestServeLibvirtConfigPrecedence: the [libvirt] table configures the
// integration, and a flag given on the command line wins over it.
func TestServeLibvirtConfigPrecedence(t *testing.T) {
	table := backend.LibvirtConfig{URI: "qemu:///system", RequestDir: "/srv/requests", ReconcileInterval: time.Minute}
	defaults := func() serveOptions {
		return serveOptions{requestDir: backend.DefaultRequestDir, reconcileInterval: backend.DefaultReconcileInterval}
	}

	o := defaults()
	o.flagSet = func(string) bool { return false }
	o.applyLibvirtConfig(table)
	if o.libvirtURI != table.URI || o.requestDir != table.RequestDir || o.reconcileInterval != table.ReconcileInterval {
		t.Errorf("no flags: %+v; want the table's values %+v", o, table)
	}

	o = defaults()
	o.libvirtURI, o.requestDir = "qemu:///session", "/flag/requests"
	o.flagSet = func(name string) bool { return name == "libvirt-uri" || name == "request-dir" }
	o.applyLibvirtConfig(table)
	if o.libvirtURI != "qemu:///session" || o.requestDir != "/flag/requests" || o.reconcileInterval != time.Minute {
		t.Errorf("flags given: %+v; want the flags' URI and directory, the table's interval", o)
	}

	o = defaults()
	o.flagSet = func(string) bool { return false }
	o.applyLibvirtConfig(backend.LibvirtConfig{})
	if o.libvirtURI != "" || o.requestDir != backend.DefaultRequestDir {
		t.Errorf("no table: %+v; want libvirt off and the default directory", o)
	}
}
