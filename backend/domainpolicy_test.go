package backend

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/volagent/volagent/internal/testutil"
	"github.com/volagent/volagent/qcow2"
)

// domainDisk is one <disk> of a test domain.
type domainDisk struct {
	typ, target, driverType, source string
	backingStore                    string // raw XML inside <disk>, e.g. "<backingStore/>"
}

func domainXMLFor(name string, disks ...domainDisk) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "<domain type='kvm'><name>%s</name><uuid>6b1f6a5e-0000-4000-8000-000000000001</uuid><devices>\n", name)
	for _, d := range disks {
		typ := d.typ
		if typ == "" {
			typ = "file"
		}
		attr := "file"
		if typ == "block" {
			attr = "dev"
		}
		fmt.Fprintf(&b, "<disk type='%s' device='disk'>", typ)
		if d.driverType != "" {
			fmt.Fprintf(&b, "<driver name='qemu' type='%s'/>", d.driverType)
		} else {
			b.WriteString("<driver name='qemu'/>")
		}
		fmt.Fprintf(&b, "<source %s='%s'/>%s<target dev='%s' bus='virtio'/></disk>\n", attr, d.source, d.backingStore, d.target)
	}
	b.WriteString("</devices></domain>\n")
	return []byte(b.String())
}

// dpImages is a directory of images made by qemu-img for the policy tests.
type dpImages struct {
	t       *testing.T
	root    string // the allowed backing root
	outside string // not allowed
}

func newDPImages(t *testing.T) *dpImages {
	t.Helper()
	testutil.RequireTool(t, "qemu-img")
	dir := t.TempDir()
	im := &dpImages{t: t, root: filepath.Join(dir, "images"), outside: filepath.Join(dir, "outside")}
	for _, d := range []string{im.root, im.outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return im
}

func (im *dpImages) raw(path string, content []byte) string {
	im.t.Helper()
	if err := os.WriteFile(path, content, 0o644); err != nil {
		im.t.Fatal(err)
	}
	if err := os.Truncate(path, 16<<20); err != nil {
		im.t.Fatal(err)
	}
	return path
}

// patchBackingFormatExtension turns the backing-format extension of a
// qemu-made qcow2 into an unknown extension qemu ignores, so the image
// records its backing file but no format (what old tools wrote).
func patchBackingFormatExtension(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var typ [4]byte
	binary.BigEndian.PutUint32(typ[:], qcow2.ExtBackingFormat)
	hdrLen := binary.BigEndian.Uint32(b[100:104])
	i := bytes.Index(b[hdrLen:4096], typ[:])
	if i < 0 {
		t.Fatalf("%s: no backing format extension in the header", path)
	}
	binary.BigEndian.PutUint32(b[int(hdrLen)+i:], 0x12345678)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out := testutil.QemuImg(t, "info", "-f", "qcow2", "-U", "--output=json", path)
	if bytes.Contains(out, []byte(`"backing-filename-format"`)) {
		t.Fatalf("qemu-img still sees a backing format after the patch: %s", out)
	}
}

// violationCodes lists the report's violation codes, a run of the same
// code once (one header can break a rule in several fields).
func violationCodes(r *DomainReport) []string {
	var codes []string
	for _, v := range r.Violations {
		if len(codes) == 0 || codes[len(codes)-1] != v.Code {
			codes = append(codes, v.Code)
		}
	}
	return codes
}

func hasCode(vs []DomainViolation, code string) bool {
	for _, v := range vs {
		if v.Code == code {
			return true
		}
	}
	return false
}

func TestDomainPolicy(t *testing.T) {
	im := newDPImages(t)
	base := im.raw(filepath.Join(im.root, "base.raw"), []byte("plain guest data"))
	overlay := filepath.Join(im.root, "overlay.qcow2")
	testutil.MakeQcow2(t, overlay, "", "", base, "raw")

	// A relative backing name through a symlinked directory.
	link := filepath.Join(im.root, "link")
	if err := os.Symlink(im.root, link); err != nil {
		t.Fatal(err)
	}
	relOverlay := filepath.Join(im.root, "rel.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", relOverlay)

	noFormat := filepath.Join(im.root, "noformat.qcow2")
	testutil.MakeQcow2(t, noFormat, "", "", base, "raw")
	patchBackingFormatExtension(t, noFormat)

	// The case libvirt 9.0 lets through: an overlay that records no backing
	// format, over a qcow2 with an external data file (no backing of its
	// own, so libvirt's probe accepts it).
	dataFileRaw := im.raw(filepath.Join(im.outside, "host-secret.raw"), []byte("host data"))
	withDataFile := filepath.Join(im.root, "datafile.qcow2")
	testutil.MakeQcow2(t, withDataFile, "data_file="+dataFileRaw+",data_file_raw=on", "16M", "", "")
	overDataFile := filepath.Join(im.root, "over-datafile.qcow2")
	testutil.MakeQcow2(t, overDataFile, "", "", withDataFile, "qcow2")
	probedDataFile := filepath.Join(im.root, "probed-datafile.qcow2")
	testutil.MakeQcow2(t, probedDataFile, "", "", withDataFile, "qcow2")
	patchBackingFormatExtension(t, probedDataFile)

	jsonBacking := filepath.Join(im.root, "json.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-F", "raw",
		"-b", `json:{"driver":"raw","file":{"driver":"file","filename":"`+dataFileRaw+`"}}`, jsonBacking, "16M")

	outsideBase := im.raw(filepath.Join(im.outside, "base.raw"), nil)
	outsideOverlay := filepath.Join(im.root, "outside-backing.qcow2")
	testutil.MakeQcow2(t, outsideOverlay, "", "", outsideBase, "raw")

	// A two-level chain: top -> overlay (qcow2) -> base (raw).
	top := filepath.Join(im.root, "top.qcow2")
	testutil.MakeQcow2(t, top, "", "", overlay, "qcow2")

	// A loop: a -> b -> a.
	loopA, loopB := filepath.Join(im.root, "a.qcow2"), filepath.Join(im.root, "b.qcow2")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", loopA, "16M")
	testutil.QemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-b", loopA, "-F", "qcow2", loopB, "16M")
	testutil.QemuImg(t, "rebase", "-q", "-f", "qcow2", "-u", "-b", loopB, "-F", "qcow2", loopA)

	// A raw disk whose content is a qcow2 header (what a guest can write).
	headerInRaw := filepath.Join(im.root, "guest-wrote-header.raw")
	qcowBytes, err := os.ReadFile(overlay)
	if err != nil {
		t.Fatal(err)
	}
	im.raw(headerInRaw, qcowBytes)

	opts := DomainPolicyOptions{AllowedRoots: []string{im.root}}

	cases := []struct {
		name     string
		disks    []domainDisk
		want     []string // violation codes, in order
		warnings []string
		chain    []string // formats of the first disk's chain
	}{
		{name: "good overlay", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: overlay}}, chain: []string{"qcow2", "raw"}},
		{name: "good raw", disks: []domainDisk{{target: "vda", driverType: "raw", source: base}}, chain: []string{"raw"}},
		{name: "relative backing via symlink", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: filepath.Join(link, "rel.qcow2")}}, chain: []string{"qcow2", "raw"}},
		{name: "two levels", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: top}}, chain: []string{"qcow2", "qcow2", "raw"}},
		{name: "no driver type", disks: []domainDisk{{target: "vda", source: overlay}}, want: []string{CodeDriverTypeMissing}},
		{name: "unsupported driver type", disks: []domainDisk{{target: "vda", driverType: "vmdk", source: overlay}}, want: []string{CodeDriverTypeUnsupported}},
		{name: "no backing format", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: noFormat}}, want: []string{"backing-format-missing"}},
		{name: "backing with data file", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: overDataFile}}, want: []string{"data-file"}},
		{name: "probed backing with data file", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: probedDataFile}}, want: []string{"backing-format-missing"}},
		{name: "data file on top", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: withDataFile}}, want: []string{"data-file"}},
		{name: "json backing", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: jsonBacking}}, want: []string{"backing-name"}},
		{name: "backing outside roots", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: outsideOverlay}}, want: []string{"not-allowed"}},
		{name: "qcow2 that is raw", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: base}}, want: []string{"not-qcow2"}},
		{name: "chain loop", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: loopA}}, want: []string{CodeChain}},
		{name: "missing source", disks: []domainDisk{{target: "vda", driverType: "qcow2", source: filepath.Join(im.root, "nope.qcow2")}}, want: []string{CodeSourceUnreadable}},
		{name: "header in raw", disks: []domainDisk{{target: "vda", driverType: "raw", source: headerInRaw}}, want: []string{CodeHeaderInRaw}, chain: []string{"raw"}},
		{
			name: "matching backingStore",
			disks: []domainDisk{{target: "vda", driverType: "qcow2", source: overlay,
				backingStore: "<backingStore type='file'><format type='raw'/><source file='" + base + "'/><backingStore/></backingStore>"}},
			chain: []string{"qcow2", "raw"},
		},
		{
			name: "matching backingStore through a symlink",
			disks: []domainDisk{{target: "vda", driverType: "qcow2", source: overlay,
				backingStore: "<backingStore type='file'><format type='raw'/><source file='" + filepath.Join(link, "base.raw") + "'/></backingStore>"}},
			chain: []string{"qcow2", "raw"},
		},
		{
			name: "backingStore with another path",
			disks: []domainDisk{{target: "vda", driverType: "qcow2", source: overlay,
				backingStore: "<backingStore type='file'><format type='raw'/><source file='" + outsideBase + "'/></backingStore>"}},
			want: []string{CodeBackingStoreMismatch},
		},
		{
			name: "backingStore with another format",
			disks: []domainDisk{{target: "vda", driverType: "qcow2", source: overlay,
				backingStore: "<backingStore type='file'><format type='qcow2'/><source file='" + base + "'/></backingStore>"}},
			want: []string{CodeBackingStoreMismatch},
		},
		{
			name: "backingStore without format",
			disks: []domainDisk{{target: "vda", driverType: "qcow2", source: overlay,
				backingStore: "<backingStore type='file'><source file='" + base + "'/></backingStore>"}},
			want: []string{CodeBackingStoreFormat},
		},
		{
			name:  "empty backingStore over a backing",
			disks: []domainDisk{{target: "vda", driverType: "qcow2", source: overlay, backingStore: "<backingStore/>"}},
			want:  []string{CodeBackingStoreMismatch},
		},
		{
			name: "backingStore longer than the chain",
			disks: []domainDisk{{target: "vda", driverType: "qcow2", source: overlay,
				backingStore: "<backingStore type='file'><format type='raw'/><source file='" + base + "'/><backingStore type='file'><format type='raw'/><source file='" + outsideBase + "'/></backingStore></backingStore>"}},
			want: []string{CodeBackingStoreMismatch},
		},
		{
			name: "every disk is judged",
			disks: []domainDisk{
				{target: "vda", driverType: "qcow2", source: overlay},
				{target: "vdb", source: base},
				{target: "vdc", driverType: "qcow2", source: noFormat},
			},
			want:  []string{CodeDriverTypeMissing, "backing-format-missing"},
			chain: []string{"qcow2", "raw"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := CheckDomain(domainXMLFor("dom1", tc.disks...), opts)
			if err != nil {
				t.Fatal(err)
			}
			if got := violationCodes(rep); strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("violations %q, want %q\n%+v", got, tc.want, rep.Violations)
			}
			if rep.Allowed() != (len(tc.want) == 0) {
				t.Errorf("Allowed() = %v with violations %q", rep.Allowed(), tc.want)
			}
			for _, w := range tc.warnings {
				if !hasCode(rep.Warnings, w) {
					t.Errorf("no warning %q in %+v", w, rep.Warnings)
				}
			}
			if len(tc.warnings) == 0 && len(rep.Warnings) > 0 {
				t.Errorf("unexpected warnings %+v", rep.Warnings)
			}
			if rep.Domain != "dom1" || len(rep.Disks) != len(tc.disks) {
				t.Fatalf("report names domain %q with %d disks", rep.Domain, len(rep.Disks))
			}
			if tc.chain != nil {
				var formats []string
				for _, l := range rep.Disks[0].Chain {
					formats = append(formats, l.Format)
				}
				if strings.Join(formats, ",") != strings.Join(tc.chain, ",") {
					t.Errorf("chain formats %q, want %q (%+v)", formats, tc.chain, rep.Disks[0].Chain)
				}
			}
			for _, line := range rep.Lines() {
				if !strings.Contains(line, `"dom1"`) || strings.Contains(line, "\n") {
					t.Errorf("report line %q", line)
				}
			}
		})
	}

	t.Run("header in raw allowed as a warning", func(t *testing.T) {
		rep, err := CheckDomain(domainXMLFor("d", domainDisk{target: "vda", driverType: "raw", source: headerInRaw}),
			DomainPolicyOptions{AllowedRoots: opts.AllowedRoots, AllowHeaderInRaw: true})
		if err != nil || !rep.Allowed() || !hasCode(rep.Warnings, CodeHeaderInRaw) {
			t.Fatalf("report %+v, %v", rep, err)
		}
	})

	t.Run("managed devices", func(t *testing.T) {
		xml := domainXMLFor("dom2",
			domainDisk{target: "vda", driverType: "qcow2", source: outsideOverlay},
			domainDisk{target: "vdb", driverType: "raw", source: base})
		// The overlay's backing outside the roots is allowed when it is a
		// managed volume; the disk itself is marked only if listed.
		rep, err := CheckDomain(xml, DomainPolicyOptions{AllowedRoots: []string{im.root}, ManagedDevices: []string{outsideBase, filepath.Join(link, "base.raw")}})
		if err != nil {
			t.Fatal(err)
		}
		if !rep.Allowed() || rep.Disks[0].Managed || !rep.Disks[1].Managed || !rep.UsesManagedVolumes() {
			t.Fatalf("report %+v", rep)
		}
	})

	t.Run("empty cdrom and network disks", func(t *testing.T) {
		xml := []byte(`<domain><name>d</name><devices>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/></disk>
<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='x'><host name='h'/></source><target dev='vdb'/></disk>
<disk type='network' device='disk'><source protocol='nbd' name='x'/><target dev='vdc'/></disk>
</devices></domain>`)
		rep, err := CheckDomain(xml, opts)
		if err != nil {
			t.Fatal(err)
		}
		if got := violationCodes(rep); strings.Join(got, ",") != CodeDriverTypeMissing || len(rep.Warnings) != 0 {
			t.Fatalf("violations %q warnings %+v", got, rep.Warnings)
		}
	})

	t.Run("network disks need an explicit chain", func(t *testing.T) {
		nbd := func(driver, backingStore string) []byte {
			return []byte(fmt.Sprintf(`<domain><name>d</name><devices><disk type='network' device='disk'>%s<source protocol='nbd' name='x'><host name='h'/></source>%s<target dev='vda'/></disk></devices></domain>`, driver, backingStore))
		}
		raw := "<backingStore type='file'><format type='raw'/><source file='/b.raw'/></backingStore>"
		for _, tc := range []struct {
			name, driver, bs, want string // want "" for allowed
		}{
			{"raw", "<driver type='raw'/>", "", ""},
			{"no format", "<driver name='qemu'/>", "", CodeDriverTypeMissing},
			{"qcow2 without backingStore", "<driver type='qcow2'/>", "", CodeNetworkChain},
			{"qcow2 ending at once", "<driver type='qcow2'/>", "<backingStore/>", ""},
			{"qcow2 over raw", "<driver type='qcow2'/>", raw, ""},
			{"qcow2 over qcow2 over raw", "<driver type='qcow2'/>", "<backingStore type='network'><format type='qcow2'/><source protocol='nbd' name='y'/>" + raw + "</backingStore>", ""},
			{"qcow2 over qcow2 left open", "<driver type='qcow2'/>", "<backingStore type='file'><format type='qcow2'/><source file='/m.qcow2'/></backingStore>", CodeNetworkChain},
			{"level without format", "<driver type='qcow2'/>", "<backingStore type='file'><source file='/b.raw'/><backingStore/></backingStore>", CodeBackingStoreFormat},
			{"level of another format", "<driver type='qcow2'/>", "<backingStore type='file'><format type='vmdk'/><source file='/b.vmdk'/><backingStore/></backingStore>", CodeDriverTypeUnsupported},
		} {
			rep, err := CheckDomain(nbd(tc.driver, tc.bs), opts)
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(violationCodes(rep), ","); got != tc.want {
				t.Errorf("%s: violations %q, want %q", tc.name, got, tc.want)
			}
		}
	})

	t.Run("volume disks", func(t *testing.T) {
		xml := func(format string) []byte {
			return []byte(fmt.Sprintf(`<domain><name>d</name><devices><disk type='volume' device='disk'><driver type='%s'/><source pool='p' volume='v'/><target dev='vda'/></disk></devices></domain>`, format))
		}
		// Without a resolver (the hook alone) the disk cannot be checked.
		rep, err := CheckDomain(xml("qcow2"), opts)
		if err != nil || strings.Join(violationCodes(rep), ",") != CodeVolumeUnresolved {
			t.Fatalf("no resolver: %+v, %v", rep, err)
		}
		withResolver := opts
		withResolver.ResolveVolume = func(pool, volume string) (string, error) {
			if pool != "p" || volume != "v" {
				return "", fmt.Errorf("no volume %s/%s", pool, volume)
			}
			return overlay, nil
		}
		rep, err = CheckDomain(xml("qcow2"), withResolver)
		if err != nil || !rep.Allowed() || len(rep.Disks[0].Chain) != 2 || rep.Disks[0].Source != overlay {
			t.Fatalf("resolved good volume: %+v, %v", rep, err)
		}
		// The resolved path is judged as a file disk is.
		rep, err = CheckDomain(xml("raw"), withResolver)
		if err != nil || strings.Join(violationCodes(rep), ",") != CodeHeaderInRaw {
			t.Fatalf("resolved volume read as raw: %+v, %v", rep, err)
		}
		withResolver.ResolveVolume = func(string, string) (string, error) { return "", errors.New("libvirt is down") }
		rep, err = CheckDomain(xml("qcow2"), withResolver)
		if err != nil || strings.Join(violationCodes(rep), ",") != CodeVolumeUnresolved {
			t.Fatalf("resolver failing: %+v, %v", rep, err)
		}
	})

	t.Run("cdrom and floppy are checked as disks", func(t *testing.T) {
		for _, device := range []string{"cdrom", "floppy"} {
			xml := []byte(fmt.Sprintf(`<domain><name>d</name><devices><disk type='file' device='%s'><driver type='raw'/><source file='%s'/><target dev='x'/></disk></devices></domain>`, device, headerInRaw))
			rep, err := CheckDomain(xml, opts)
			if err != nil || strings.Join(violationCodes(rep), ",") != CodeHeaderInRaw {
				t.Errorf("%s with a header in raw: %+v, %v", device, rep, err)
			}
		}
	})

	t.Run("DomainDisks", func(t *testing.T) {
		xml := []byte(`<domain><name>d</name><devices>
<disk type='block' device='disk'><driver type='qcow2'/><source dev='/dev/loop9'/><backingStore type='file'><format type='raw'/><source file='/i/b.raw'/><backingStore/></backingStore><target dev='vda'/></disk>
<disk type='volume' device='cdrom'><driver type='raw'/><source pool='p' volume='v'/><target dev='hdc'/></disk>
</devices></domain>`)
		name, disks, err := DomainDisks(xml)
		if err != nil || name != "d" || len(disks) != 2 {
			t.Fatalf("%q %+v %v", name, disks, err)
		}
		if d := disks[0]; d.Path != "/dev/loop9" || d.Target != "vda" || d.Format != "qcow2" || strings.Join(d.Backing, ",") != "/i/b.raw" {
			t.Errorf("disk 0: %+v", d)
		}
		if d := disks[1]; d.Type != "volume" || d.Device != "cdrom" || d.Pool != "p" || d.Volume != "v" || d.Path != "" {
			t.Errorf("disk 1: %+v", d)
		}
	})

	t.Run("bad XML", func(t *testing.T) {
		for _, bad := range []string{"", "<domain><name>x</name>", "not xml"} {
			if _, err := CheckDomain([]byte(bad), opts); !errors.Is(err, ErrInvalidArgument) {
				t.Errorf("CheckDomain(%q): %v, want ErrInvalidArgument", bad, err)
			}
		}
	})

	t.Run("ParseDomainDisks", func(t *testing.T) {
		name, sources, err := ParseDomainDisks(domainXMLFor("dom3",
			domainDisk{target: "vda", driverType: "qcow2", source: overlay},
			domainDisk{typ: "block", target: "vdb", driverType: "raw", source: "/dev/loop7"}))
		if err != nil || name != "dom3" || strings.Join(sources, ",") != overlay+",/dev/loop7" {
			t.Fatalf("ParseDomainDisks = %q, %q, %v", name, sources, err)
		}
	})
}

func TestDomainConfigManagesPath(t *testing.T) {
	dir := t.TempDir()
	cfg := &Config{Pools: []PoolConfig{
		{Name: "vms", Type: PoolLVM, VolumeGroup: "vg-a", Activation: "device-mapper"},
		{Name: "files", Type: PoolLoop, Directory: filepath.Join(dir, "pool")},
	}}
	for path, want := range map[string]string{
		"/dev/vg-a/vm1":                      "vms",
		"/dev/mapper/vg--a-vm1":              "vms",
		"/dev/mapper/vg--a--b-vm1":           "",
		"/dev/vg-b/vm1":                      "",
		filepath.Join(dir, "pool", "x.img"):  "files",
		filepath.Join(dir, "other", "x.img"): "",
		"/var/lib/libvirt/images/a.qcow2":    "",
	} {
		got, ok := ConfigManagesPath(cfg, path)
		if got != want || ok != (want != "") {
			t.Errorf("ConfigManagesPath(%q) = %q, %v; want %q", path, got, ok, want)
		}
	}
}

// TestDomainManagerCheck runs the daemon side over a real loop pool: a
// domain on a volagent overlay is allowed and marked managed; a bad one is
// refused in enforce mode and allowed, but signalled, in audit mode.
func TestDomainManagerCheck(t *testing.T) {
	for _, policy := range []PolicyMode{PolicyEnforce, PolicyAudit} {
		t.Run(string(policy), func(t *testing.T) {
			e := newEnv(t, PoolLoop, policy)
			m := e.manager()
			ctx := context.Background()
			base := filepath.Join(e.roots, "base.raw")
			writeFile(t, base, 16<<20, map[int64][]byte{0: []byte("base")})
			vol, err := m.CreateOverlay(ctx, Caller{}, OverlayRequest{Pool: "p", Name: "vm1", BackingPath: base, BackingFormat: "raw"})
			if err != nil {
				t.Fatal(err)
			}
			events, cancel := m.Subscribe()
			defer cancel()

			good := domainXMLFor("good", domainDisk{typ: "block", target: "vda", driverType: "qcow2", source: vol.DevicePath})
			allowed, rep, err := m.CheckDomain(ctx, good)
			if err != nil || !allowed || !rep.Allowed() || !rep.UsesManagedVolumes() {
				t.Fatalf("CheckDomain(good) = %v, %+v, %v", allowed, rep, err)
			}
			if len(rep.Disks[0].Chain) != 2 || rep.Disks[0].Chain[1].Format != "raw" {
				t.Fatalf("chain %+v", rep.Disks[0].Chain)
			}

			bad := domainXMLFor("bad", domainDisk{typ: "block", target: "vda", source: vol.DevicePath})
			allowed, rep, err = m.CheckDomain(ctx, bad)
			if err != nil || rep.Allowed() || allowed != (policy == PolicyAudit) {
				t.Fatalf("CheckDomain(bad) in %s mode = %v, %+v, %v", policy, allowed, rep, err)
			}
			select {
			case ev := <-events:
				if ev.Kind != EventPolicyViolation || ev.Violation.Code != CodeDriverTypeMissing || !strings.Contains(ev.Violation.Subject, "bad") {
					t.Fatalf("event %+v", ev)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no PolicyViolation event")
			}
		})
	}
}

// DomainDiskLayers: a disk's layers are the chain the policy read when
// its report has one, else the XML's source and <backingStore> levels; a
// network disk has none.
func TestDomainDiskLayers(t *testing.T) {
	xml := []byte(`<domain type='kvm'><name>d</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/a.qcow2'/><target dev='vda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/b.qcow2'/>
  <backingStore type='file'><format type='raw'/><source file='/img/b-base.raw'/></backingStore><target dev='vdb'/></disk>
<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='x'><host name='h'/></source><target dev='vdc'/></disk>
</devices></domain>`)
	rep := &DomainReport{Disks: []DiskReport{{Target: "vda", Chain: []ChainLink{{Path: "/img/a.qcow2"}, {Path: "/img/a-base.raw"}}}}}
	disks, err := DomainDiskLayers(xml, rep)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{}
	for _, d := range disks {
		got[d.Target] = d.Layers
	}
	want := map[string][]string{
		"vda": {"/img/a.qcow2", "/img/a-base.raw"}, // the report's chain
		"vdb": {"/img/b.qcow2", "/img/b-base.raw"}, // the XML's
		"vdc": nil,
	}
	if len(got) != len(want) {
		t.Fatalf("disks %v, want %v", got, want)
	}
	for target, w := range want {
		if fmt.Sprint(got[target]) != fmt.Sprint(w) {
			t.Errorf("%s: layers %q, want %q", target, got[target], w)
		}
	}
}
