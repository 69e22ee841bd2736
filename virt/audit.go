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
// and a domain when a device is hot-plugged into it (which passes no
// hook). It reports; stopping a running domain is not its business.
type Auditor struct {
	checker  DomainChecker
	log      *slog.Logger
	onReport func(domain string, report *backend.DomainReport)

	mu   sync.Mutex
	conn *Conn
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
	connected, lifecycle, added := h.Connected, h.DomainLifecycle, h.DeviceAdded
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
		a.auditByName(domain)
	}
	return h
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
		rep, err = a.audit(dom)
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
		if _, err := a.audit(&doms[i]); err != nil {
			a.log.Warn("auditing a domain failed", "err", err)
		}
		doms[i].Free()
	}
}

// audit checks the domain's live XML (with the backing chains libvirt
// detected, so they are compared with the headers too).
func (a *Auditor) audit(dom *libvirt.Domain) (*backend.DomainReport, error) {
	name, err := dom.GetName()
	if err != nil {
		return nil, err
	}
	xml, err := dom.GetXMLDesc(0)
	if err != nil {
		return nil, fmt.Errorf("domain %q: XML: %w", name, err)
	}
	_, rep, err := a.checker.CheckDomain(context.Background(), []byte(xml))
	if err != nil {
		return nil, fmt.Errorf("domain %q: %w", name, err)
	}
	for _, v := range rep.Violations {
		a.log.Warn("running domain breaks the no-probing policy", "domain", name, "disk", v.Disk, "image", v.Image, "code", v.Code, "violation", v.Message)
	}
	if a.onReport != nil {
		a.onReport(name, rep)
	}
	return rep, nil
}
