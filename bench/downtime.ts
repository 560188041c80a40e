/**
 * Benchmark: guest downtime of every strategy on a real Linux guest (scripts/guest-image.sh: its
 * writer appends fsynced records all along, its probe reports every pause it sees), run by the qemu
 * backend, by the libvirt backend (a libvirt domain of the same guest), or both side by side. The
 * guest's RAM is not empty: with `--ram-fill random` (default) the guest itself keeps three quarters
 * of it full of random bytes (`guest.fill_mb`), so a managed save writes all of that on either
 * backend; `--ram-fill zero` leaves it empty, as `npm run bench:strategies` does. Its disk holds data
 * beyond its root filesystem (written through its QEMU). Each strategy runs several times; medians
 * are reported with ratios against `cold` measured in the same run (these machines are noisy),
 * beside the pause the guest itself saw and its writer's longest write+fsync; with both drivers, the
 * libvirt figures against qemu's.
 *
 * `live`'s protection is measured against what `live` was before it (`--unprotected`, qemu backend: a
 * push backup job writing straight into the store's file, QEMU's default copy-before-write, whose
 * guest writes wait for the store), with the store on the guest's own disk or on a throttled one
 * (`--store throttled:<MiB/s>`: an ext4 on a loop device over a qemu-storage-daemon FUSE export with a
 * throttle filter; this machine has no cgroup io controller nor device-mapper), or in memory (`--store
 * memory`: a tmpfs, which tells the CPU's share of the contention from the disk's).
 *
 * Usage: npm run bench:downtime [-- --driver qemu|libvirt|both --runs N --ram-mb M --data-mb D
 *        --disk-mb S --quiesce off|auto|required --ram-fill random|zero --probe-gap-ms G
 *        --strategies s1,s2 --unprotected --store same|memory|throttled:<MiB/s> --export-rate-mb R
 *        --agent-cpus LIST]
 *
 * `--export-rate-mb`: `[hypervisor] running_export_rate_mb` (default: its default; 0: unlimited).
 * `--agent-cpus`: `[DEFAULT] agent_cpus` (default: none): this process (the agent) is pinned there as
 * `snapshot-driver` pins itself, before the guest starts; the guest's QEMU must get every CPU.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { buildRuntime } from '../src/service/runtime.js';
import { benchConfig } from './bench-config.js';
import { deleteAndSettle } from './settle-store.js';
import { DEFAULT_RUNNING_EXPORT_RATE_MB, QUIESCE_MODES, STRATEGIES, type QuiesceMode, type StrategyName } from '../src/config/schema.js';
import { DISK_NODE } from '../src/hypervisor/qemu/launch.js';
import { GuestConsole, latencyPercentiles, type GuestObserved, type LatencyHistogram } from '../src/guest-check/console.js';
import { testGuestDomainXml } from '../src/guest-check/domain-xml.js';
import { buildGuestImage, type GuestImage } from '../src/guest-check/guest-image.js';
import { observeRunningGuest } from '../src/guest-check/observe.js';
import { waitForGuestReady } from '../src/guest-check/ready.js';
import { createLogger, silentLogger } from '../src/log.js';
import { runProgram } from '../src/util/exec.js';
import { throttledStore, type ThrottledStore } from './throttled-store.js';
import { bareSaveRestore } from './bare-save-restore.js';
import { qemuGuest, writeDiskData, type BenchGuest } from './bench-guest.js';
import { USES_MANAGED_SAVE } from '../src/snapshot/strategies.js';
import { cpuList } from '../src/config/values.js';
import { onlineCpus, pinProcess } from '../src/util/affinity.js';

const { values } = parseArgs({
  options: {
    driver: { type: 'string', default: 'both' },
    runs: { type: 'string', default: '3' },
    'ram-mb': { type: 'string', default: '512' },
    'data-mb': { type: 'string', default: '1024' },
    'disk-mb': { type: 'string', default: '2048' },
    quiesce: { type: 'string', default: 'auto' },
    'ram-fill': { type: 'string', default: 'random' },
    'probe-gap-ms': { type: 'string', default: '10' },
    strategies: { type: 'string', default: STRATEGIES.join(',') },
    unprotected: { type: 'boolean', default: false },
    store: { type: 'string', default: 'same' },
    'export-rate-mb': { type: 'string', default: String(DEFAULT_RUNNING_EXPORT_RATE_MB) },
    'agent-cpus': { type: 'string', default: '' },
  },
});
const runs = Number(values.runs);
const strategies = values.strategies.split(',') as StrategyName[];
for (const st of strategies) {
  if (!(STRATEGIES as readonly string[]).includes(st)) throw new Error(`--strategies: a comma-separated list of ${STRATEGIES.join(', ')}`);
}
const storeMatch = /^(?:same|memory|throttled:(\d+(?:\.\d+)?))$/.exec(values.store);
if (!storeMatch) throw new Error('--store: same, memory, or throttled:<MiB/s>');
const storeInMemory = values.store === 'memory';
const throttleMiBps = storeMatch[1] === undefined ? undefined : Number(storeMatch[1]);
if (values.unprotected && values.driver !== 'qemu') throw new Error('--unprotected: with --driver qemu only');
const ramMb = Number(values['ram-mb']);
const dataMb = Number(values['data-mb']);
const diskMb = Number(values['disk-mb']);
if (!(QUIESCE_MODES as readonly string[]).includes(values.quiesce)) throw new Error(`--quiesce: one of ${QUIESCE_MODES.join(', ')}`);
const quiesce = values.quiesce as QuiesceMode;
/** The guest's root filesystem takes the first 256 MiB of its disk: the data goes after it. */
const DATA_OFFSET_MB = 512;
if (DATA_OFFSET_MB + dataMb > diskMb) throw new Error(`--disk-mb must be at least ${DATA_OFFSET_MB} + --data-mb`);
if (values['ram-fill'] !== 'random' && values['ram-fill'] !== 'zero') throw new Error('--ram-fill: random or zero');
const DRIVERS = { qemu: ['qemu'], libvirt: ['libvirt'], both: ['qemu', 'libvirt'] } as const;
if (!(values.driver in DRIVERS)) throw new Error('--driver: qemu, libvirt or both');
const drivers = DRIVERS[values.driver as keyof typeof DRIVERS];
/** The guest fills this much of its RAM with random bytes (it needs the rest to run). */
const fillMb = values['ram-fill'] === 'random' ? Math.floor((ramMb * 3) / 4) : 0;

/**
 * The probe's gap threshold (guest/probe.c `probe.gap_ms`; 50 ms in the tests, for a loaded host):
 * lower here, so that the pause of a strategy that never stops the vCPUs is seen; the idle row shows
 * what the host's own noise is.
 */
const PROBE_GAP_MS = Number(values['probe-gap-ms']);
if (!(PROBE_GAP_MS > 0)) throw new Error('--probe-gap-ms: a number of ms above 0');
/**
 * The writer prints the exact latency of every record slower than this (`writer.slow_ms`): the p99s
 * are exact above it, not a bucket's edge (up to 4.4% high).
 * Not lower: each console line costs the guest a trap per byte under TCG.
 */
const WRITER_SLOW_MS = 4;
/** `[hypervisor] running_export_rate_mb` of the agent under test (0: unlimited). */
const EXPORT_RATE_MB = Number(values['export-rate-mb']);
if (!(EXPORT_RATE_MB >= 0)) throw new Error('--export-rate-mb: MiB/s, 0 (unlimited) or more');
/** `[DEFAULT] agent_cpus` of the agent under test ('': any CPU). */
const AGENT_CPUS = cpuList().parse(values['agent-cpus']);
const MiB = 2 ** 20;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

interface Figures {
  downtime: number[];
  /** The vCPU stops the guest's probe saw (ms). */
  seen: number[];
  duration: number[];
  freeze: number[];
  /** The guest writer's longest write+fsync (ms). */
  writerMax: number[];
  /** Its write+fsync latencies over every run's window, merged. */
  writerLatency: LatencyHistogram;
  /** The exact latencies (µs) of those over WRITER_SLOW_MS, every run's. */
  writerSlowUs: number[];
  /** The longest stall of the guest's clock the probe saw (ms; 0: none over its threshold). */
  gapMax: number[];
}

const IDLE = 'idle (no snapshot)';
const UNPROTECTED = 'live, unprotected (push)';
/** Bare QEMU's save and restore of the same guest (bare-save-restore.ts): the managed saves' baseline. */
const BARE = 'bare QEMU save+restore';
type Row = StrategyName | typeof IDLE | typeof UNPROTECTED | typeof BARE;
const IDLE_WINDOW_MS = 5_000;

function emptyFigures(): Figures {
  return { downtime: [], seen: [], duration: [], freeze: [], writerMax: [], writerLatency: new Map(), writerSlowUs: [], gapMax: [] };
}

function addObserved(f: Figures, seen: GuestObserved): void {
  f.seen.push(Math.round(seen.stoppedMs));
  f.writerMax.push(Math.round(seen.writerMaxMs));
  f.gapMax.push(Math.round(Math.max(0, ...seen.gaps)));
  for (const [i, c] of seen.writerLatency) f.writerLatency.set(i, (f.writerLatency.get(i) ?? 0) + c);
  f.writerSlowUs.push(...seen.writerSlowUs);
}

/** The guest QEMU's CPU affinity (qemu driver): with --agent-cpus it must still be every online CPU. */
async function qemuCpus(pidFile: string): Promise<string> {
  const pid = (await fs.readFile(pidFile, 'utf8')).trim();
  const list = (await fs.readFile(`/proc/${pid}/status`, 'utf8')).match(/^Cpus_allowed_list:\s*(\S+)$/m)?.[1];
  if (list !== onlineCpus()) throw new Error(`the guest's QEMU runs on CPUs ${list}, not on every online CPU (${onlineCpus()})`);
  return list;
}

async function virsh(...args: string[]): Promise<string> {
  const res = await runProgram('virsh', ['-q', '-c', 'qemu:///system', ...args], { timeoutMs: 600_000 });
  if (res.code !== 0) throw new Error(`virsh ${args[0]} failed: ${res.stderr.trim()}`);
  return res.stdout;
}

async function libvirtGuest(base: string, guest: GuestImage, cmdline: string): Promise<BenchGuest> {
  const start = await runProgram('bash', [path.resolve(import.meta.dirname, '../scripts/libvirtd.sh'), 'start'], { timeoutMs: 120_000 });
  if (start.code !== 0) throw new Error(`scripts/libvirtd.sh start failed: ${start.stderr}`);
  const uuid = randomUUID();
  const dir = path.join(base, 'domain');
  await fs.mkdir(dir);
  const disk = path.join(dir, 'disk.qcow2');
  const made = await runProgram('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', guest.rootDisk, '-F', 'qcow2', disk, `${diskMb}M`]);
  if (made.code !== 0) throw new Error(`qemu-img create failed: ${made.stderr}`);
  const consoleLog = path.join(dir, 'console.log');
  const xml = path.join(dir, 'domain.xml');
  const extra = cmdline.slice(guest.cmdline.length).trim();
  await fs.writeFile(xml, testGuestDomainXml({ name: `bench-${uuid.slice(0, 8)}`, uuid, memoryMb: ramMb, disk, format: 'qcow2', console: consoleLog, guest, cmdlineExtra: extra }));
  await virsh('define', xml);
  await virsh('start', uuid);
  return {
    uuid,
    console: new GuestConsole(consoleLog),
    hmp: (command) => virsh('qemu-monitor-command', uuid, '--hmp', command),
    async close() {
      await virsh('destroy', uuid).catch(() => undefined);
      await virsh('undefine', uuid, '--managed-save', '--snapshots-metadata').catch(() => undefined);
    },
  };
}

async function measure(driver: 'qemu' | 'libvirt', guest: GuestImage): Promise<Map<Row, Figures>> {
  const { base, config } = await benchConfig(`sdd-${driver}-`, quiesce);
  config.hypervisor.driver = driver;
  config.hypervisor.running_export_rate_mb = EXPORT_RATE_MB;
  config.DEFAULT.agent_cpus = AGENT_CPUS;
  if (AGENT_CPUS) await pinProcess(process.pid, AGENT_CPUS);
  let store: ThrottledStore | undefined;
  if (throttleMiBps !== undefined) {
    store = await throttledStore(path.join(base, 'throttled-store'), { bytesPerSecond: throttleMiBps * MiB, sizeBytes: (dataMb + 1024) * MiB });
    config.image_store.path = path.join(store.mountpoint, 'images');
  }
  let memoryDir: string | undefined;
  if (storeInMemory) {
    memoryDir = await fs.mkdtemp('/dev/shm/sdd-store-');
    config.image_store.path = path.join(memoryDir, 'images');
  }
  // BENCH_LOG=1: the agent's log lines (debug) on stderr, to see where an operation's time goes.
  const rt = buildRuntime(config, process.env.BENCH_LOG ? createLogger({ level: 'debug' }) : silentLogger());
  const cmdline = `${guest.cmdline} probe.gap_ms=${PROBE_GAP_MS} writer.slow_ms=${WRITER_SLOW_MS}${fillMb > 0 ? ` guest.fill_mb=${fillMb}` : ''}`;
  const g = driver === 'qemu' ? await qemuGuest(rt, guest, { cmdline, ramMb, diskMb }) : await libvirtGuest(base, guest, cmdline);
  try {
    // Filling the RAM happens before the guest says it is ready: minutes under TCG for GiBs.
    await waitForGuestReady(rt.hv, g.uuid, g.console, 0, 30 * 60_000);
    await writeDiskData(g, DATA_OFFSET_MB, dataMb);
    const disk = await rt.hv.diskInfo(g.uuid);
    console.log(
      `${driver}: guest Linux ${guest.kernelVersion}, ${ramMb} MiB RAM (${fillMb} MiB of it random bytes), ` +
        `${diskMb} MiB qcow2 (ext4 root + ${dataMb} MiB of data; ${Math.round(disk.actualSize / MiB)} MiB on the host), writer running; quiesce=${quiesce}; ` +
        `copies of the running guest's disk ${EXPORT_RATE_MB > 0 ? `at most ${EXPORT_RATE_MB} MiB/s` : 'unlimited'}` +
        `${AGENT_CPUS ? `; the agent on CPUs ${AGENT_CPUS}, the guest's QEMU on ${driver === 'qemu' ? await qemuCpus(path.join(config.DEFAULT.instances_path, g.uuid, 'qemu.pid')) : "libvirtd's choice"}` : ''}; TCG`,
    );
    const figures = new Map<Row, Figures>();
    for (let r = 0; r < runs; r++) {
      // The same guest with nothing done to it: the baseline of its writer's latency.
      const idle = await observeRunningGuest(g.console, () => new Promise((resolve) => setTimeout(resolve, IDLE_WINDOW_MS)));
      const fi = figures.get(IDLE) ?? emptyFigures();
      addObserved(fi, idle.guest);
      figures.set(IDLE, fi);
      if (driver === 'qemu' && strategies.some((st) => USES_MANAGED_SAVE[st])) {
        const dir = path.join(config.DEFAULT.instances_path, g.uuid);
        const paths = { qmpSocket: path.join(dir, 'qmp.sock'), pidFile: path.join(dir, 'qemu.pid'), qemuLog: path.join(dir, 'qemu.log'), stateFile: path.join(dir, 'bare.state') };
        const obs = await observeRunningGuest(g.console, () => bareSaveRestore(paths));
        if (obs.guest.writerErrors.length > 0) throw new Error(`the guest's writer failed: ${obs.guest.writerErrors.join('; ')}`);
        const f = figures.get(BARE) ?? emptyFigures();
        f.downtime.push(obs.result.downtimeMs);
        f.duration.push(obs.result.downtimeMs);
        f.freeze.push(0);
        addObserved(f, obs.guest);
        figures.set(BARE, f);
        console.log(`bare save+restore: ${JSON.stringify(obs.result)}`);
      }
      if (values.unprotected) {
        const obs = await observeRunningGuest(g.console, () => unprotectedPush(g, path.join(config.image_store.path, `push-${r}.raw`)));
        if (obs.guest.writerErrors.length > 0) throw new Error(`the guest's writer failed: ${obs.guest.writerErrors.join('; ')}`);
        const f = figures.get(UNPROTECTED) ?? emptyFigures();
        f.downtime.push(0);
        f.duration.push(obs.result.durationMs);
        f.freeze.push(0);
        addObserved(f, obs.guest);
        figures.set(UNPROTECTED, f);
      }
      for (const strategy of strategies) {
        const obs = await observeRunningGuest(g.console, () => rt.engine.take({ requestId: `bench-${r}`, instanceUuid: g.uuid, imageId: randomUUID(), strategy }));
        const res = obs.result;
        await deleteAndSettle(config.image_store.path, () => rt.store.delete(res.image_id));
        const state = (await rt.hv.info(g.uuid)).state;
        if (state !== 'running') throw new Error(`after ${strategy} the guest is ${state}, not running`);
        if (obs.guest.writerErrors.length > 0) throw new Error(`the guest's writer failed: ${obs.guest.writerErrors.join('; ')}`);
        const f = figures.get(strategy) ?? emptyFigures();
        f.downtime.push(res.downtime_ms);
        f.duration.push(res.duration_ms);
        f.freeze.push(res.freeze_ms);
        addObserved(f, obs.guest);
        figures.set(strategy, f);
      }
    }
    return figures;
  } finally {
    await g.close();
    await store?.close();
    if (memoryDir !== undefined) await fs.rm(memoryDir, { recursive: true, force: true });
    await fs.rm(base, { recursive: true, force: true });
  }
}

/**
 * What `live` was before its protection: a push backup job (HMP drive_backup, sync full) writing
 * straight into a raw file in the store, with QEMU's default copy-before-write (a guest write to a
 * cluster not yet copied waits until the old data is written to the store).
 */
async function unprotectedPush(g: BenchGuest, dest: string): Promise<{ durationMs: number }> {
  await fs.mkdir(path.dirname(dest), { recursive: true });
  const t0 = performance.now();
  const qmp = g.qmp!;
  await qmp('drive-backup', { 'job-id': 'bench-push', device: DISK_NODE, target: dest, format: 'raw', sync: 'full', mode: 'absolute-paths' });
  for (;;) {
    const jobs = await qmp<{ device: string }[]>('query-block-jobs');
    if (!jobs.some((j) => j.device === 'bench-push')) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const durationMs = Math.round(performance.now() - t0);
  await fs.rm(dest, { force: true });
  return { durationMs };
}

const col = (x: number | string, w: number) => String(x).padStart(w);
/** Managed saves in one snapshot of the row (double-suspend's downtime is that of two). */
const savesOf = (row: Row) => (row === 'double-suspend' ? 2 : 1);
const ratio = (x: number, b: number) => (b > 0 ? (x / b).toFixed(2) : 'n/a');

function printDriver(driver: string, figures: Map<Row, Figures>): void {
  const cold = figures.get('cold') ?? emptyFigures();
  const baseDown = median(cold.downtime);
  const baseDur = median(cold.duration);
  const idleP99 = latencyPercentiles(figures.get(IDLE)!.writerLatency, figures.get(IDLE)!.writerSlowUs)?.p99Ms ?? NaN;
  const bareDown = figures.has(BARE) ? median(figures.get(BARE)!.downtime) : NaN;
  console.log(
    `\n${driver}: ${runs} runs each, medians; guest_saw_ms: the vCPU stops the probe inside the guest measured; gap_ms: the longest stall ` +
      `of its clock over ${PROBE_GAP_MS} ms (0: none); writer: its write+fsync latencies over the whole window (the snapshot and 3 s after), ` +
      `p50/p99 over all runs (exact above ${WRITER_SLOW_MS} ms, else to within 4.4%), max the median of each run's longest; p99 vs idle: against the same guest doing nothing, same run; ` +
      `vs bare: downtime against bare QEMU's save+restore of the same guest, same run, per managed save (double-suspend has two); ` +
      `store: ${storeInMemory ? 'in memory (tmpfs: no disk I/O beside the guest)' : throttleMiBps === undefined ? "on the guest disk's filesystem" : `throttled to ${throttleMiBps} MiB/s`}`,
  );
  console.log('strategy                       downtime_ms  guest_saw_ms  vs cold  vs bare  duration_ms  vs cold  freeze_ms  gap_ms  fsync_p50  fsync_p99  p99 vs idle  fsync_max');
  for (const [s, f] of figures) {
    const d = s === IDLE ? '-' : median(f.downtime);
    const t = s === IDLE ? '-' : median(f.duration);
    const p = latencyPercentiles(f.writerLatency, f.writerSlowUs);
    console.log(
      `${s.padEnd(31)}${col(d, 11)}  ${col(median(f.seen), 12)}  ${col(typeof d === 'number' ? ratio(d, baseDown) : '-', 7)}  ` +
        `${col(typeof d === 'number' && (s === BARE || USES_MANAGED_SAVE[s as StrategyName]) && bareDown > 0 ? ratio(d, bareDown * savesOf(s)) : '-', 7)}  ${col(t, 11)}  ` +
        `${col(typeof t === 'number' ? ratio(t, baseDur) : '-', 7)}  ${col(s === IDLE ? '-' : median(f.freeze), 9)}  ${col(median(f.gapMax), 6)}  ` +
        `${col(p ? p.p50Ms.toFixed(2) : 'n/a', 9)}  ${col(p ? p.p99Ms.toFixed(2) : 'n/a', 9)}  ${col(p ? ratio(p.p99Ms, idleP99) : 'n/a', 11)}  ${col(median(f.writerMax), 9)}`,
    );
  }
}

async function main(): Promise<void> {
  const guest = await buildGuestImage(path.resolve(import.meta.dirname, '../scripts/guest-image.sh'));
  const results = new Map<string, Map<Row, Figures>>();
  for (const driver of drivers) results.set(driver, await measure(driver, guest));
  for (const [driver, figures] of results) printDriver(driver, figures);
  const q = results.get('qemu');
  const l = results.get('libvirt');
  if (q && l) {
    console.log('\nlibvirt against qemu, same guest, same run (medians; ratio = libvirt / qemu)');
    console.log('strategy                       qemu downtime  libvirt downtime  ratio  qemu duration  libvirt duration  ratio');
    for (const s of strategies) {
      const [qd, ld, qt, lt] = [median(q.get(s)!.downtime), median(l.get(s)!.downtime), median(q.get(s)!.duration), median(l.get(s)!.duration)];
      console.log(`${s.padEnd(31)}${col(qd, 13)}  ${col(ld, 16)}  ${col(ratio(ld, qd), 5)}  ${col(qt, 13)}  ${col(lt, 16)}  ${col(ratio(lt, qt), 5)}`);
    }
  }
}

await main();
