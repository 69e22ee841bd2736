package virt

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"libvirt.org/go/libvirt"

	"github.com/volagent/volagent/backend"
)

// DomainChecker judges a domain's XML; *backend.Manager is one (its
// CheckDomain also logs and signals each violation as PolicyViolation).
type DomainChecker interface {
	CheckDomain(ctx context.Context, domainXML []byte) (allowed bool, report *backend.DomainReport, err error)
}

// CheckerFunc adapts a function to DomainChecker.
type CheckerFunc func(ctx context.Context, domainXML []byte) (bool, *backend.DomainReport, error)

// CheckDomain calls f.
func (f CheckerFunc) CheckDomain(ctx context.Context, domainXML []byte) (bool, *backend.DomainReport, error) {
	return f(ctx, domainXML)
}

// Auditor re-checks running domains against the policy: every running
// domain after each (re)connection, a domain when it starts or resumes,
// and a domain when a device is hot-plugged into it or a removable disk's
// medium changes (neither passes a hook). It reports; with
// PauseOnViolation it also pauses a running domain that gained a disk
// the checker refuses (enforce mode).
type Auditor struct {
	checker  DomainChecker
	log      *slog.Logger
	onReport func(domain string, report *backend.DomainReport)

	mu     sync.Mutex
	conn   *Conn
	pause  bool
	signal func(subject, code, message string)
}

// CodeDomainPaused is the PolicyViolation code of a domain the Auditor
// paused.
const CodeDomainPaused = "domain-paused"

// PauseOnViolation makes the Auditor pause a running domain that gains a
// disk (hot-plug, media change) the checker does not allow, and send
// signal(subject, CodeDomainPaused, message). Without it such a domain is
// only reported. Call it before Bind.
func (a *Auditor) PauseOnViolation(signal func(subject, code, message string)) {
	a.mu.Lock()
	a.pause, a.signal = true, signal
	a.mu.Unlock()
}

// NewAuditor makes an Auditor. onReport (optional) gets every report,
// violations or not; log (optional) gets each violation.
func NewAuditor(checker DomainChecker, log *slog.Logger, onReport func(domain string, report *backend.DomainReport)) *Auditor {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Auditor{checker: checker, log: log, onReport: onReport}
}

// Handlers returns h with the Auditor's handlers added (chained after
// any h already has), for Dial. Call Bind with the Conn Dial returns.
func (a *Auditor) Handlers(h Handlers) Handlers {
	connected, lifecycle, added, media := h.Connected, h.DomainLifecycle, h.DeviceAdded, h.MediaChanged
	h.Connected = func(conn *libvirt.Connect, gen uint64) {
		if connected != nil {
			connected(conn, gen)
		}
		a.auditAll(conn)
	}
	h.DomainLifecycle = func(domain string, event libvirt.DomainEventType, detail int) {
		if lifecycle != nil {
			lifecycle(domain, event, detail)
		}
		if event == libvirt.DOMAIN_EVENT_STARTED || event == libvirt.DOMAIN_EVENT_RESUMED {
			a.auditByName(domain)
		}
	}
	h.DeviceAdded = func(domain, alias string) {
		if added != nil {
			added(domain, alias)
		}
		a.auditGained(domain, "device "+alias+" was hot-plugged")
	}
	h.MediaChanged = func(domain, alias string) {
		if media != nil {
			media(domain, alias)
		}
		a.auditGained(domain, "the medium of "+alias+" changed")
	}
	return h
}

// auditGained re-checks a domain that gained a disk without a hook, and
// pauses it when it is running, refused, and PauseOnViolation is set.
func (a *Auditor) auditGained(name, what string) {
	a.mu.Lock()
	c, pause, signal := a.conn, a.pause, a.signal
	a.mu.Unlock()
	if c == nil {
		return
	}
	err := c.Do(func(conn *libvirt.Connect) error {
		dom, err := conn.LookupDomainByName(name)
		if err != nil {
			return fmt.Errorf("domain %q: %w", name, err)
		}
		defer dom.Free()
		allowed, rep, err := a.audit(dom)
		if err != nil || allowed || !pause {
			return err
		}
		if state, _, err := dom.GetState(); err != nil || state != libvirt.DOMAIN_RUNNING {
			return err
		}
		if err := dom.Suspend(); err != nil {
			return fmt.Errorf("domain %q: pausing it after %s: %w", name, what, err)
		}
		msg := fmt.Sprintf("domain %s paused: %s and it breaks the no-probing policy (%d violation(s)); remove the disk or fix it, then virsh resume", name, what, len(rep.Violations))
		a.log.Warn("running domain paused", "domain", name, "reason", what, "violations", len(rep.Violations))
		if signal != nil {
			signal("domain "+name, CodeDomainPaused, msg)
		}
		return nil
	})
	if err != nil {
		a.log.Warn("auditing a domain failed", "domain", name, "err", err)
	}
}

// Bind tells the Auditor which connection to look domains up on.
func (a *Auditor) Bind(c *Conn) {
	a.mu.Lock()
	a.conn = c
	a.mu.Unlock()
}

// AuditDomain checks one running domain now.
func (a *Auditor) AuditDomain(name string) (*backend.DomainReport, error) {
	a.mu.Lock()
	c := a.conn
	a.mu.Unlock()
	if c == nil {
		return nil, ErrDisconnected
	}
	var rep *backend.DomainReport
	err := c.Do(func(conn *libvirt.Connect) error {
		dom, err := conn.LookupDomainByName(name)
		if err != nil {
			return fmt.Errorf("domain %q: %w", name, err)
		}
		defer dom.Free()
		_, rep, err = a.audit(dom)
		return err
	})
	return rep, err
}

func (a *Auditor) auditByName(name string) {
	if _, err := a.AuditDomain(name); err != nil {
		a.log.Warn("auditing a domain failed", "domain", name, "err", err)
	}
}

// auditAll checks every running domain: events during an outage are lost.
func (a *Auditor) auditAll(conn *libvirt.Connect) {
	doms, err := conn.ListAllDomains(libvirt.CONNECT_LIST_DOMAINS_ACTIVE)
	if err != nil {
		a.log.Warn("listing running domains failed", "err", err)
		return
	}
	for i := range doms {
		if _, _, err := a.audit(&doms[i]); err != nil {
			a.log.Warn("auditing a domain failed", "err", err)
		}
		doms[i].Free()
	}
}

// audit checks the domain's live XML (with the backing chains libvirt
// detected, so they are compared with the headers too).
func (a *Auditor) audit(dom *libvirt.Domain) (allowed bool, rep *backend.DomainReport, err error) {
	name, err := dom.GetName()
	if err != nil {
		return false, nil, err
	}
	xml, err := dom.GetXMLDesc(0)
	if err != nil {
		return false, nil, fmt.Errorf("domain %q: XML: %w", name, err)
	}
	allowed, rep, err = a.checker.CheckDomain(context.Background(), []byte(xml))
	if err != nil {
		return false, nil, fmt.Errorf("domain %q: %w", name, err)
	}
	for _, v := range rep.Violations {
		a.log.Warn("running domain breaks the no-probing policy", "domain", name, "disk", v.Disk, "image", v.Image, "code", v.Code, "violation", v.Message)
	}
	if a.onReport != nil {
		a.onReport(name, rep)
	}
	return allowed, rep, nil
}
