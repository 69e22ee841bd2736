package dbusapi

import (
	"context"
	"fmt"
	"os/user"
	"slices"
	"strconv"

	"github.com/godbus/dbus/v5"

	"github.com/volagent/volagent/backend"
)

// ManageAction is the polkit action that guards every mutating method.
const ManageAction = "org.volagent.VolAgent1.manage"

// DefaultAdminGroup is the group whose members may call mutating methods
// when polkitd does not run.
const DefaultAdminGroup = "volagent"

const polkitBusName = "org.freedesktop.PolicyKit1"

// Authorizer decides whether the sender of a call may change state. It
// returns the caller's identity when it may, and an error (NotAuthorized,
// or Failed when the decision itself failed) when it may not.
type Authorizer interface {
	Authorize(ctx context.Context, conn *dbus.Conn, sender string, interactive bool) (backend.Caller, *dbus.Error)
}

// UnixAuthorizer allows UID 0 and members of Group; where polkitd owns its
// bus name, it asks polkit about ManageAction instead of looking at the
// group, so that administrators configure access in one place.
type UnixAuthorizer struct {
	Group string // "" means DefaultAdminGroup
}

// Authorize implements Authorizer.
func (a UnixAuthorizer) Authorize(ctx context.Context, conn *dbus.Conn, sender string, interactive bool) (backend.Caller, *dbus.Error) {
	uid, err := callerUID(ctx, conn, sender)
	if err != nil {
		return backend.Caller{}, failed("cannot identify the caller %s: %v", sender, err)
	}
	caller := backend.Caller{UID: uid}
	if uid == 0 {
		return caller, nil
	}
	if polkitRuns(ctx, conn) {
		ok, err := polkitAllows(ctx, conn, sender, interactive)
		if err != nil {
			return caller, failed("asking polkit whether UID %d may use %s: %v", uid, ManageAction, err)
		}
		if !ok {
			return caller, notAuthorized("UID %d is not authorized for %s (polkit said no)", uid, ManageAction)
		}
		return caller, nil
	}
	group := a.Group
	if group == "" {
		group = DefaultAdminGroup
	}
	member, err := inGroup(uid, group)
	if err != nil {
		return caller, notAuthorized("UID %d may not change volumes: only root and members of group %q may (%v)", uid, group, err)
	}
	if !member {
		return caller, notAuthorized("UID %d may not change volumes: only root and members of group %q may", uid, group)
	}
	return caller, nil
}

// callerUID asks the bus for the Unix user of a connection.
func callerUID(ctx context.Context, conn *dbus.Conn, sender string) (uint32, error) {
	var uid uint32
	err := conn.BusObject().CallWithContext(ctx, "org.freedesktop.DBus.GetConnectionUnixUser", 0, sender).Store(&uid)
	return uid, err
}

func polkitRuns(ctx context.Context, conn *dbus.Conn) bool {
	var has bool
	err := conn.BusObject().CallWithContext(ctx, "org.freedesktop.DBus.NameHasOwner", 0, polkitBusName).Store(&has)
	return err == nil && has
}

// polkitSubject is polkit's (sa{sv}) subject.
type polkitSubject struct {
	Kind    string
	Details map[string]dbus.Variant
}

// polkitResult is polkit's (bba{ss}) authorization result.
type polkitResult struct {
	IsAuthorized bool
	IsChallenge  bool
	Details      map[string]string
}

// polkitAllows asks polkit CheckAuthorization for ManageAction on behalf of
// the bus name sender (polkit looks up the process itself; the name cannot
// be forged on the bus).
func polkitAllows(ctx context.Context, conn *dbus.Conn, sender string, interactive bool) (bool, error) {
	subject := polkitSubject{Kind: "system-bus-name", Details: map[string]dbus.Variant{"name": dbus.MakeVariant(sender)}}
	var flags uint32
	if interactive {
		flags = 1 // AllowUserInteraction
	}
	var res polkitResult
	obj := conn.Object(polkitBusName, "/org/freedesktop/PolicyKit1/Authority")
	err := obj.CallWithContext(ctx, "org.freedesktop.PolicyKit1.Authority.CheckAuthorization", 0,
		subject, ManageAction, map[string]string{}, flags, "").Store(&res)
	if err != nil {
		return false, err
	}
	return res.IsAuthorized, nil
}

// inGroup reports whether uid is a member (primary or supplementary) of
// the named group, from the system's user and group databases.
func inGroup(uid uint32, group string) (bool, error) {
	g, err := user.LookupGroup(group)
	if err != nil {
		return false, fmt.Errorf("group %q: %w", group, err)
	}
	u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10))
	if err != nil {
		return false, fmt.Errorf("UID %d: %w", uid, err)
	}
	if u.Gid == g.Gid {
		return true, nil
	}
	gids, err := u.GroupIds()
	if err != nil {
		return false, fmt.Errorf("groups of UID %d: %w", uid, err)
	}
	return slices.Contains(gids, g.Gid), nil
}
