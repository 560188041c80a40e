import { createHash, randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { processesWhere } from '../../src/util/processes.js';
import { GuestAgentError, InstanceBusy, InstanceInvalidState, QemuImgError, QmpError, QmpTimeout } from '../../src/errors.js';
import { DISK_NODE, DISK_QOM_PATH } from '../../src/hypervisor/qemu/launch.js';
import { FLEECE_PREFIX, fleecing } from '../../src/hypervisor/qemu/live-backup.js';
import type { QemuHypervisor } from '../../src/hypervisor/qemu/qemu-hypervisor.js';
import { runProgram } from '../../src/util/exec.js';
import { GuestAgentResponder } from '../helpers/guest-agent-responder.js';
import {
  MiB,
  QEMU_IMG,
  QEMU_IO,
  createGuest,
  guestDiskHasPattern,
  guestPid,
  guestWrite,
  guestWriteZeroes,
  makeQemuEnv,
  watchQmpEvents,
  type QemuEnv,
} from '../helpers/qemu-guest.js';

const GiB = 1024 * MiB;
/** The main guest's disk: 1 GiB virtual, 64 MiB of data in 16 regions of 4 MiB, 64 MiB apart. */
const DISK_SIZE = 1 * GiB;
const REGION = 4 * MiB;
const REGION_STRIDE = 64 * MiB;
const regionPattern = (i: number) => 0x10 + i;

async function writeRegions(hv: QemuHypervisor, uuid: string, stride: number): Promise<void> {
  for (let i = 0; i < 16; i++) await guestWrite(hv, uuid, regionPattern(i), i * stride, REGION);
}
/**
 * Copy rate (qemu-img convert -r, bytes of data per second; holes cost nothing) that keeps a copy
 * going for seconds while the test writes into the guest: 64 MiB of data take 8 s.
 */
const CRAWL = 8 * MiB;

/** `query-block-exports` entry. */
interface BlockExport {
  id: string;
  'node-name': string;
}

async function sha512OfFile(file: string): Promise<string> {
  const res = await runProgram('sha512sum', [file], { timeoutMs: 60_000 });
  if (res.code !== 0) throw new Error(`sha512sum ${file} failed: ${res.stderr}`);
  return res.stdout.split(' ')[0]!;
}

/** `qemu-img compare` of two raw files: true when their contents are identical. */
async function rawIdentical(a: string, b: string): Promise<boolean> {
  const res = await runProgram(QEMU_IMG, ['compare', '-f', 'raw', '-F', 'raw', a, b], { timeoutMs: 60_000 });
  if (res.code > 1) throw new Error(`qemu-img compare failed: ${res.stderr}`);
  return res.code === 0;
}

async function allocatedBytes(file: string): Promise<number> {
  return (await fs.stat(file)).blocks * 512;
}

async function readRange(file: string, offset: number, len: number): Promise<Buffer> {
  const fh = await fs.open(file, 'r');
  try {
    const buf = Buffer.alloc(len);
    await fh.read(buf, 0, len, offset);
    return buf;
  } finally {
    await fh.close();
  }
}

const allBytes = (buf: Buffer, value: number) => buf.every((b) => b === value);

async function nodeNames(hv: QemuHypervisor, uuid: string): Promise<string[]> {
  const nodes = await hv.qmp<{ 'node-name': string }[]>(uuid, 'query-named-block-nodes', { flat: true });
  return nodes.map((n) => n['node-name']);
}

/** The node the guest's disk device is attached to (its I/O goes through it). */
async function deviceDrive(hv: QemuHypervisor, uuid: string): Promise<string> {
  return hv.qmp<string>(uuid, 'qom-get', { path: DISK_QOM_PATH, property: 'drive' });
}

/** Files the process has open. */
async function openFiles(pid: number): Promise<string[]> {
  const fds = await fs.readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
  const targets = await Promise.all(fds.map((fd) => fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')));
  return targets.filter((t) => t !== '');
}

/** Pids of processes (qemu-img) whose argv names this NBD socket. */
async function readersOf(socket: string): Promise<number[]> {
  return (await processesWhere((argv) => argv.some((a) => a.endsWith(`?socket=${socket}`)))).map((p) => p.pid);
}

/**
 * Turns of the event loop (socket I/O goes on; no timer is involved, so faked timers do not matter)
 * until `cond` holds. The deadline only ends a test that is failing anyway.
 */
async function turnsUntil(what: string, cond: () => boolean): Promise<void> {
  const deadline = Date.now() + 30_000;
  do {
    if (Date.now() > deadline) throw new Error(`no ${what} within 30 s`);
    await new Promise<void>((r) => setImmediate(r));
  } while (!cond());
}

async function waitFor(what: string, timeoutMs: number, check: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`no ${what} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * What a live backup leaves in the guest's QEMU and the instance's folder: our nodes, exports and
 * files, the node the device is attached to, block jobs, whether an NBD server runs.
 */
async function leftovers(hv: QemuHypervisor, instancesPath: string, uuid: string) {
  const exports = await hv.qmp<BlockExport[]>(uuid, 'query-block-exports');
  // No query for the NBD server: stopping it answers "not running" when there is none.
  const nbdServer = await hv.qmp(uuid, 'nbd-server-stop').then(
    () => 'was running',
    (err: unknown) => (/not running/.test((err as Error).message) ? 'none' : `error: ${(err as Error).message}`),
  );
  return {
    nodes: (await nodeNames(hv, uuid)).filter((n) => n.startsWith(FLEECE_PREFIX)),
    exports: exports.map((e) => e.id),
    drive: await deviceDrive(hv, uuid),
    jobs: await hv.qmp<unknown[]>(uuid, 'query-block-jobs'),
    nbdServer,
    files: (await fs.readdir(path.join(instancesPath, uuid))).filter((n) => n.startsWith(FLEECE_PREFIX)),
  };
}

const NOTHING_LEFT = { nodes: [], exports: [], drive: DISK_NODE, jobs: [], nbdServer: 'none', files: [] };

/** Figures for the report (not assertions: this machine's speed is nobody's contract). */
const figures: Record<string, number> = {};

describe('live backup (fleecing + pull), guest agent and downtime against real QEMU', () => {
  let env: QemuEnv;
  let hv: QemuHypervisor;
  let uuid: string;
  let disk: string;

  beforeAll(async () => {
    env = await makeQemuEnv();
    hv = env.hv;
    uuid = await createGuest(hv, { name: 'live', diskSizeBytes: DISK_SIZE });
    disk = path.join(env.instancesPath, uuid, 'disk');
    await writeRegions(hv, uuid, REGION_STRIDE);
  });

  afterAll(async () => {
    await env?.cleanup();
    console.info(`[qemu-live] figures: ${JSON.stringify(figures)}`);
  });

  it('backs up a running guest as of the start: later writes absent from the image, present on the disk; the store never in QEMU; vCPUs never stop', async () => {
    // Reference: the disk as it is now, read offline while the guest is managed-saved. The guest
    // has no OS: nothing but this test writes to its disk.
    const saved = await hv.managedSave(uuid);
    const reference = path.join(env.tmpPath, 'reference.raw');
    await env.qemuImg.convertToRaw(disk, reference);
    const resumed = await hv.resume(uuid);
    expect(resumed.state).toBe('running');
    expect(saved.vcpusStoppedAt).toBeLessThan(resumed.vcpusResumedAt!);
    figures.saveResumeDowntimeMs = resumed.vcpusResumedAt! - saved.vcpusStoppedAt!;
    figures.savedStateBytes = saved.bytes!;

    const slow = env.newHypervisor({ runningExportSpeed: CRAWL });
    const watch = await watchQmpEvents(slow, uuid);
    const dest = path.join(env.tmpPath, 'live.raw');
    const before = Date.now();
    const callStart = performance.now();
    const job = await slow.startLiveBackup(uuid, dest);
    const callMs = performance.now() - callStart;
    expect(job.startedAt).toBeGreaterThanOrEqual(before);
    expect(job.startedAt).toBeLessThanOrEqual(Date.now());
    // The switch of the device onto the filter, timed around its QMP round trip: some time (a round
    // trip to QEMU is never free; 0 would mean it was not measured), and a part of the start's.
    expect(job.startPauseMs).toBeGreaterThan(0);
    expect(job.startPauseMs).toBeLessThan(callMs);
    figures.startPauseMs = job.startPauseMs;
    figures.startMs = job.startedAt - before;

    // The fleecing: the device on our filter, the view exported, the fleece image in the instance's
    // folder and open in QEMU; the store's file is not (QEMU never writes the store).
    const f = job.fleecing;
    const qemuPid = (await guestPid(env.instancesPath, uuid))!;
    expect(path.dirname(f.imageFile)).toBe(path.join(env.instancesPath, uuid));
    expect(await slow.qmp<string>(uuid, 'qom-get', { path: DISK_QOM_PATH, property: 'drive' })).toBe(f.cbwNode);
    expect(await slow.qmp<BlockExport[]>(uuid, 'query-block-exports')).toEqual([
      expect.objectContaining({ id: f.id, 'node-name': f.accessNode }),
    ]);
    expect(await openFiles(qemuPid)).toContain(f.imageFile);
    expect(await openFiles(qemuPid)).not.toContain(dest);
    expect((await fs.stat(f.socket)).isSocket()).toBe(true);

    const progress: number[] = [];
    let finished = false;
    const waiting = job.wait((p) => progress.push(p)).finally(() => (finished = true));
    await waitFor('qemu-img reading the export', 10_000, async () => (await readersOf(f.socket)).length === 1);
    // Written during the copy: over a region the copy may have read, over one it cannot have read
    // yet (the last), and where the disk had nothing.
    await guestWrite(slow, uuid, 0xee, 0, MiB);
    await guestWrite(slow, uuid, 0xee, 15 * REGION_STRIDE, MiB);
    await guestWrite(slow, uuid, 0xee, DISK_SIZE - MiB, MiB);
    // The writes overlapped the copy (not vacuous).
    expect(finished).toBe(false);
    expect(await readersOf(f.socket)).toHaveLength(1);
    await waiting;
    const events = await watch.stop();

    expect(events.filter((e) => e.event === 'STOP' || e.event === 'BLOCK_IO_ERROR')).toEqual([]);
    expect((await hv.info(uuid)).state).toBe('running');
    expect(progress.at(-1)).toBe(1);
    expect(progress.length).toBeGreaterThan(2);
    expect(progress.every((p, i) => i === 0 || p >= progress[i - 1]!)).toBe(true);

    // The image is the disk as of the start, bit for bit.
    const st = await fs.stat(dest);
    expect(st.size).toBe(DISK_SIZE);
    expect(st.mode & 0o777).toBe(0o640);
    expect(await rawIdentical(reference, dest)).toBe(true);
    const [imageHash, referenceHash] = await Promise.all([sha512OfFile(dest), sha512OfFile(reference)]);
    expect(imageHash).toBe(referenceHash);
    expect(allBytes(await readRange(dest, 15 * REGION_STRIDE, MiB), regionPattern(15))).toBe(true);
    expect(allBytes(await readRange(dest, DISK_SIZE - MiB, MiB), 0)).toBe(true);
    expect(await allocatedBytes(dest)).toBeLessThanOrEqual(80 * MiB);

    // The later writes are on the disk.
    expect(await guestDiskHasPattern(hv, uuid, 0xee, 0, MiB)).toBe(true);
    expect(await guestDiskHasPattern(hv, uuid, 0xee, 15 * REGION_STRIDE, MiB)).toBe(true);
    expect(await guestDiskHasPattern(hv, uuid, 0xee, DISK_SIZE - MiB, MiB)).toBe(true);

    // Torn down: the device back on the disk node, no node, export, server, file or reader left.
    expect(await leftovers(hv, env.instancesPath, uuid)).toEqual(NOTHING_LEFT);
    expect(await readersOf(f.socket)).toEqual([]);
    expect(await openFiles(qemuPid)).not.toContain(f.imageFile);
    await fs.rm(reference);
    await fs.rm(dest);
  });

  it('cancel stops the copy: guest running, everything torn down, the target left to the caller', async () => {
    const slow = env.newHypervisor({ runningExportSpeed: CRAWL });
    const dest = path.join(env.tmpPath, 'cancelled.raw');
    const job = await slow.startLiveBackup(uuid, dest);
    expect(await nodeNames(hv, uuid)).toEqual(expect.arrayContaining([job.fleecing.imageNode, job.fleecing.cbwNode, job.fleecing.accessNode]));

    const waiting = job.wait().catch((e: unknown) => e);
    await waitFor('qemu-img reading the export', 10_000, async () => (await readersOf(job.fleecing.socket)).length === 1);
    await job.cancel();
    await job.cancel();
    const err = await waiting;
    expect(err).toBeInstanceOf(QemuImgError);
    expect((err as Error).message).toMatch(/cancelled/);

    expect((await hv.info(uuid)).state).toBe('running');
    expect(await leftovers(hv, env.instancesPath, uuid)).toEqual(NOTHING_LEFT);
    expect(await readersOf(job.fleecing.socket)).toEqual([]);
    expect((await fs.stat(dest)).isFile()).toBe(true);
    await fs.rm(dest);

    // Cancelled before its copy began: wait() fails at once, nothing is left either.
    const early = await slow.startLiveBackup(uuid, dest);
    await early.cancel();
    await expect(early.wait()).rejects.toThrow(/cancelled/);
    expect(await leftovers(hv, env.instancesPath, uuid)).toEqual(NOTHING_LEFT);
    await fs.rm(dest);
  });

  it('an export ended by someone else fails wait() with the cause and is cleaned up; the next backup has the later writes', async () => {
    const slow = env.newHypervisor({ runningExportSpeed: CRAWL });
    const dest = path.join(env.tmpPath, 'interrupted.raw');
    const job = await slow.startLiveBackup(uuid, dest);
    const waiting = job.wait().catch((e: unknown) => e);
    await waitFor('qemu-img reading the export', 10_000, async () => (await readersOf(job.fleecing.socket)).length === 1);
    await hv.qmp(uuid, 'block-export-del', { id: job.fleecing.id, mode: 'hard' });
    const err = await waiting;
    expect(err).toBeInstanceOf(QemuImgError);
    expect((err as Error).message).toMatch(/^live backup: /);
    expect(await leftovers(hv, env.instancesPath, uuid)).toEqual(NOTHING_LEFT);
    await fs.rm(dest);

    const full = path.join(env.tmpPath, 'full.raw');
    const next = await hv.startLiveBackup(uuid, full);
    await next.wait();
    expect(allBytes(await readRange(full, 15 * REGION_STRIDE, MiB), 0xee)).toBe(true);
    expect(allBytes(await readRange(full, 15 * REGION_STRIDE + MiB, MiB), regionPattern(15))).toBe(true);
    expect(allBytes(await readRange(full, DISK_SIZE - MiB, MiB), 0xee)).toBe(true);
    await fs.rm(full);
  });

  it('a start command that fails (an NBD server already runs) leaves nothing, and the server it found is not ours to stop', async () => {
    const theirs = path.join(env.tmpPath, 'theirs.nbd');
    const baseline = await nodeNames(hv, uuid);
    await hv.qmp(uuid, 'nbd-server-start', { addr: { type: 'unix', data: { path: theirs } } });
    const dest = path.join(env.tmpPath, 'refused.raw');
    const err = await hv.startLiveBackup(uuid, dest).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpError);
    expect((err as QmpError).command).toBe('nbd-server-start');
    expect(await nodeNames(hv, uuid)).toEqual(baseline);
    expect(await deviceDrive(hv, uuid)).toBe(DISK_NODE);
    expect((await fs.readdir(path.join(env.instancesPath, uuid))).filter((n) => n.startsWith(FLEECE_PREFIX))).toEqual([]);
    // Their server still runs (stopping it works), and then nothing of ours is left either.
    expect((await fs.stat(theirs)).isSocket()).toBe(true);
    expect(await hv.qmp(uuid, 'nbd-server-stop')).toEqual({});
    expect(await leftovers(hv, env.instancesPath, uuid)).toEqual(NOTHING_LEFT);
    expect((await hv.info(uuid)).state).toBe('running');
    await fs.rm(dest, { force: true });
  });

  it.each(['switch-drive', 'export'] as const)(
    'a start command that times out (QEMU stalled before %s) is torn down once QEMU answers: no filter in the I/O path, nothing copying',
    async (stallBefore) => {
      const pid = (await guestPid(env.instancesPath, uuid))!;
      const QMP_TIMEOUT = 2000;
      let stopped = false;
      let resumedBy: 'the timeout' | 'the test' | undefined;
      const resume = (by: NonNullable<typeof resumedBy>): void => {
        if (!stopped || resumedBy !== undefined) return;
        resumedBy = by;
        process.kill(pid, 'SIGCONT');
      };
      // QEMU runs again on the event itself, not after a guessed delay: the start's command has
      // timed out, and the teardown (logged just before it) has sent nothing yet.
      const log = pino(
        { level: 'warn' },
        {
          write: (line: string) => {
            if (line.includes('live backup start failed: tearing down what it set up')) resume('the timeout');
          },
        },
      );
      const stalling = env.newHypervisor({
        qmpTimeoutMs: QMP_TIMEOUT,
        log,
        liveBackupBeforeStartCommand: (step) => {
          if (step !== stallBefore) return;
          // QEMU's main loop stops: the next command gets no answer within the timeout, and takes
          // effect late, once QEMU runs again (after the timeout, before the teardown's commands).
          process.kill(pid, 'SIGSTOP');
          stopped = true;
        },
      });
      const dest = path.join(env.tmpPath, `timeout-${stallBefore}.raw`);
      try {
        const err = await stalling.startLiveBackup(uuid, dest).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(QmpTimeout);
        expect((err as Error).message).toMatch(stallBefore === 'switch-drive' ? /qom-set/ : /block-export-add/);
      } finally {
        resume('the test'); // whatever happened, the guest's QEMU must not stay stopped
      }
      expect(stopped).toBe(true);
      expect(resumedBy).toBe('the timeout');
      expect((await hv.info(uuid)).state).toBe('running');
      expect(await leftovers(hv, env.instancesPath, uuid)).toEqual(NOTHING_LEFT);
      // The guest writes straight to its disk again.
      await guestWrite(hv, uuid, 0x77, 32 * MiB, MiB);
      expect(await guestDiskHasPattern(hv, uuid, 0x77, 32 * MiB, MiB)).toBe(true);
      await fs.rm(dest, { force: true });
    },
  );

  it('recovery after a dead agent: its copy is killed, the fleecing undone, the device back on the disk node', async () => {
    const slow = env.newHypervisor({ runningExportSpeed: CRAWL });
    const dest = path.join(env.tmpPath, 'orphan.raw');
    const job = await slow.startLiveBackup(uuid, dest);
    // The copy runs; its agent is taken for dead: another hypervisor object settles what it left.
    const waiting = job.wait().catch((e: unknown) => e);
    await waitFor('qemu-img reading the export', 10_000, async () => (await readersOf(job.fleecing.socket)).length === 1);
    const [reader] = await readersOf(job.fleecing.socket);
    const actions = await env.newHypervisor().endInterruptedWork(uuid);
    expect(actions).toEqual([
      expect.stringMatching(new RegExp(`^killed the copy of live backup\\(s\\) ${job.fleecing.id} \\(pid ${reader}\\)$`)),
      expect.stringMatching(new RegExp(`^tore down live backup\\(s\\) ${job.fleecing.id} \\(.*switched the guest's disk device back from ${job.fleecing.cbwNode} to ${DISK_NODE}.*\\)$`)),
    ]);
    expect(await readersOf(job.fleecing.socket)).toEqual([]);
    expect(await waiting).toBeInstanceOf(Error);
    expect(await leftovers(hv, env.instancesPath, uuid)).toEqual(NOTHING_LEFT);
    expect((await hv.info(uuid)).state).toBe('running');
    // Nothing left to do the second time.
    expect(await env.newHypervisor().endInterruptedWork(uuid)).toEqual([]);
    await fs.rm(dest, { force: true });
  });

  it('a second backup while one is under way is refused (InstanceBusy) and leaves the first alone', async () => {
    const slow = env.newHypervisor({ runningExportSpeed: CRAWL });
    const first = await slow.startLiveBackup(uuid, path.join(env.tmpPath, 'first.raw'));
    const err = await hv.startLiveBackup(uuid, path.join(env.tmpPath, 'second.raw')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InstanceBusy);
    expect((err as Error).message).toContain(first.fleecing.cbwNode);
    expect(await deviceDrive(hv, uuid)).toBe(first.fleecing.cbwNode);
    expect(await hv.qmp<BlockExport[]>(uuid, 'query-block-exports')).toHaveLength(1);
    await first.cancel();
    expect(await leftovers(hv, env.instancesPath, uuid)).toEqual(NOTHING_LEFT);
    await fs.rm(path.join(env.tmpPath, 'first.raw'), { force: true });
    await fs.rm(path.join(env.tmpPath, 'second.raw'), { force: true });
  });

  it('a fleecing left in QEMU by a dead agent (no copy reading it) is torn down by the next backup, which succeeds', async () => {
    // Built by hand, as an agent that died right after the start would have left it.
    const dir = path.join(env.instancesPath, uuid);
    const f = fleecing(dir, `${FLEECE_PREFIX}deadbeef`);
    await env.qemuImg.create(f.imageFile, { sizeBytes: DISK_SIZE });
    await hv.qmp(uuid, 'blockdev-add', { driver: 'qcow2', 'node-name': f.imageNode, file: { driver: 'file', filename: f.imageFile } });
    await hv.qmp(uuid, 'nbd-server-start', { addr: { type: 'unix', data: { path: f.socket } } });
    await hv.qmp(uuid, 'blockdev-add', { driver: 'copy-before-write', 'node-name': f.cbwNode, file: DISK_NODE, target: f.imageNode, 'on-cbw-error': 'break-snapshot' });
    await hv.qmp(uuid, 'qom-set', { path: DISK_QOM_PATH, property: 'drive', value: f.cbwNode });
    await hv.qmp(uuid, 'blockdev-add', { driver: 'snapshot-access', 'node-name': f.accessNode, file: f.cbwNode });
    await hv.qmp(uuid, 'block-export-add', { type: 'nbd', id: f.id, 'node-name': f.accessNode, name: f.id, writable: false });
    expect(await deviceDrive(hv, uuid)).toBe(f.cbwNode);

    const dest = path.join(env.tmpPath, 'after-dead.raw');
    const job = await hv.startLiveBackup(uuid, dest);
    expect(job.fleecing.id).not.toBe(f.id);
    const nodes = await nodeNames(hv, uuid);
    expect(nodes.filter((n) => n.startsWith(f.id))).toEqual([]);
    await job.wait();
    expect(allBytes(await readRange(dest, 15 * REGION_STRIDE, MiB), 0xee)).toBe(true);
    expect(await leftovers(hv, env.instancesPath, uuid)).toEqual(NOTHING_LEFT);
    await fs.rm(dest);
  });

  it('a 4 GiB disk holding 64 MiB gives an image taking at most 80 MiB, identical to the disk', async () => {
    const big = await createGuest(hv, { name: 'big', diskSizeBytes: 4 * GiB });
    await writeRegions(hv, big, 256 * MiB);
    const dest = path.join(env.tmpPath, 'big.raw');
    const t0 = performance.now();
    const job = await hv.startLiveBackup(big, dest);
    figures.bigStartMs = performance.now() - t0;
    await job.wait();
    figures.backupMiBPerSec = 64 / ((performance.now() - t0) / 1000);
    figures.bigStartPauseMs = job.startPauseMs;
    expect((await fs.stat(dest)).size).toBe(4 * GiB);
    figures.bigImageAllocatedMiB = (await allocatedBytes(dest)) / MiB;
    expect(await allocatedBytes(dest)).toBeLessThanOrEqual(80 * MiB);
    // Nothing wrote to the disk since the start (the guest has no OS): the offline disk is the reference.
    await hv.stop(big, { graceful: false });
    const res = await runProgram(QEMU_IMG, ['compare', '-f', 'raw', '-F', 'qcow2', dest, path.join(env.instancesPath, big, 'disk')], { timeoutMs: 60_000 });
    expect(res.stdout.trim()).toBe('Images are identical.');
    expect(res.code).toBe(0);
    await hv.deleteInstance(big);
    await fs.rm(dest);
  });

  it('a disk on a backing image: the image holds the backing data too, as of the start, and stays sparse', async () => {
    const base = path.join(env.tmpPath, 'base.qcow2');
    expect((await runProgram(QEMU_IMG, ['create', '-q', '-f', 'qcow2', base, String(64 * MiB)], { timeoutMs: 30_000 })).code).toBe(0);
    const io = await runProgram(
      QEMU_IO,
      ['-f', 'qcow2', '-c', `write -P 0x31 0 ${2 * MiB}`, '-c', `write -P 0x32 ${8 * MiB} ${2 * MiB}`, '-c', `write -P 0x33 ${60 * MiB} ${4 * MiB}`, base],
      { timeoutMs: 30_000 },
    );
    expect(io.code).toBe(0);
    const child = randomUUID();
    await hv.createInstance({ uuid: child, name: 'on-base', memoryMb: 128, vcpus: 1, machine: 'pc', baseImage: base });
    await hv.start(child);
    await guestWrite(hv, child, 0x41, 1 * MiB, MiB);
    await guestWrite(hv, child, 0x42, 20 * MiB, MiB);
    await guestWriteZeroes(hv, child, 8 * MiB, MiB);

    const expected = Buffer.alloc(64 * MiB);
    expected.fill(0x31, 0, 2 * MiB).fill(0x32, 8 * MiB, 10 * MiB).fill(0x33, 60 * MiB, 64 * MiB);
    expected.fill(0x41, 1 * MiB, 2 * MiB).fill(0x42, 20 * MiB, 21 * MiB).fill(0, 8 * MiB, 9 * MiB);

    const dest = path.join(env.tmpPath, 'on-base.raw');
    // 1 MiB/s: the 10 MiB of data take seconds.
    const slow = env.newHypervisor({ runningExportSpeed: MiB });
    const job = await slow.startLiveBackup(child, dest);
    let finished = false;
    const waiting = job.wait().finally(() => (finished = true));
    await waitFor('qemu-img reading the export', 10_000, async () => (await readersOf(job.fleecing.socket)).length === 1);
    await guestWrite(slow, child, 0xee, 60 * MiB, MiB);
    await guestWrite(slow, child, 0xee, 20 * MiB, MiB);
    expect(finished).toBe(false);
    await waiting;

    const image = await fs.readFile(dest);
    expect(image.length).toBe(64 * MiB);
    expect(createHash('sha512').update(image).digest('hex')).toBe(createHash('sha512').update(expected).digest('hex'));
    expect(await allocatedBytes(dest)).toBeLessThanOrEqual(16 * MiB);
    expect(await guestDiskHasPattern(hv, child, 0xee, 60 * MiB, MiB)).toBe(true);
    expect(await leftovers(hv, env.instancesPath, child)).toEqual(NOTHING_LEFT);
    await hv.deleteInstance(child);
  });

  it('refuses to back up a guest without a QEMU process', async () => {
    const off = await createGuest(hv, { name: 'off', diskSizeBytes: MiB, start: false });
    const dest = path.join(env.tmpPath, 'off.raw');
    await expect(hv.startLiveBackup(off, dest)).rejects.toBeInstanceOf(InstanceInvalidState);
    await expect(fs.access(dest)).rejects.toThrow();
    expect(await hv.guestAgentAvailable(off, 100)).toBe(false);
    await expect(hv.freezeFilesystems(off, 100)).rejects.toBeInstanceOf(InstanceInvalidState);
    await hv.deleteInstance(off);
  });

  it('guest agent: none in the guest (it never opened its channel) → unavailable without waiting; a freeze asked anyway times out', async () => {
    const t0 = performance.now();
    // QEMU says the guest has not opened the port: no guest-sync is sent, so none can time out.
    expect(await hv.guestAgentAvailable(uuid, 60_000)).toBe(false);
    figures.noAgentDetectMs = performance.now() - t0;
    expect(figures.noAgentDetectMs).toBeLessThan(60_000);
    const err = await hv.freezeFilesystems(uuid, 300).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GuestAgentError);
    expect((err as Error).message).toMatch(/did not answer guest-sync-delimited within \d+ ms/);
    await expect(hv.thawFilesystems(uuid, 300)).rejects.toBeInstanceOf(GuestAgentError);
    expect((await hv.info(uuid)).state).toBe('running');
  });

  it('guest agent: with an agent answering → freeze and thaw report the filesystem counts', async () => {
    const responder = await GuestAgentResponder.listen(path.join(env.tmpPath, 'fake-qga.sock'), { filesystems: 2 });
    try {
      const withAgent = env.newHypervisor({ guestAgentSocket: () => responder.socketPath });
      expect(await withAgent.guestAgentAvailable(uuid, 1000)).toBe(true);
      expect(await withAgent.freezeFilesystems(uuid, 1000)).toBe(2);
      expect(responder.frozen).toBe(true);
      expect(await withAgent.thawFilesystems(uuid, 1000)).toBe(2);
      expect(responder.frozen).toBe(false);

      // A freeze answered too late: reported as failed, and the guest is thawed right away. The
      // timers (the client's timeouts, the agent's delay) are faked, the sockets real: the answer
      // comes after the timeout because the test says so, not because 300 ms outlast 200 on this machine.
      responder.delayMs.set('guest-fsfreeze-freeze', 300);
      vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
      let settled = false;
      const late = withAgent
        .freezeFilesystems(uuid, 200)
        .catch((e: unknown) => e)
        .finally(() => (settled = true));
      // The agent has the freeze (and sits on it): the client's 200 ms and the agent's 300 ms both run.
      await turnsUntil('the agent to take the second freeze', () => responder.received.filter((c) => c === 'guest-fsfreeze-freeze').length === 2);
      vi.advanceTimersByTime(199);
      await turnsUntil('a moment of I/O', () => true);
      expect(settled).toBe(false);
      expect(responder.frozen).toBe(false);
      vi.advanceTimersByTime(1); // the client gives up on the freeze and goes to thaw
      vi.advanceTimersByTime(100); // the agent freezes (late), then takes the thaw: nothing else times out
      const err = await late;
      vi.useRealTimers();
      expect(err).toBeInstanceOf(GuestAgentError);
      expect((err as Error).message).toMatch(/did not answer guest-fsfreeze-freeze within 200 ms \(thawed 2 afterwards\)$/);
      expect(responder.frozen).toBe(false);
      expect(responder.received.filter((c) => c !== 'guest-sync-delimited')).toEqual([
        'guest-fsfreeze-freeze',
        'guest-fsfreeze-thaw',
        'guest-fsfreeze-freeze',
        'guest-fsfreeze-thaw',
      ]);
    } finally {
      vi.useRealTimers();
      await responder.close();
    }
  });
});
