import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import { performance } from 'node:perf_hooks';
import { QemuImgError, QmpError, QmpTimeout, errorMessage } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { QemuImg } from '../../qemu-img/qemu-img.js';
import { runProgram } from '../../util/exec.js';
import type { BackupJob } from '../types.js';
import { DISK_NODE } from './launch.js';
import { eventTimeMs, type QmpClient } from './qmp.js';

/**
 * Point-in-time backup of a running guest's disk into a raw file, by the guest's own QEMU
 * (`blockdev-backup`): a copy-before-write filter goes above the disk, so that from the start on
 * every guest write first copies the old data to the target. No qcow2 metadata changes, no vCPU
 * stop; the guest's disk I/O is only drained while the job is set up.
 *
 * The job runs with `sync: top`, not `full`: a full sync writes the disk's unallocated (zero) areas
 * as explicit write-zeroes, which the file driver turns into allocated (unwritten) extents — a
 * 4 GiB disk holding 64 MiB became a 4 GiB file on ext4. With `top`, unallocated clusters are not
 * written at all and stay holes of the fresh sparse target. For a disk with no backing file that is
 * the whole disk; a disk with a backing file gets the backing chain copied into the target first
 * (the chain never changes while the guest runs: its writes go to the top layer).
 */

/** Job ids and target node names made here start so, to tell them from anyone else's. */
export const BACKUP_JOB_PREFIX = 'snapdrv-backup-';
export const BACKUP_NODE_PREFIX = 'snapdrv-target-';
const POLL_MS = 100;
const CANCEL_POLL_MS = 20;

export interface LiveBackupContext {
  /** Runs `fn` on the guest's QMP session; throws (InstanceInvalidState) once its QEMU is gone. */
  withQmp<T>(fn: (qmp: QmpClient) => Promise<T>): Promise<T>;
  /** Whether the guest's QEMU process (the one the job runs in) is still there. */
  alive(): Promise<boolean>;
  qemuImg: QemuImg;
  log: Logger;
  /** Bound on waiting for a cancelled job to end. */
  timeoutMs: number;
  /** Copy rate limit in bytes/s (QMP `speed`); unset or 0: unlimited. */
  speed?: number;
}

/** `query-block-jobs` entry (the fields used here). */
interface BlockJobInfo {
  device: string;
  status: string;
  offset: number;
  len: number;
  error?: string;
}

/** `query-named-block-nodes` entry (the fields used here). */
interface BlockNodeInfo {
  'node-name'?: string;
  image?: {
    'virtual-size': number;
    'backing-image'?: { filename: string; format: string };
  };
}

export async function startLiveBackup(ctx: LiveBackupContext, dest: string): Promise<QemuBackupJob> {
  const suffix = randomBytes(4).toString('hex');
  const jobId = `${BACKUP_JOB_PREFIX}${suffix}`;
  const nodeName = `${BACKUP_NODE_PREFIX}${suffix}`;

  const disk = await ctx.withQmp(async (qmp) => {
    await releaseLeftovers(qmp, ctx.log);
    const nodes = await qmp.execute<BlockNodeInfo[]>('query-named-block-nodes');
    const image = nodes.find((n) => n['node-name'] === DISK_NODE)?.image;
    if (!image) throw new QmpError('query-named-block-nodes', 'DeviceNotFound', `no block node ${DISK_NODE}`);
    return image;
  });
  await createTarget(ctx.qemuImg, dest, disk['virtual-size'], disk['backing-image']);

  return ctx.withQmp(async (qmp) => {
    await qmp.execute('blockdev-add', {
      driver: 'raw',
      'node-name': nodeName,
      // Zeros the guest wrote become holes too.
      discard: 'unmap',
      'detect-zeroes': 'unmap',
      file: { driver: 'file', filename: dest, discard: 'unmap' },
    });
    // QEMU stamps the job's creation, inside the drained section where the filter goes in.
    const created = qmp.waitForEvent('JOB_STATUS_CHANGE', (ev) => ev.data?.id === jobId && ev.data?.status === 'created', ctx.timeoutMs);
    created.catch(() => undefined);
    const args: Record<string, unknown> = { 'job-id': jobId, device: DISK_NODE, target: nodeName, sync: 'top', 'auto-dismiss': false };
    if (ctx.speed) args.speed = ctx.speed;
    const t0 = performance.now();
    try {
      await qmp.execute('blockdev-backup', args);
    } catch (err) {
      await qmp.execute('blockdev-del', { 'node-name': nodeName }).catch((e: unknown) =>
        ctx.log.warn({ err: errorMessage(e), node: nodeName }, 'cannot remove the backup target node'),
      );
      throw err;
    }
    const startPauseMs = performance.now() - t0;
    const answeredAt = Date.now();
    const startedAt = await created.then(eventTimeMs, () => answeredAt);
    ctx.log.info({ job_id: jobId, start_pause_ms: round(startPauseMs), backing: disk['backing-image']?.filename }, 'live backup started');
    return new QemuBackupJob(ctx, jobId, nodeName, dest, startedAt, startPauseMs);
  });
}

/** A running `blockdev-backup` job; polls its state (QMP is not held open between polls). */
export class QemuBackupJob implements BackupJob {
  private waiting: Promise<void> | undefined;
  private cancelling: Promise<void> | undefined;
  private releasing: Promise<void> | undefined;
  private cancelRequested = false;
  /** The job has concluded (and wait() is releasing it). */
  private concluded = false;

  constructor(
    private readonly ctx: LiveBackupContext,
    /** QMP job id (for block-job-set-speed and the like). */
    readonly jobId: string,
    /** Node name of the target in the guest's QEMU. */
    readonly nodeName: string,
    readonly dest: string,
    readonly startedAt: number,
    readonly startPauseMs: number,
  ) {}

  wait(onProgress?: (fraction: number) => void): Promise<void> {
    this.waiting ??= this.runWait(onProgress);
    return this.waiting;
  }

  cancel(): Promise<void> {
    this.cancelling ??= this.runCancel();
    return this.cancelling;
  }

  private async runWait(onProgress?: (fraction: number) => void): Promise<void> {
    let last = 0;
    const report = (f: number) => {
      if (f > last) last = f;
      onProgress?.(last);
    };
    for (;;) {
      const info = this.cancelRequested ? undefined : await this.ctx.withQmp((qmp) => queryJob(qmp, this.jobId));
      if (this.cancelRequested) {
        await this.cancelling;
        throw new QmpError('blockdev-backup', 'JobCancelled', `backup job ${this.jobId} was cancelled`);
      }
      if (info === undefined) {
        await this.release();
        throw new QmpError('blockdev-backup', 'JobVanished', `backup job ${this.jobId} is gone from the guest's QEMU`);
      }
      if (info.len > 0) report(Math.min(1, info.offset / info.len));
      if (info.status === 'concluded') {
        this.concluded = true;
        await this.release();
        if (info.error !== undefined) throw new QmpError('blockdev-backup', 'JobFailed', info.error);
        await fsyncFile(this.dest);
        report(1);
        this.ctx.log.info({ job_id: this.jobId, bytes: info.len }, 'live backup complete');
        return;
      }
      await sleep(POLL_MS);
    }
  }

  private async runCancel(): Promise<void> {
    this.cancelRequested = true;
    if (this.concluded) {
      await this.release();
      return;
    }
    try {
      await this.endJob();
    } catch (err) {
      // With its QEMU gone, the job and its hold on the file are gone too.
      if (!(await this.ctx.alive())) return;
      throw err;
    }
    await this.release();
    this.ctx.log.info({ job_id: this.jobId }, 'live backup cancelled');
  }

  /** job-cancel unless it has concluded, then waits until it has. */
  private async endJob(): Promise<void> {
    await this.ctx.withQmp(async (qmp) => {
      const info = await queryJob(qmp, this.jobId);
      if (info === undefined) return;
      if (info.status !== 'concluded') {
        await qmp.execute('job-cancel', { id: this.jobId }).catch((err: unknown) => {
          // It may have concluded meanwhile; the loop below finds out.
          this.ctx.log.debug({ err: errorMessage(err), job_id: this.jobId }, 'job-cancel failed');
        });
      }
      const deadline = Date.now() + this.ctx.timeoutMs;
      for (;;) {
        const now = await queryJob(qmp, this.jobId);
        if (now === undefined || now.status === 'concluded') return;
        if (Date.now() > deadline) throw new QmpTimeout(`backup job ${this.jobId} did not end within ${this.ctx.timeoutMs} ms of job-cancel`);
        await sleep(CANCEL_POLL_MS);
      }
    });
  }

  /** Dismisses the concluded job and removes the target node (QEMU closes the file). */
  private release(): Promise<void> {
    this.releasing ??= this.ctx.withQmp(async (qmp) => {
      await qmp.execute('job-dismiss', { id: this.jobId }).catch((err: unknown) => {
        this.ctx.log.debug({ err: errorMessage(err), job_id: this.jobId }, 'job-dismiss failed (job already gone?)');
      });
      await deleteNode(qmp, this.nodeName);
    });
    return this.releasing;
  }
}

/**
 * The target: a sparse raw file of the disk's virtual size, mode 0640 — holding the backing chain's
 * data when the disk has one (sync=top copies only the top layer).
 */
async function createTarget(
  qemuImg: QemuImg,
  dest: string,
  virtualSize: number,
  backing: { filename: string; format: string } | undefined,
): Promise<void> {
  if (backing !== undefined) {
    const args = ['convert', '-q', '-f', backing.format, '-O', 'raw', backing.filename, dest];
    const res = await runProgram(qemuImg.binary, args).catch((err: Error) => {
      throw new QemuImgError(`cannot run ${qemuImg.binary}: ${err.message}`, args);
    });
    if (res.code !== 0) {
      throw new QemuImgError(`copying the backing image ${backing.filename} failed: ${res.stderr.trim()}`, args, res.stderr);
    }
  }
  const fh = await fs.open(dest, backing !== undefined ? 'r+' : 'w', 0o640);
  try {
    await fh.chmod(0o640);
    await fh.truncate(virtualSize);
  } finally {
    await fh.close();
  }
}

/**
 * Cancels every backup job of ours in this QEMU, whatever its state, waits for each to end, and
 * releases them and their target nodes (QEMU closes the files). Only for a QEMU no other process of
 * ours works on (recovery after a crash). Resolves with the ids of the jobs found.
 */
export async function cancelOurBackupJobs(qmp: QmpClient, log: Logger, timeoutMs: number): Promise<string[]> {
  const ours = (await qmp.execute<BlockJobInfo[]>('query-block-jobs')).filter((j) => j.device.startsWith(BACKUP_JOB_PREFIX));
  for (const job of ours) {
    if (job.status === 'concluded') continue;
    await qmp.execute('job-cancel', { id: job.device }).catch((err: unknown) => {
      log.debug({ err: errorMessage(err), job_id: job.device }, 'job-cancel failed (concluded meanwhile?)');
    });
  }
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const left = (await qmp.execute<BlockJobInfo[]>('query-block-jobs')).filter(
      (j) => j.device.startsWith(BACKUP_JOB_PREFIX) && j.status !== 'concluded',
    );
    if (left.length === 0) break;
    if (Date.now() > deadline) throw new QmpTimeout(`backup jobs ${left.map((j) => j.device).join(', ')} did not end within ${timeoutMs} ms of job-cancel`);
    await sleep(CANCEL_POLL_MS);
  }
  await releaseLeftovers(qmp, log);
  return ours.map((j) => j.device);
}

/**
 * What an earlier run of the agent may have left in this QEMU (it died during a backup): concluded
 * jobs of ours are dismissed and our target nodes no job uses any more are removed, so QEMU lets go
 * of their files. A job of ours still running is left alone: another process may own it.
 */
async function releaseLeftovers(qmp: QmpClient, log: Logger): Promise<void> {
  for (const job of await qmp.execute<BlockJobInfo[]>('query-block-jobs')) {
    if (job.device.startsWith(BACKUP_JOB_PREFIX) && job.status === 'concluded') {
      await qmp.execute('job-dismiss', { id: job.device }).then(
        () => log.warn({ job_id: job.device }, 'dismissed a concluded backup job left behind'),
        (err: unknown) => log.debug({ err: errorMessage(err), job_id: job.device }, 'job-dismiss of a leftover failed'),
      );
    }
  }
  const nodes = await qmp.execute<BlockNodeInfo[]>('query-named-block-nodes', { flat: true });
  for (const name of nodes.map((n) => n['node-name'] ?? '')) {
    if (!name.startsWith(BACKUP_NODE_PREFIX)) continue;
    await qmp.execute('blockdev-del', { 'node-name': name }).then(
      () => log.warn({ node: name }, 'removed a backup target node left behind'),
      (err: unknown) => log.debug({ err: errorMessage(err), node: name }, 'backup target node still in use'),
    );
  }
}

async function queryJob(qmp: QmpClient, jobId: string): Promise<BlockJobInfo | undefined> {
  const jobs = await qmp.execute<BlockJobInfo[]>('query-block-jobs');
  return jobs.find((j) => j.device === jobId);
}

async function deleteNode(qmp: QmpClient, nodeName: string): Promise<void> {
  try {
    await qmp.execute('blockdev-del', { 'node-name': nodeName });
  } catch (err) {
    const nodes = await qmp.execute<BlockNodeInfo[]>('query-named-block-nodes', { flat: true });
    if (nodes.some((n) => n['node-name'] === nodeName)) throw err;
  }
}

async function fsyncFile(file: string): Promise<void> {
  const fh = await fs.open(file, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}
