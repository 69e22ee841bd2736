import { useEffect, useState } from "react";
import {
    ActionGroup, Alert, Button, Card, CardBody, CardTitle, Content, DescriptionList,
    DescriptionListDescription, DescriptionListGroup, DescriptionListTerm, EmptyState, EmptyStateBody,
    Flex, FlexItem, Form, FormGroup, FormSelect, FormSelectOption, Gallery, Label, List, ListItem,
    Modal, ModalBody, ModalFooter, ModalHeader, PageSection, Progress, ProgressMeasureLocation,
    Radio, SearchInput, Spinner, Tab, TabTitleText, Tabs, TextInput, Title, Toolbar, ToolbarContent, ToolbarItem,
} from "@patternfly/react-core";
import { Table, Tbody, Td, Th, Thead, Tr } from "@patternfly/react-table";

import { errorText, inspect } from "./volagent.js";
import { buildChain, findVolume } from "./chain.js";
import { bytes, rate, SIZE_UNITS, time } from "./format.js";

function useStore(store) {
    const [, setTick] = useState(0);
    useEffect(() => store.subscribe(() => setTick(t => t + 1)), [store]);
    return store;
}

// ErrorAlert shows an error in full: the daemon's (or bus's) error name and message.
function ErrorAlert({ title, error }) {
    if (!error)
        return null;
    return (
        <Alert variant="danger" isInline title={title} role="alert" data-testid="error">
            <pre className="volagent-error">{error}</pre>
        </Alert>
    );
}

export function App({ store }) {
    useStore(store);
    const [tab, setTab] = useState("pools");
    const [selected, setSelected] = useState(null); // volume path
    const [dialog, setDialog] = useState(null);

    const open = path => { setSelected(path); setTab("volumes") };
    const closeDialog = () => setDialog(null);

    return (
        <div className="volagent-page">
            <PageSection>
                <Flex justifyContent={{ default: "justifyContentSpaceBetween" }} alignItems={{ default: "alignItemsCenter" }}>
                    <FlexItem>
                        <Title headingLevel="h1">volagent</Title>
                        <Content component="small">
                            qcow2 overlays on host block devices; formats never probed
                            {store.version ? ` (daemon ${store.version})` : ""}
                        </Content>
                    </FlexItem>
                    <FlexItem>
                        <Button variant="primary" onClick={() => setDialog({ kind: "create" })}>Create overlay</Button>
                    </FlexItem>
                </Flex>
                {store.problem && <Alert variant="danger" isInline title="Cannot reach volagent" data-testid="connection-error">{store.problem}</Alert>}
            </PageSection>
            <PageSection>
                <Tabs activeKey={tab} onSelect={(_e, k) => { setTab(k); if (k !== "volumes") setSelected(null) }}
                      aria-label="volagent views" mountOnEnter>
                    <Tab eventKey="pools" title={<TabTitleText>Pools</TabTitleText>}>
                        <Pools store={store} />
                    </Tab>
                    <Tab eventKey="volumes" title={<TabTitleText>Volumes</TabTitleText>}>
                        {selected && store.volumes[selected]
                            ? <VolumeDetail store={store} volume={store.volumes[selected]} onBack={() => setSelected(null)}
                                            onAction={setDialog} />
                            : <Volumes store={store} onOpen={open} onAction={setDialog} />}
                    </Tab>
                    <Tab eventKey="jobs" title={<TabTitleText>Jobs</TabTitleText>}>
                        <Jobs store={store} />
                    </Tab>
                    <Tab eventKey="policy" title={<TabTitleText>Policy</TabTitleText>}>
                        <PolicyFeed store={store} />
                    </Tab>
                    <Tab eventKey="inspect" title={<TabTitleText>Inspect</TabTitleText>}>
                        <InspectPath />
                    </Tab>
                </Tabs>
            </PageSection>
            {dialog && dialog.kind === "create" &&
                <CreateOverlayDialog store={store} onClose={closeDialog} onCreated={path => { closeDialog(); open(path) }} />}
            {dialog && dialog.kind === "resize" &&
                <ResizeDialog store={store} volume={dialog.volume} onClose={closeDialog} />}
            {dialog && dialog.kind === "delete" &&
                <DeleteDialog store={store} volume={dialog.volume}
                              onClose={closeDialog} onDeleted={() => { closeDialog(); setSelected(null) }} />}
        </div>
    );
}

function Loading({ store, what }) {
    if (store.loaded)
        return <EmptyState titleText={`No ${what}`} headingLevel="h3"><EmptyStateBody>volagent reports none.</EmptyStateBody></EmptyState>;
    return <Spinner aria-label={`Loading ${what}`} />;
}

// Pools: capacity and free space as bars, policy mode, low-space warnings.
function Pools({ store }) {
    const pools = Object.values(store.pools).sort((a, b) => a.Name.localeCompare(b.Name));
    if (pools.length === 0)
        return <Loading store={store} what="pools" />;
    return (
        <>
            {store.spaceLowEvents.slice(0, 3).map(e =>
                <Alert key={e.id} variant="warning" isInline title={`Pool ${store.poolName(e.path)}: space low (${time(e.time)})`}>
                    {(e.args || []).map(String).join(" ")}
                </Alert>)}
            <Gallery hasGutter minWidths={{ default: "100%", md: "420px" }}>
                {pools.map(p => {
                    const used = Math.max(0, (p.Capacity || 0) - (p.Free || 0));
                    const pct = p.Capacity ? (100 * used) / p.Capacity : 0;
                    return (
                        <Card key={p.path} data-testid="pool" data-pool={p.Name} component="section" aria-label={`Pool ${p.Name}`}>
                            <CardTitle>
                                <Title headingLevel="h2" size="lg">{p.Name}</Title>{" "}
                                <Label>{p.Type}</Label>{" "}
                                <Label color={p.PolicyMode === "enforce" ? "green" : "orange"} data-testid="policy-mode">
                                    policy: {p.PolicyMode}
                                </Label>{" "}
                                {p.Shared === true && <Label color="blue">shared</Label>}
                            </CardTitle>
                            <CardBody>
                                {p.SpaceLow === true &&
                                    <Alert variant="warning" isInline title="Free space is low" data-testid="space-low">
                                        {bytes(p.Free)} free
                                        {p.SpaceNeeded !== undefined ? `; ${bytes(p.SpaceNeeded)} needed to keep volumes growing` : ""}.
                                        Add space to the pool or delete volumes.
                                    </Alert>}
                                <Content component="small">Used</Content>
                                <Progress value={pct} aria-label={`Space used in pool ${p.Name}`}
                                          measureLocation={ProgressMeasureLocation.outside}
                                          variant={p.SpaceLow === true ? "warning" : undefined}
                                          label={`${bytes(used)} of ${bytes(p.Capacity)}`} />
                                <Content component="small">Free</Content>
                                <Progress value={p.Capacity ? (100 * (p.Free || 0)) / p.Capacity : 0}
                                          aria-label={`Free space in pool ${p.Name}`}
                                          measureLocation={ProgressMeasureLocation.outside}
                                          label={`${bytes(p.Free)} free`} />
                            </CardBody>
                        </Card>
                    );
                })}
            </Gallery>
        </>
    );
}

// usersOf: what uses a volume, as far as volagent tells: overlays backed
// by it, its jobs, the host it is active on.
function usersOf(store, volume) {
    const users = [];
    for (const v of Object.values(store.volumes)) {
        if (v.path !== volume.path && v.BackingName && findVolume(store.volumes, v.BackingName)?.path === volume.path)
            users.push(`overlay ${v.Name} (pool ${store.poolName(v.Pool)})`);
    }
    for (const j of Object.values(store.jobs)) {
        if (j.Volume === volume.path && j.State === "running")
            users.push(`job ${j.path.split("/").pop()} (${j.Operation}, running)`);
    }
    // "local" is every volume of an unshared pool: only another host's
    // activation is a user.
    if (volume.ActiveOn && volume.ActiveOn !== "local")
        users.push(`active on host ${volume.ActiveOn}`);
    return users;
}

const COLUMNS = [
    { key: "Name", label: "Name" },
    { key: "pool", label: "Pool" },
    { key: "Role", label: "Role" },
    { key: "VirtualSize", label: "Virtual size" },
    { key: "HighestAllocated", label: "Allocated" },
    { key: "DevicePath", label: "Device" },
    { key: "Problem", label: "Problem" },
];

function Volumes({ store, onOpen, onAction }) {
    const [filter, setFilter] = useState("");
    const [sortIndex, setSortIndex] = useState(0);
    const [direction, setDirection] = useState("asc");
    // Where a volume is active says something only on a shared pool.
    const hasActiveOn = Object.values(store.pools).some(p => p.Shared);

    const f = filter.toLowerCase();
    const rows = Object.values(store.volumes).map(v => ({ ...v, pool: store.poolName(v.Pool) }))
            .filter(v => !f || [v.Name, v.pool, v.Role, v.DevicePath, v.Problem, v.ActiveOn]
                    .some(s => (s || "").toLowerCase().includes(f)));
    const key = COLUMNS[sortIndex].key;
    rows.sort((a, b) => {
        const x = a[key] ?? "";
        const y = b[key] ?? "";
        const c = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
        return direction === "asc" ? c : -c;
    });

    const sort = i => ({
        sortBy: { index: sortIndex, direction },
        onSort: (_e, index, dir) => { setSortIndex(index); setDirection(dir) },
        columnIndex: i,
    });

    return (
        <>
            <Toolbar>
                <ToolbarContent>
                    <ToolbarItem>
                        <SearchInput aria-label="Filter volumes" placeholder="Filter by name, pool, device, problem"
                                     value={filter} onChange={(_e, v) => setFilter(v)} onClear={() => setFilter("")} />
                    </ToolbarItem>
                    <ToolbarItem>
                        <Content component="small" aria-live="polite">{rows.length} of {Object.keys(store.volumes).length} volumes</Content>
                    </ToolbarItem>
                </ToolbarContent>
            </Toolbar>
            {Object.keys(store.volumes).length === 0
                ? <Loading store={store} what="volumes" />
                : (
                    <Table aria-label="Volumes" variant="compact" gridBreakPoint="grid-lg" data-testid="volumes">
                        <Thead>
                            <Tr>
                                {COLUMNS.map((c, i) => <Th key={c.key} sort={sort(i)}>{c.label}</Th>)}
                                {hasActiveOn && <Th>Active on</Th>}
                                <Th screenReaderText="Actions" />
                            </Tr>
                        </Thead>
                        <Tbody>
                            {rows.map(v => (
                                <Tr key={v.path} data-testid="volume-row" data-volume={v.Name}>
                                    <Td dataLabel="Name">
                                        <Button variant="link" isInline onClick={() => onOpen(v.path)}
                                                aria-label={`Show volume ${v.Name}`}>{v.Name}</Button>
                                    </Td>
                                    <Td dataLabel="Pool">{v.pool}</Td>
                                    <Td dataLabel="Role">{v.Role}</Td>
                                    <Td dataLabel="Virtual size">{bytes(v.VirtualSize)}</Td>
                                    <Td dataLabel="Allocated">{bytes(v.HighestAllocated)}</Td>
                                    <Td dataLabel="Device"><code>{v.DevicePath}</code></Td>
                                    <Td dataLabel="Problem">{v.Problem ? <Label color="red">{v.Problem}</Label> : ""}</Td>
                                    {hasActiveOn && <Td dataLabel="Active on">{v.ActiveOn}</Td>}
                                    <Td>
                                        <VolumeActions volume={v} onAction={onAction} />
                                    </Td>
                                </Tr>
                            ))}
                        </Tbody>
                    </Table>)}
        </>
    );
}

function VolumeActions({ volume, onAction }) {
    return (
        <Flex spaceItems={{ default: "spaceItemsSm" }} flexWrap={{ default: "nowrap" }}>
            <Button variant="secondary" size="sm" aria-label={`Resize volume ${volume.Name}`}
                    onClick={() => onAction({ kind: "resize", volume })}>Resize</Button>
            <Button variant="danger" size="sm" aria-label={`Delete volume ${volume.Name}`}
                    onClick={() => onAction({ kind: "delete", volume })}>Delete</Button>
        </Flex>
    );
}

function VolumeDetail({ store, volume, onBack, onAction }) {
    return (
        <>
            <Flex justifyContent={{ default: "justifyContentSpaceBetween" }} className="volagent-detail-head">
                <Button variant="link" onClick={onBack}>← All volumes</Button>
                <VolumeActions volume={volume} onAction={onAction} />
            </Flex>
            <Title headingLevel="h2" data-testid="volume-title" data-path={volume.path}>Volume {volume.Name}</Title>
            {volume.Problem && <Alert variant="danger" isInline title="volagent will not use this volume">{volume.Problem}</Alert>}
            <DescriptionList isHorizontal isCompact columnModifier={{ default: "1Col", lg: "2Col" }}>
                {[["Pool", store.poolName(volume.Pool)], ["Role", volume.Role], ["Format", volume.Format],
                    ["Device", volume.DevicePath], ["Virtual size", bytes(volume.VirtualSize)],
                    ["Allocated", bytes(volume.HighestAllocated)], ["Device size", bytes(volume.DeviceSize)],
                    ["Id", volume.Id], ...(store.pools[volume.Pool]?.Shared ? [["Active on", volume.ActiveOn || "—"]] : [])]
                        .map(([k, v]) => (
                            <DescriptionListGroup key={k}>
                                <DescriptionListTerm>{k}</DescriptionListTerm>
                                <DescriptionListDescription>{v}</DescriptionListDescription>
                            </DescriptionListGroup>))}
            </DescriptionList>
            <Title headingLevel="h3" className="volagent-subtitle">Backing chain</Title>
            <Chain store={store} volume={volume} />
            <Title headingLevel="h3" className="volagent-subtitle">Allocation while this page is open</Title>
            <AllocationPlot samples={store.history[volume.path] || []} />
        </>
    );
}

function Chain({ store, volume }) {
    const [nodes, setNodes] = useState(null);
    const [error, setError] = useState(null);
    const key = `${volume.path} ${volume.BackingName} ${volume.BackingFormat} ${volume.Problem}`;
    useEffect(() => {
        let live = true;
        setNodes(null);
        buildChain(volume, store.volumes).then(n => live && setNodes(n), e => live && setError(errorText(e)));
        return () => { live = false };
        // eslint-disable-next-line react-hooks/exhaustive-deps
    }, [key]);
    if (error)
        return <ErrorAlert title="Cannot follow the chain" error={error} />;
    if (!nodes)
        return <Spinner size="md" aria-label="Reading the chain" />;
    return (
        <ol className="volagent-chain" aria-label={`Backing chain of ${volume.Name}`} data-testid="chain">
            {nodes.map((n, i) => {
                const refused = n.violations.length > 0 || n.report?.verdict === "refused";
                const role = i === 0 ? "overlay" : i === nodes.length - 1 ? "base" : "backing";
                return (
                    <li key={i} className="volagent-chain-item">
                        <div className={`volagent-chain-node${refused ? " is-refused" : ""}`} data-testid="chain-node"
                             data-format={n.format}>
                            <div><strong>{n.volume ? n.volume.Name : n.path.split("/").pop()}</strong> <Label isCompact>{role}</Label>{" "}
                                <Label isCompact color="blue">{n.format || "format not recorded"}</Label>{" "}
                                {n.report && <Label isCompact color={n.report.verdict === "refused" ? "red" : "green"}>{n.report.verdict}</Label>}
                            </div>
                            <code className="volagent-path">{n.path}</code>
                            {n.report?.qcow2 && <div>virtual size {bytes(n.report.qcow2["virtual-size"])}</div>}
                            {n.note && <div className="volagent-note">{n.note}</div>}
                            {n.error && <div className="volagent-note">not inspected: {n.error}</div>}
                            {n.violations.length > 0 && <Violations list={n.violations} />}
                        </div>
                        {n.link &&
                            <div className={`volagent-chain-link${n.link.violations.length ? " is-refused" : ""}`} data-testid="chain-link">
                                <span aria-hidden="true">↓</span> backing, recorded format{" "}
                                <strong data-testid="link-format">{n.link.format || "none (refused: never guessed)"}</strong>
                                {n.link.violations.length > 0 && <Violations list={n.link.violations} />}
                            </div>}
                    </li>
                );
            })}
        </ol>
    );
}

function Violations({ list }) {
    return (
        <List className="volagent-violations" aria-label="Violations">
            {list.map((v, i) => <ListItem key={i}><Label color="red" isCompact>{v.code}</Label> {v.message}</ListItem>)}
        </List>
    );
}

// AllocationPlot: HighestAllocated over time, scaled to its own range
// (the device size is in the caption: it dwarfs a young overlay).
function AllocationPlot({ samples }) {
    const w = 480;
    const h = 120;
    if (samples.length === 0)
        return <Content component="p">No samples yet.</Content>;
    const t0 = samples[0].t;
    const t1 = Math.max(samples[samples.length - 1].t, t0 + 1000, Date.now());
    const max = Math.max(1, ...samples.map(s => s.allocated || 0)) * 1.1;
    const x = t => 4 + ((t - t0) / (t1 - t0)) * (w - 8);
    const y = v => h - 4 - (v / max) * (h - 20);
    // A step line: the value holds until the next PropertiesChanged.
    let d = "";
    samples.forEach((s, i) => {
        d += i ? ` H${x(s.t).toFixed(1)} V${y(s.allocated || 0).toFixed(1)}` : `M${x(s.t).toFixed(1)},${y(s.allocated || 0).toFixed(1)}`;
    });
    d += ` H${x(t1).toFixed(1)}`;
    const last = samples[samples.length - 1];
    return (
        <figure className="volagent-plot">
            <svg viewBox={`0 0 ${w} ${h}`} role="img" data-testid="allocation-plot"
                 aria-label={`Allocation over time: ${samples.length} samples, now ${bytes(last.allocated)} allocated of a ${bytes(last.device)} device`}>
                <rect x="0" y="0" width={w} height={h} className="volagent-plot-bg" />
                <text x="6" y="13" className="volagent-plot-text">{bytes(max / 1.1)}</text>
                <path d={d} className="volagent-plot-allocated" />
            </svg>
            <figcaption>
                <span className="volagent-key-allocated">allocated</span> {bytes(last.allocated)} of a {bytes(last.device)} device;{" "}
                {samples.length} sample(s) since {time(new Date(t0))}
            </figcaption>
        </figure>
    );
}

function Jobs({ store }) {
    const jobs = Object.values(store.jobs).sort((a, b) => (b.StartedAt || 0) - (a.StartedAt || 0));
    const [errors, setErrors] = useState({});
    if (jobs.length === 0)
        return <Loading store={store} what="jobs" />;
    const cancel = j => store.cancelJob(j.path).then(() => setErrors(e => ({ ...e, [j.path]: null })),
                                                     err => setErrors(e => ({ ...e, [j.path]: errorText(err) })));
    return (
        <Table aria-label="Jobs" variant="compact" gridBreakPoint="grid-lg" data-testid="jobs">
            <Thead>
                <Tr><Th>Job</Th><Th>Volume</Th><Th>State</Th><Th width={40}>Progress</Th><Th>Rate</Th><Th>Message</Th><Th screenReaderText="Actions" /></Tr>
            </Thead>
            <Tbody>
                {jobs.map(j => {
                    const id = j.path.split("/").pop();
                    const vol = store.volumes[j.Volume];
                    return (
                        <Tr key={j.path} data-testid="job-row" data-state={j.State} data-job={id}>
                            <Td dataLabel="Job">{id} {j.Operation}</Td>
                            <Td dataLabel="Volume">{vol ? vol.Name : (j.State === "running" ? "(being made)" : "")}</Td>
                            <Td dataLabel="State">
                                <Label color={{ succeeded: "green", failed: "red", cancelled: "orange" }[j.State] || "blue"}
                                       data-testid="job-state">{j.State}</Label>
                            </Td>
                            <Td dataLabel="Progress">
                                <Progress value={Math.round((j.Progress || 0) * 1000) / 10} aria-label={`Progress of job ${id}`}
                                          data-testid="job-progress" data-progress={j.Progress}
                                          variant={j.State === "failed" ? "danger" : j.State === "succeeded" ? "success" : undefined}
                                          measureLocation={ProgressMeasureLocation.outside}
                                          label={`${bytes(j.Bytes)} of ${bytes(j.TotalBytes)}`} />
                            </Td>
                            <Td dataLabel="Rate">{j.State === "running" ? rate(j.Rate) : ""}</Td>
                            <Td dataLabel="Message">
                                {j.Message}
                                <ErrorAlert title={`Cancelling job ${id} failed`} error={errors[j.path]} />
                            </Td>
                            <Td>
                                <Button variant="secondary" size="sm" isDisabled={!(j.Cancelable && j.State === "running")}
                                        aria-label={`Cancel job ${id}`} onClick={() => cancel(j)}>Cancel</Button>
                            </Td>
                        </Tr>
                    );
                })}
            </Tbody>
        </Table>
    );
}

function PolicyFeed({ store }) {
    if (store.violations.length === 0)
        return (
            <EmptyState titleText="No policy violations signalled" headingLevel="h3">
                <EmptyStateBody>Violations volagent signals (PolicyViolation) while this page is open appear here.</EmptyStateBody>
            </EmptyState>);
    return (
        <Table aria-label="Policy violations" variant="compact" gridBreakPoint="grid-md" data-testid="violations">
            <Thead><Tr><Th>Time</Th><Th>Domain or image</Th><Th>Disk</Th><Th>Rule</Th><Th>Message</Th></Tr></Thead>
            <Tbody>
                {store.violations.map(v => (
                    <Tr key={v.id} data-testid="violation-row">
                        <Td dataLabel="Time">{time(v.time)}</Td>
                        <Td dataLabel="Domain or image" data-testid="violation-domain">{v.domain || v.subject}</Td>
                        <Td dataLabel="Disk" data-testid="violation-disk">{v.disk}</Td>
                        <Td dataLabel="Rule"><Label color="red" isCompact>{v.code}</Label></Td>
                        <Td dataLabel="Message">{v.message}</Td>
                    </Tr>))}
            </Tbody>
        </Table>
    );
}

function FormatSelect({ id, value, onChange, label }) {
    return (
        <FormSelect id={id} value={value} onChange={(_e, v) => onChange(v)} aria-label={label} isRequired>
            <FormSelectOption value="" label="Choose a format (never guessed)" isPlaceholder isDisabled />
            <FormSelectOption value="raw" label="raw" />
            <FormSelectOption value="qcow2" label="qcow2" />
        </FormSelect>
    );
}

function SizeInput({ id, amount, unit, setAmount, setUnit, label }) {
    return (
        <Flex flexWrap={{ default: "nowrap" }} spaceItems={{ default: "spaceItemsSm" }}>
            <TextInput id={id} type="number" min="0" step="any" value={amount} onChange={(_e, v) => setAmount(v)} aria-label={label} />
            <FormSelect value={unit} onChange={(_e, v) => setUnit(v)} aria-label={`${label}: unit`} style={{ width: "7em" }}>
                {SIZE_UNITS.map(u => <FormSelectOption key={u.label} value={u.label} label={u.label} />)}
            </FormSelect>
        </Flex>
    );
}

function toBytes(amount, unit) {
    const u = SIZE_UNITS.find(x => x.label === unit);
    return Math.round(Number(amount) * u.factor);
}

function CreateOverlayDialog({ store, onClose, onCreated }) {
    const pools = Object.values(store.pools).sort((a, b) => a.Name.localeCompare(b.Name));
    const volumes = Object.values(store.volumes).sort((a, b) => a.Name.localeCompare(b.Name));
    const [pool, setPool] = useState(pools[0]?.Name || "");
    const [name, setName] = useState("");
    const [source, setSource] = useState("path");
    const [path, setPath] = useState("");
    const [backingVolume, setBackingVolume] = useState("");
    const [format, setFormat] = useState("");
    const [amount, setAmount] = useState("");
    const [unit, setUnit] = useState("GiB");
    const [error, setError] = useState(null);
    const [busy, setBusy] = useState(false);

    const vol = store.volumes[backingVolume];
    // A volume's format is the one its device holds: recorded as such, not guessed.
    const backingFormat = source === "volume" ? (vol ? vol.Format : "") : format;
    const ready = pool && name && backingFormat && (source === "volume" ? vol : path);

    const submit = e => {
        e.preventDefault();
        setError(null);
        setBusy(true);
        const size = amount ? toBytes(amount, unit) : 0;
        store.createOverlay(pool, name, source === "volume" ? backingVolume : path, backingFormat, size)
                .then(([obj]) => onCreated(obj), err => setError(errorText(err)))
                .finally(() => setBusy(false));
    };

    return (
        <Modal isOpen onClose={onClose} variant="medium" aria-labelledby="create-title" data-testid="create-dialog">
            <ModalHeader title="Create overlay" labelId="create-title" />
            <ModalBody>
                <Form id="create-form" onSubmit={submit} isHorizontal>
                    <FormGroup label="Pool" fieldId="create-pool" isRequired>
                        <FormSelect id="create-pool" value={pool} onChange={(_e, v) => setPool(v)} aria-label="Pool">
                            {pools.map(p => <FormSelectOption key={p.path} value={p.Name} label={`${p.Name} (${p.Type}, ${bytes(p.Free)} free)`} />)}
                        </FormSelect>
                    </FormGroup>
                    <FormGroup label="Name" fieldId="create-name" isRequired>
                        <TextInput id="create-name" value={name} onChange={(_e, v) => setName(v)} isRequired autoFocus />
                    </FormGroup>
                    <FormGroup label="Backing" role="radiogroup" fieldId="create-source" isInline isStack>
                        <Radio id="create-source-path" name="create-source" label="A file or device path"
                               isChecked={source === "path"} onChange={() => setSource("path")} />
                        <Radio id="create-source-volume" name="create-source" label="A volagent volume"
                               isChecked={source === "volume"} onChange={() => setSource("volume")} />
                    </FormGroup>
                    {source === "path"
                        ? (
                            <>
                                <FormGroup label="Backing path" fieldId="create-backing-path" isRequired>
                                    <TextInput id="create-backing-path" value={path} onChange={(_e, v) => setPath(v)}
                                               placeholder="/var/lib/libvirt/images/debian.raw" />
                                </FormGroup>
                                <FormGroup label="Backing format" fieldId="create-backing-format" isRequired>
                                    <FormatSelect id="create-backing-format" value={format} onChange={setFormat} label="Backing format" />
                                </FormGroup>
                            </>)
                        : (
                            <>
                                <FormGroup label="Backing volume" fieldId="create-backing-volume" isRequired>
                                    <FormSelect id="create-backing-volume" value={backingVolume}
                                                onChange={(_e, v) => setBackingVolume(v)} aria-label="Backing volume">
                                        <FormSelectOption value="" label="Choose a volume" isPlaceholder isDisabled />
                                        {volumes.map(v => <FormSelectOption key={v.path} value={v.path}
                                                                            label={`${v.Name} (${store.poolName(v.Pool)}, ${v.Format})`} />)}
                                    </FormSelect>
                                </FormGroup>
                                <FormGroup label="Backing format" fieldId="create-backing-volume-format">
                                    <TextInput id="create-backing-volume-format" readOnlyVariant="default"
                                               value={vol ? `${vol.Format} (the volume's own format)` : "choose a volume"} />
                                </FormGroup>
                            </>)}
                    <FormGroup label="Virtual size" fieldId="create-size">
                        <SizeInput id="create-size" amount={amount} unit={unit} setAmount={setAmount} setUnit={setUnit}
                                   label="Virtual size (empty: the backing's)" />
                    </FormGroup>
                </Form>
                <ErrorAlert title="volagent refused to create the overlay" error={error} />
            </ModalBody>
            <ModalFooter>
                <Button variant="primary" type="submit" form="create-form" isDisabled={!ready || busy} isLoading={busy}>Create</Button>
                <Button variant="link" onClick={onClose}>Cancel</Button>
            </ModalFooter>
        </Modal>
    );
}

function Users({ store, volume }) {
    const users = usersOf(store, volume);
    return (
        <div data-testid="users">
            {users.length
                ? <>Users of {volume.Name}: <List>{users.map(u => <ListItem key={u}>{u}</ListItem>)}</List></>
                : <p>volagent knows no users of {volume.Name} (no overlay over it, no running job). volagent still refuses if a libvirt domain names it.</p>}
        </div>
    );
}

function ResizeDialog({ store, volume, onClose }) {
    const [amount, setAmount] = useState(String(Math.ceil(volume.VirtualSize / 1024 ** 3)));
    const [unit, setUnit] = useState("GiB");
    const [error, setError] = useState(null);
    const [busy, setBusy] = useState(false);
    const size = amount ? toBytes(amount, unit) : 0;
    const submit = e => {
        e.preventDefault();
        setBusy(true);
        setError(null);
        store.resize(volume.path, size).then(onClose, err => setError(errorText(err))).finally(() => setBusy(false));
    };
    return (
        <Modal isOpen onClose={onClose} variant="small" aria-labelledby="resize-title" data-testid="resize-dialog">
            <ModalHeader title={`Resize volume ${volume.Name}?`} labelId="resize-title" />
            <ModalBody>
                <p>Volume {volume.Name} in pool {store.poolName(volume.Pool)} is {bytes(volume.VirtualSize)}; it can only grow.</p>
                <Users store={store} volume={volume} />
                <Form id="resize-form" onSubmit={submit}>
                    <FormGroup label="New virtual size" fieldId="resize-size" isRequired>
                        <SizeInput id="resize-size" amount={amount} unit={unit} setAmount={setAmount} setUnit={setUnit} label="New virtual size" />
                    </FormGroup>
                </Form>
                <ErrorAlert title={`volagent refused to resize ${volume.Name}`} error={error} />
            </ModalBody>
            <ModalFooter>
                <Button variant="primary" type="submit" form="resize-form" isDisabled={!size || busy} isLoading={busy}>
                    Resize {volume.Name}
                </Button>
                <Button variant="link" onClick={onClose}>Cancel</Button>
            </ModalFooter>
        </Modal>
    );
}

function DeleteDialog({ store, volume, onClose, onDeleted }) {
    const [error, setError] = useState(null);
    const [busy, setBusy] = useState(false);
    const remove = () => {
        setBusy(true);
        setError(null);
        store.remove(volume.path).then(onDeleted, err => setError(errorText(err))).finally(() => setBusy(false));
    };
    return (
        <Modal isOpen onClose={onClose} variant="small" aria-labelledby="delete-title" data-testid="delete-dialog">
            <ModalHeader title={`Delete volume ${volume.Name}?`} titleIconVariant="warning" labelId="delete-title" />
            <ModalBody>
                <p>Volume {volume.Name} in pool {store.poolName(volume.Pool)} ({volume.DevicePath}) and its data will be removed.</p>
                <Users store={store} volume={volume} />
                <ErrorAlert title={`volagent refused to delete ${volume.Name}`} error={error} />
            </ModalBody>
            <ModalFooter>
                <Button variant="danger" onClick={remove} isDisabled={busy} isLoading={busy}>Delete {volume.Name}</Button>
                <Button variant="link" onClick={onClose}>Cancel</Button>
            </ModalFooter>
        </Modal>
    );
}

function InspectPath() {
    const [path, setPath] = useState("");
    const [format, setFormat] = useState("");
    const [report, setReport] = useState(null);
    const [error, setError] = useState(null);
    const [busy, setBusy] = useState(false);
    const submit = e => {
        e.preventDefault();
        setBusy(true);
        setError(null);
        setReport(null);
        inspect(path, format).then(setReport, err => setError(errorText(err))).finally(() => setBusy(false));
    };
    const q = report?.qcow2;
    return (
        <>
            <Form onSubmit={submit} aria-label="Inspect an image" className="volagent-inspect-form">
                <FormGroup label="Path of the image" fieldId="inspect-path" isRequired>
                    <TextInput id="inspect-path" value={path} onChange={(_e, v) => setPath(v)} isRequired placeholder="/dev/vg0/vm1 or a file" />
                </FormGroup>
                <FormGroup label="Read it as" fieldId="inspect-format" isRequired>
                    <FormatSelect id="inspect-format" value={format} onChange={setFormat} label="Read it as" />
                </FormGroup>
                <ActionGroup>
                    <Button type="submit" variant="primary" isDisabled={!path || !format || busy} isLoading={busy}>Inspect</Button>
                </ActionGroup>
            </Form>
            <Content component="small">volagent's Inspect reads the image's header only, and opens nothing it names.</Content>
            <ErrorAlert title="Inspect failed" error={error} />
            {report &&
                <Card data-testid="inspect-report" className="volagent-report">
                    <CardTitle>
                        Verdict: <Label color={report.verdict === "refused" ? "red" : "green"} data-testid="verdict">{report.verdict}</Label>
                    </CardTitle>
                    <CardBody>
                        {report.violations?.length > 0 && <Violations list={report.violations} />}
                        <DescriptionList isHorizontal isCompact>
                            {[["Path", report.path], ["Read as", report.format], ["Image size", bytes(report["image-size"])],
                                ["Header found in raw", report["detected-header"]], ["Virtual size", q && bytes(q["virtual-size"])],
                                ["Backing file", q?.["backing-file"]], ["Backing format", q?.["backing-format"]], ["Data file", q?.["data-file"]]]
                                    .filter(([, v]) => v)
                                    .map(([k, v]) => (
                                        <DescriptionListGroup key={k}>
                                            <DescriptionListTerm>{k}</DescriptionListTerm>
                                            <DescriptionListDescription>{v}</DescriptionListDescription>
                                        </DescriptionListGroup>))}
                        </DescriptionList>
                    </CardBody>
                </Card>}
        </>
    );
}
