/**
 * Issue 11, `live` that the guest never waits for (SPEC §3: "The guest must never pay for a slow or
 * full image store"), on ONE real Linux guest with its writer running (one write+fsync of a record
 * every 10 ms; its console says how long each took, and its probe says when its vCPUs stopped):
 *
 * (a) the store on a small tmpfs that fills during the copy: the snapshot fails naming the cause,
 *     nothing partial, nothing left in QEMU or the instance's folder; the guest ran and wrote on
 *     without an error or a stop (copy-before-write used to write the store: a full store failed
 *     the guest's write, and virtio-blk's werror=enospc paused the guest);
 * (b) the store frozen (fsfreeze) for seconds during the copy: the guest's write latency stays at
 *     its idle level, measured in the same run (copy-before-write used to make the guest's writes
 *     wait for the store); the snapshot completes after the thaw, the image is right;
 * (c) a disk on a large base image, quiesce = required: the freeze does not span a copy of the base
 *     (it used to: the backing chain was copied into the target inside the job's start).
 *
 * The guest's disk is an overlay on a base made from the test guest's root disk, grown by
 * BASE_EXTRA of data beyond the end of its ext4 (the filesystem never sees it; the image holds it).
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir } from 'tmp-promise';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { processesWhere } from '../../src/util/processes.js';
import type { QuiesceMode } from '../../src/config/schema.js';
import { Lifecycle } from '../../src/snapshot/lifecycle.js';
import { SnapshotFailed } from '../../src/errors.js';
import { observed, PROBE_NOISE_MS, type ConsoleEvent } from '../../src/guest-check/console.js';
import { checkGuestImage } from '../../src/guest-check/ext4.js';
import { observeRunningGuest } from '../../src/guest-check/observe.js';
import { DISK_NODE, DISK_QOM_PATH } from '../../src/hypervisor/qemu/launch.js';
import { FLEECE_PREFIX } from '../../src/hypervisor/qemu/live-backup.js';
import { QemuHypervisor, type QemuHypervisorOptions } from '../../src/hypervisor/qemu/qemu-hypervisor.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { silentLogger } from '../../src/log.js';
import { QemuImg } from '../../src/qemu-img/qemu-img.js';
import { SnapshotEngine } from '../../src/snapshot/engine.js';
import { OperationJournal } from '../../src/snapshot/operation-journal.js';
import { PendingSnapshots } from '../../src/snapshot/pending.js';
import type { BeforeStep } from '../../src/snapshot/run-steps.js';
import { runProgram } from '../../src/util/exec.js';
import { HOST_STALL_ALLOWANCE_MS, report } from '../helpers/guest-downtime.js';
import { createLinuxGuest, linuxGuestImage, writerPasses, type LinuxGuest } from '../helpers/linux-guest.js';
import { assertQemuInstalled, killQemuUnder, MiB, QEMU_BINARY, QEMU_IMG, QEMU_IO, watchQmpEvents } from '../helpers/qemu-guest.js';
import { mountSmallFs, type SmallFs } from '../helpers/small-fs.js';

/** Data in the base image beyond the guest's filesystem (the guest's root fs is 256 MiB). */
const BASE_FS_END = 256 * MiB;
const BASE_EXTRA = 768 * MiB;
/** The tmpfs store of (a): far less than the data to copy, far more than the disk's overlay (the store's up-front check). */
const SMALL_STORE_MB = 48;
/** How long the store stays frozen in (b). */
const STALL_MS = 8000;
/**
 * (b)'s copy rate (bytes/s of data): the ~1 GiB copy outlasts the stall by seconds at this rate (and
 * it stops at the frozen store anyway); lower only makes the test longer.
 */
const COPY_SPEED = 64 * MiB;
/** The loop-mounted ext4 store of (b) and (c): room for a few images of the whole disk. */
const LOOP_STORE_BYTES = 3 * 1024 * MiB;
const TOOL_TIMEOUT_MS = 120_000;
const NO_SPACE = /No space left on device|ENOSPC/;

const log = silentLogger();
let base: string;
let hv: QemuHypervisor;
let hvOptions: QemuHypervisorOptions;
let guest: LinuxGuest;
let baseImage: string;
let small: SmallFs | undefined;
let loopDir: string | undefined;
let loopMounted = false;
let frozen = false;

async function run(file: string, args: string[], timeoutMs = TOOL_TIMEOUT_MS): Promise<string> {
  const res = await runProgram(file, args, { timeoutMs });
  if (res.code !== 0) throw new Error(`${file} ${args.join(' ')} exited ${res.code}: ${(res.stderr + res.stdout).trim()}`);
  return res.stdout;
}

async function freezeStore(): Promise<void> {
  await run('fsfreeze', ['-f', loopDir!], 30_000);
  frozen = true;
}

async function thawStore(): Promise<void> {
  if (!frozen) return;
  await run('fsfreeze', ['-u', loopDir!], 30_000);
  frozen = false;
}

/** Records the writer fsynced per second of its progress lines (one a second of guest time). */
function writerRate(events: readonly ConsoleEvent[]): number {
  const lines = events.filter((e) => e.kind === 'writer-progress');
  return lines.length === 0 ? 0 : lines.reduce((sum, e) => sum + (e.kind === 'writer-progress' ? e.n : 0), 0) / lines.length;
}

function engineOn(hv: QemuHypervisor, storeDir: string, mode: QuiesceMode, beforeStep?: BeforeStep): { engine: SnapshotEngine; store: ImageStore } {
  const store = new ImageStore({ path: storeDir, reservedSpaceMb: 0, osHashAlgo: 'sha512' });
  const pending = new PendingSnapshots(path.join(base, 's', 'pending'));
  const engine = new SnapshotEngine({
    hv,
    store,
    lifecycle: new Lifecycle(hv, pending, log),
    operations: new OperationJournal(path.join(base, 's', 'operations'), log),
    log,
    namePrefix: 'snapdrv-',
    defaultStrategy: 'live',
    quiesce: { mode, maxFreezeMs: 10_000, agentTimeoutMs: 10_000 },
    beforeStep,
  });
  return { engine, store };
}

/** What of a live backup is left in the guest's QEMU and its instance folder. */
async function leftovers() {
  const nodes = await hv.qmp<{ 'node-name': string }[]>(guest.uuid, 'query-named-block-nodes', { flat: true });
  return {
    nodes: nodes.map((n) => n['node-name']).filter((n) => n.startsWith(FLEECE_PREFIX)),
    exports: await hv.qmp<unknown[]>(guest.uuid, 'query-block-exports'),
    jobs: await hv.qmp<unknown[]>(guest.uuid, 'query-block-jobs'),
    drive: await hv.qmp<string>(guest.uuid, 'qom-get', { path: DISK_QOM_PATH, property: 'drive' }),
    files: (await fs.readdir(path.join(hv.instancesPath, guest.uuid))).filter((n) => n.startsWith(FLEECE_PREFIX)),
  };
}
const NOTHING_LEFT = { nodes: [], exports: [], jobs: [], drive: DISK_NODE, files: [] };

/** Pids of processes whose argv names an NBD socket of ours in the guest's folder (the copy). */
async function copyProcesses(): Promise<number[]> {
  const needle = `?socket=${path.join(hv.instancesPath, guest.uuid, FLEECE_PREFIX)}`;
  return (await processesWhere((argv) => argv.some((a) => a.includes(needle)))).map((p) => p.pid);
}

async function fleeceFile(): Promise<string> {
  const dirPath = path.join(hv.instancesPath, guest.uuid);
  const names = (await fs.readdir(dirPath)).filter((n) => n.startsWith(FLEECE_PREFIX) && n.endsWith('.qcow2'));
  expect(names).toHaveLength(1);
  return path.join(dirPath, names[0]!);
}

const allocated = async (file: string) => (await fs.stat(file)).blocks * 512;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

beforeAll(async () => {
  await assertQemuInstalled();
  const img = await linuxGuestImage();
  // A short prefix keeps unix socket paths (QMP, the backup's NBD socket) far below 108 bytes.
  base = (await dir({ prefix: 'sdt-' })).path;
  const instancesPath = path.join(base, 'i');
  await fs.mkdir(instancesPath, { recursive: true });
  hvOptions = {
    instancesPath,
    qemuBinary: QEMU_BINARY,
    qemuImg: new QemuImg(QEMU_IMG),
    accel: 'tcg',
    shutdownTimeoutMs: 30_000,
    qmpTimeoutMs: 30_000,
    log,
  };
  hv = new QemuHypervisor(hvOptions);

  // The base: the guest's root disk, grown, with BASE_EXTRA of data past the end of its filesystem.
  baseImage = path.join(base, 'base.qcow2');
  await run(QEMU_IMG, ['convert', '-q', '-f', 'qcow2', '-O', 'qcow2', img.rootDisk, baseImage]);
  await run(QEMU_IMG, ['resize', '-q', '-f', 'qcow2', baseImage, String(BASE_FS_END + BASE_EXTRA)]);
  await run(QEMU_IO, ['-f', 'qcow2', '-c', `write -P 0x5b ${BASE_FS_END} ${BASE_EXTRA}`, baseImage]);

  // The stores: a small tmpfs (a), a loop-mounted ext4 that can be frozen (b, c).
  small = await mountSmallFs(path.join(base, 'small'), SMALL_STORE_MB);
  loopDir = path.join(base, 'loop');
  const loopImage = path.join(base, 'loop.ext4');
  await fs.mkdir(loopDir);
  const fh = await fs.open(loopImage, 'w');
  await fh.truncate(LOOP_STORE_BYTES);
  await fh.close();
  // Initialized now, not in the background (no ext4lazyinit writes while the test freezes it).
  await run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', loopImage]);
  await run('mount', ['-o', 'loop', loopImage, loopDir]);
  loopMounted = true;
  const st = await fs.statfs(loopDir);
  expect(st.type).toBe(0xef53); // ext4, not the folder underneath

  guest = await createLinuxGuest(hv, { name: 'store-trouble', baseImage, baseFormat: 'qcow2' });
}, 600_000);

afterAll(async () => {
  // Never leave a frozen filesystem behind, whatever failed.
  await thawStore().catch(() => undefined);
  if (base) await killQemuUnder(base);
  if (loopMounted) {
    const res = await runProgram('umount', [loopDir!], { timeoutMs: 30_000 });
    if (res.code !== 0) await runProgram('umount', ['-l', loopDir!], { timeoutMs: 30_000 });
  }
  await small?.cleanup();
  if (base) await fs.rm(base, { recursive: true, force: true });
}, 120_000);

describe('live: the guest never waits for the image store (real Linux guest, writer running)', () => {
  it('(c) quiesce = required on a disk with a large base image: the freeze does not span a copy of the base', async () => {
    // A store on the host's disk (beside the guest's).
    const storeDir = path.join(base, 'c-images');
    await fs.mkdir(storeDir);
    // What copying the base into the store takes: the old start ran this very command inside the freeze.
    const baseCopy = path.join(storeDir, 'base-copy.raw');
    const t0 = performance.now();
    await run(QEMU_IMG, ['convert', '-q', '-f', 'qcow2', '-O', 'raw', baseImage, baseCopy]);
    const baseCopyMs = performance.now() - t0;
    await fs.rm(baseCopy);

    const imageId = randomUUID();
    // While the guest is still frozen (the step right after the job's start): how much of the image
    // is written. The old start had copied the whole base into it by then.
    let allocatedWhileFrozen: number | undefined;
    const { engine, store } = engineOn(hv, storeDir, 'required', async (step) => {
      if (step.name === 'thaw') allocatedWhileFrozen = (await fs.stat(store.partialPath(imageId))).blocks * 512;
    });
    const obs = await observeRunningGuest(guest.console, () => engine.take({ requestId: 'req-c', instanceUuid: guest.uuid, imageId, strategy: 'live' }));
    const result = obs.result;
    const image = await checkGuestImage(store.dataPath(imageId), path.join(base, `check-${imageId}`));
    report('live', 'large base, quiesce=required', { ...result, base_copy_ms: Math.round(baseCopyMs), allocated_while_frozen: allocatedWhileFrozen, observed: obs.guest, image });
    expect(result).toMatchObject({ status: 'active', strategy: 'live', quiesced: true, size: BASE_FS_END + BASE_EXTRA });
    expect(result.freeze_ms).toBeGreaterThan(0);
    // Nothing of the base (nor of anything else) was copied while the guest was frozen: the image's
    // file was still empty when the thaw came. (freeze_ms and the base copy's time are reported: the
    // freeze is the agent's freeze and thaw and the few ms of the switch, whatever the base's size.)
    expect(allocatedWhileFrozen).toBe(0);
    // The image: quiesced (no journal to replay), the writer's records intact to the point in time,
    // the base's data beyond the filesystem there.
    expect(image.cleanWithoutReplay).toBe(true);
    expect(image.records.problems).toEqual([]);
    expect(Number(image.records.last)).toBeGreaterThanOrEqual(obs.fsyncedBefore);
    expect(Number(image.records.last)).toBeLessThanOrEqual(obs.fsyncedAfter);
    const tail = await runProgram(QEMU_IO, ['-r', '-f', 'raw', '-c', `read -P 0x5b ${BASE_FS_END + BASE_EXTRA - MiB} ${MiB}`, store.dataPath(imageId)], { timeoutMs: 60_000 });
    expect(tail.stdout).toContain(`read ${MiB}/${MiB} bytes`);
    expect(tail.stdout + tail.stderr).not.toContain('Pattern verification failed');
    expect(obs.guest.writerErrors).toEqual([]);
    expect(await leftovers()).toEqual(NOTHING_LEFT);
    await store.delete(imageId);
  }, 300_000);

  it('(b) the store frozen during the copy: the guest writes on at its idle latency, no stop; the snapshot completes after the thaw and the image is right', async () => {
    const storeDir = path.join(loopDir!, 'images');
    // The reference: the same writer, idle, right before, over a window as long as the stall.
    const idleFrom = await guest.console.mark();
    await sleep(STALL_MS);
    await guest.console.waitForFsynced(await guest.console.mark());
    const idleEvents = await guest.console.events(idleFrom);
    const idle = { ...observed(idleEvents), rate: writerRate(idleEvents) };
    expect(idle.writerErrors).toEqual([]);
    expect(idle.rate).toBeGreaterThan(10); // it writes (not vacuous)
    expect(idle.writerMaxMs).toBeGreaterThan(0);

    // The copy rate-limited, as an operator would (and so that the copy after the thaw does not take
    // the host's CPUs from the guest: what is measured here is waiting for the store).
    const limited = new QemuHypervisor({ ...hvOptions, runningExportSpeed: COPY_SPEED });

    let fleece = '';
    let partial = '';
    let thawed: Promise<void> | undefined;
    const marks = { frozen: 0, thawing: 0 };
    const during = { fleeceAtFreeze: 0, fleeceAtThaw: 0, partialAtFreeze: -1, partialAtThaw: -1, copiesAtThaw: [] as number[] };
    const imageId = randomUUID();
    // Right before the copy begins (the point in time taken): the store freezes for STALL_MS.
    const beforeStep: BeforeStep = async (step) => {
      if (step.name !== 'wait-backup') return;
      fleece = await fleeceFile();
      partial = store.partialPath(imageId);
      await freezeStore();
      marks.frozen = await guest.console.mark();
      during.fleeceAtFreeze = await allocated(fleece);
      during.partialAtFreeze = await allocated(partial);
      thawed = sleep(STALL_MS).then(async () => {
        during.fleeceAtThaw = await allocated(fleece);
        during.partialAtThaw = await allocated(partial);
        during.copiesAtThaw = await copyProcesses();
        marks.thawing = await guest.console.mark();
        await thawStore();
      });
    };
    const { engine, store } = engineOn(limited, storeDir, 'off', beforeStep);
    const watch = await watchQmpEvents(limited, guest.uuid);
    const obs = await observeRunningGuest(guest.console, () => engine.take({ requestId: 'req-b', instanceUuid: guest.uuid, imageId, strategy: 'live' }), 120_000).finally(
      async () => {
        await thawed?.catch(() => undefined);
        await thawStore();
        await watch.stop();
      },
    );
    const result = obs.result;
    // While the store was frozen: what the writer completed, and how many records it fsynced.
    const stallEvents = await guest.console.events(marks.frozen, marks.thawing);
    const stall = { ...observed(stallEvents), rate: writerRate(stallEvents) };
    const image = await checkGuestImage(store.dataPath(imageId), path.join(base, `check-${imageId}`));
    // The bound: a few × the idle max, plus what a busy host adds to one write
    // (HOST_STALL_ALLOWANCE_MS), plus the time the host did not run the guest at all in the window
    // (the probe's gaps: its clock jumped; a store the guest waited for stops its I/O, never its vCPU).
    const hostGapsMs = stall.gaps.reduce((a, b) => a + b, 0);
    const bound = 3 * idle.writerMaxMs + HOST_STALL_ALLOWANCE_MS + hostGapsMs;
    report('live', `store frozen ${STALL_MS} ms`, {
      ...result,
      idle: { writer_max_ms: idle.writerMaxMs, records_per_s: idle.rate, gaps: idle.gaps },
      stall: { writer_max_ms: stall.writerMaxMs, records_per_s: stall.rate, bound_ms: bound, gaps: stall.gaps, stops: stall.stops },
      during,
      observed: obs.guest,
      image,
    });

    // The stall was real and during the copy: the copy was running and the store took nothing while
    // frozen. (How much the fleece image grew meanwhile is reported, not asserted: copy-before-write
    // of a cluster the guest had never written copies zeros, which qcow2 records without a byte of
    // data, and QEMU keeps the fleece's metadata in memory, so neither its size nor `qemu-img map`
    // shows every copy.)
    expect(marks.thawing).toBeGreaterThan(marks.frozen);
    expect(during.copiesAtThaw).toHaveLength(1);
    expect(during.partialAtThaw).toBe(during.partialAtFreeze);
    expect(result.duration_ms).toBeGreaterThanOrEqual(STALL_MS);

    // The guest never waited for the store. While it was frozen the guest wrote on at a good part
    // of its idle rate (a guest held by the store fsyncs nothing), its longest write+fsync within
    // the bound; and no write of the whole operation took anything like the stall (a write held
    // by the store completes only after the thaw, having taken the whole stall).
    expect(bound).toBeLessThan(STALL_MS / 2);
    expect(stall.rate).toBeGreaterThanOrEqual(idle.rate / 3);
    expect(stall.writerMaxMs).toBeGreaterThan(0);
    expect(stall.writerMaxMs).toBeLessThanOrEqual(bound);
    expect(obs.guest.writerMaxMs).toBeLessThan(STALL_MS / 2);
    expect(obs.guest.writerErrors).toEqual([]);
    expect(obs.guest.stops.filter((ms) => ms >= PROBE_NOISE_MS)).toEqual([]);
    expect(watch.events.filter((e) => ['STOP', 'BLOCK_IO_ERROR'].includes(e.event))).toEqual([]);
    expect((await hv.info(guest.uuid)).state).toBe('running');

    // The snapshot completed after the thaw; the image is the disk at one point in time.
    expect(result).toMatchObject({ status: 'active', strategy: 'live', quiesced: false });
    expect((await store.verify(imageId)).ok).toBe(true);
    expect(image.cleanAfterReplay).toBe(true);
    expect(image.records.problems).toEqual([]);
    expect(Number(image.records.last)).toBeGreaterThanOrEqual(obs.fsyncedBefore);
    expect(Number(image.records.last)).toBeLessThanOrEqual(obs.fsyncedAfter);
    expect(await leftovers()).toEqual(NOTHING_LEFT);
    expect(await copyProcesses()).toEqual([]);
    expect(await writerPasses(guest, obs.fsyncedAfter)).toBeGreaterThan(obs.fsyncedAfter);
    await store.delete(imageId);
  }, 300_000);

  it('(a) the store fills during the copy: the snapshot fails naming the cause, nothing partial or left behind; the guest writes on, no error, no stop', async () => {
    const storeDir = path.join(small!.path, 'images');
    const { engine, store } = engineOn(hv, storeDir, 'off');
    const imageId = randomUUID();
    const watch = await watchQmpEvents(hv, guest.uuid);
    const obs = await observeRunningGuest(guest.console, () =>
      engine.take({ requestId: 'req-a', instanceUuid: guest.uuid, imageId, strategy: 'live' }).then(
        () => undefined,
        (e: unknown) => e,
      ),
    ).finally(() => watch.stop());
    const err = obs.result;
    report('live', `store full (${SMALL_STORE_MB} MiB tmpfs)`, { error: (err as Error | undefined)?.message, observed: obs.guest });

    expect(err).toBeInstanceOf(SnapshotFailed);
    expect((err as Error).message).toMatch(/\(wait-backup\) failed: /);
    expect((err as Error).message).toMatch(NO_SPACE);
    const meta = await store.show(imageId);
    expect(meta.status).toBe('killed');
    await expect(fs.access(store.partialPath(imageId))).rejects.toThrow(/ENOENT/);
    await expect(fs.access(store.dataPath(imageId))).rejects.toThrow(/ENOENT/);
    expect(await fs.readdir(path.dirname(store.partialPath(imageId)))).toEqual([]);
    expect(await small!.freeBytes()).toBeGreaterThan((SMALL_STORE_MB - 2) * MiB);

    // The guest: running, its writer never saw an error, no stop, no I/O error event.
    expect(watch.events.filter((e) => ['STOP', 'BLOCK_IO_ERROR'].includes(e.event))).toEqual([]);
    expect((await hv.info(guest.uuid)).state).toBe('running');
    expect(obs.guest.writerErrors).toEqual([]);
    expect(obs.guest.stops.filter((ms) => ms >= PROBE_NOISE_MS)).toEqual([]);
    expect(await writerPasses(guest, obs.fsyncedAfter)).toBeGreaterThan(obs.fsyncedAfter);
    // Nothing left: no node, export or filter in QEMU, no fleece file, no copy running.
    expect(await leftovers()).toEqual(NOTHING_LEFT);
    expect(await copyProcesses()).toEqual([]);
  }, 300_000);
});
