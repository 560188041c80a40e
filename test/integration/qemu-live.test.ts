import { createHash, randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestAgentError, InstanceInvalidState, QmpError } from '../../src/errors.js';
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
/** Throttle that keeps a job running while the test writes into the guest (lifted afterwards). */
const CRAWL = 1 * MiB;

interface BlockJobInfo {
  device: string;
  status: string;
  offset: number;
  len: number;
}

async function sha512OfFile(file: string): Promise<string> {
  const res = await runProgram('sha512sum', [file]);
  if (res.code !== 0) throw new Error(`sha512sum ${file} failed: ${res.stderr}`);
  return res.stdout.split(' ')[0]!;
}

/** `qemu-img compare` of two raw files: true when their contents are identical. */
async function rawIdentical(a: string, b: string): Promise<boolean> {
  const res = await runProgram(QEMU_IMG, ['compare', '-f', 'raw', '-F', 'raw', a, b]);
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

async function jobInfo(hv: QemuHypervisor, uuid: string, jobId: string): Promise<BlockJobInfo | undefined> {
  return (await hv.qmp<BlockJobInfo[]>(uuid, 'query-block-jobs')).find((j) => j.device === jobId);
}

async function nodeNames(hv: QemuHypervisor, uuid: string): Promise<string[]> {
  const nodes = await hv.qmp<{ 'node-name': string }[]>(uuid, 'query-named-block-nodes', { flat: true });
  return nodes.map((n) => n['node-name']);
}

/** Files the guest's QEMU has open. */
async function openFiles(pid: number): Promise<string[]> {
  const fds = await fs.readdir(`/proc/${pid}/fd`);
  const targets = await Promise.all(fds.map((fd) => fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')));
  return targets.filter((t) => t !== '');
}

/** Figures for the report (not assertions: this machine's speed is nobody's contract). */
const figures: Record<string, number> = {};

describe('live backup, guest agent and downtime against real QEMU', () => {
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

  it('backs up a running guest as of the job start: later writes absent from the image, present on the disk; vCPUs never stop', async () => {
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

    const slow = env.newHypervisor({ liveBackupSpeed: CRAWL });
    const watch = await watchQmpEvents(slow, uuid);
    const dest = path.join(env.tmpPath, 'live.raw');
    const before = Date.now();
    const job = await slow.startLiveBackup(uuid, dest);
    expect(job.startedAt).toBeGreaterThanOrEqual(before);
    expect(job.startedAt).toBeLessThan(Date.now() + 1); // event times carry microseconds, Date.now() whole ms
    expect(job.startPauseMs).toBeGreaterThanOrEqual(0);
    figures.startPauseMs = job.startPauseMs;

    const early = await jobInfo(slow, uuid, job.jobId);
    expect(early).toMatchObject({ status: 'running' });
    // Written after the start: over a region the job may have copied, over one it cannot have
    // copied yet (the last), and where the disk had nothing.
    await guestWrite(slow, uuid, 0xee, 0, MiB);
    await guestWrite(slow, uuid, 0xee, 15 * REGION_STRIDE, MiB);
    await guestWrite(slow, uuid, 0xee, DISK_SIZE - MiB, MiB);
    const late = await jobInfo(slow, uuid, job.jobId);
    // The writes overlapped the job.
    expect(late).toMatchObject({ status: 'running' });
    expect(late!.offset).toBeLessThan(late!.len);

    await slow.qmp(uuid, 'block-job-set-speed', { device: job.jobId, speed: 0 });
    const progress: number[] = [];
    await job.wait((f) => progress.push(f));
    const events = await watch.stop();

    expect(events.filter((e) => e.event === 'STOP')).toEqual([]);
    // The watch did see the job (not vacuous).
    expect(events.some((e) => e.event === 'BLOCK_JOB_COMPLETED' && e.data?.device === job.jobId)).toBe(true);
    expect((await hv.info(uuid)).state).toBe('running');
    expect(progress.at(-1)).toBe(1);
    expect(progress.every((f, i) => i === 0 || f >= progress[i - 1]!)).toBe(true);

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

    // The job and its target are gone from QEMU, which has let go of the file.
    expect(await hv.qmp(uuid, 'query-block-jobs')).toEqual([]);
    expect(await nodeNames(hv, uuid)).not.toContain(job.nodeName);
    expect(await openFiles((await guestPid(env.instancesPath, uuid))!)).not.toContain(dest);
    await fs.rm(reference);
    await fs.rm(dest);
  });

  it('cancel stops a running job: guest running, node removed, file released and left to the caller', async () => {
    const slow = env.newHypervisor({ liveBackupSpeed: CRAWL });
    const dest = path.join(env.tmpPath, 'cancelled.raw');
    const job = await slow.startLiveBackup(uuid, dest);
    const pid = (await guestPid(env.instancesPath, uuid))!;
    expect(await nodeNames(hv, uuid)).toContain(job.nodeName);
    expect(await openFiles(pid)).toContain(dest);
    expect(await jobInfo(hv, uuid, job.jobId)).toMatchObject({ status: 'running' });

    const waiting = job.wait().catch((e: unknown) => e);
    await job.cancel();
    await job.cancel();
    const err = await waiting;
    expect(err).toBeInstanceOf(QmpError);
    expect((err as Error).message).toMatch(/cancelled/);

    expect((await hv.info(uuid)).state).toBe('running');
    expect(await hv.qmp(uuid, 'query-block-jobs')).toEqual([]);
    expect(await nodeNames(hv, uuid)).not.toContain(job.nodeName);
    expect(await openFiles(pid)).not.toContain(dest);
    expect((await fs.stat(dest)).isFile()).toBe(true);
    await fs.rm(dest);
  });

  it('a job ended by someone else fails wait() and is cleaned up; the next backup has the later writes', async () => {
    const slow = env.newHypervisor({ liveBackupSpeed: CRAWL });
    const dest = path.join(env.tmpPath, 'interrupted.raw');
    const job = await slow.startLiveBackup(uuid, dest);
    await hv.qmp(uuid, 'job-cancel', { id: job.jobId });
    const err = await job.wait().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpError);
    expect((err as QmpError).errorClass).toBe('JobFailed');
    expect(await nodeNames(hv, uuid)).not.toContain(job.nodeName);
    await fs.rm(dest);

    const full = path.join(env.tmpPath, 'full.raw');
    const next = await hv.startLiveBackup(uuid, full);
    await next.wait();
    expect(allBytes(await readRange(full, 15 * REGION_STRIDE, MiB), 0xee)).toBe(true);
    expect(allBytes(await readRange(full, 15 * REGION_STRIDE + MiB, MiB), regionPattern(15))).toBe(true);
    expect(allBytes(await readRange(full, DISK_SIZE - MiB, MiB), 0xee)).toBe(true);
    await fs.rm(full);
  });

  it('a 4 GiB disk holding 64 MiB gives an image taking at most 80 MiB, identical to the disk', async () => {
    const big = await createGuest(hv, { name: 'big', diskSizeBytes: 4 * GiB });
    await writeRegions(hv, big, 256 * MiB);
    const dest = path.join(env.tmpPath, 'big.raw');
    const t0 = performance.now();
    const job = await hv.startLiveBackup(big, dest);
    await job.wait();
    figures.backupMiBPerSec = 64 / ((performance.now() - t0) / 1000);
    figures.bigStartPauseMs = job.startPauseMs;
    expect((await fs.stat(dest)).size).toBe(4 * GiB);
    figures.bigImageAllocatedMiB = (await allocatedBytes(dest)) / MiB;
    expect(await allocatedBytes(dest)).toBeLessThanOrEqual(80 * MiB);
    // Nothing wrote to the disk since the start (the guest has no OS): the offline disk is the reference.
    await hv.stop(big, { graceful: false });
    const res = await runProgram(QEMU_IMG, ['compare', '-f', 'raw', '-F', 'qcow2', dest, path.join(env.instancesPath, big, 'disk')]);
    expect(res.stdout.trim()).toBe('Images are identical.');
    expect(res.code).toBe(0);
    await hv.deleteInstance(big);
    await fs.rm(dest);
  });

  it('a disk on a backing image: the image holds the backing data too, as of the start, and stays sparse', async () => {
    const base = path.join(env.tmpPath, 'base.qcow2');
    expect((await runProgram(QEMU_IMG, ['create', '-q', '-f', 'qcow2', base, String(64 * MiB)])).code).toBe(0);
    const io = await runProgram(QEMU_IO, [
      '-f', 'qcow2',
      '-c', `write -P 0x31 0 ${2 * MiB}`,
      '-c', `write -P 0x32 ${8 * MiB} ${2 * MiB}`,
      '-c', `write -P 0x33 ${60 * MiB} ${4 * MiB}`,
      base,
    ]);
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
    const slow = env.newHypervisor({ liveBackupSpeed: CRAWL });
    const job = await slow.startLiveBackup(child, dest);
    await guestWrite(slow, child, 0xee, 60 * MiB, MiB);
    await guestWrite(slow, child, 0xee, 20 * MiB, MiB);
    expect(await jobInfo(slow, child, job.jobId)).toMatchObject({ status: 'running' });
    await slow.qmp(child, 'block-job-set-speed', { device: job.jobId, speed: 0 });
    await job.wait();

    const image = await fs.readFile(dest);
    expect(image.length).toBe(64 * MiB);
    expect(createHash('sha512').update(image).digest('hex')).toBe(createHash('sha512').update(expected).digest('hex'));
    expect(await allocatedBytes(dest)).toBeLessThanOrEqual(16 * MiB);
    expect(await guestDiskHasPattern(hv, child, 0xee, 60 * MiB, MiB)).toBe(true);
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

      // A freeze answered too late: reported as failed, and the guest is thawed right away.
      responder.delayMs.set('guest-fsfreeze-freeze', 300);
      const err = await withAgent.freezeFilesystems(uuid, 200).catch((e: unknown) => e);
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
      await responder.close();
    }
  });
});
