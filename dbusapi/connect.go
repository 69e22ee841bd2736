package dbusapi

import (
	"os"

	"github.com/godbus/dbus/v5"
)

// Connect connects to the bus at address, or to the system bus
// (DBUS_SYSTEM_BUS_ADDRESS, else the well-known socket) when address is
// empty. The daemon serves on that bus and the clients call it there.
func Connect(address string, opts ...dbus.ConnOption) (*dbus.Conn, error) {
	if address == "" {
		address = os.Getenv("DBUS_SYSTEM_BUS_ADDRESS")
	}
	if address == "" {
		return dbus.ConnectSystemBus(opts...)
	}
	return dbus.Connect(address, opts...)
}
