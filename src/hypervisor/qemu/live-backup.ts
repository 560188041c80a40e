import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { ConfigError, InstanceBusy, ProgramTimeout, QemuImgError, QmpError, QmpTimeout, errorMessage } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { QemuImg } from '../../qemu-img/qemu-img.js';
import { exportFile, type BackupJob, type ExportDest } from '../types.js';
import { UNIX_SOCKET_PATH_MAX } from './layout.js';
import { DISK_NODE, DISK_QOM_PATH } from './launch.js';
import { processesWhere } from '../../util/processes.js';
import type { QmpClient } from './qmp.js';

/**
 * Point-in-time backup of a running guest's disk into a raw file, by fleecing and pull: the guest
 * never waits for the image store.
 *
 * 1. Before the point in time (constant time, whatever the disk's size or backing chain): a local
 *    temporary qcow2, the fleece image, of the disk's virtual size in the instance's folder (the
 *    guest disk's filesystem, never the store), opened in the guest's QEMU, and an NBD server on a
 *    unix socket beside it.
 * 2. The point in time: a `copy-before-write` filter over the disk's format node, its target the
 *    fleece image, and the guest's device switched onto it (`qom-set drive`: QEMU drains the
 *    device's I/O for that moment only). From then on a guest write to a cluster not yet saved
 *    first copies the old data into the fleece image — on the local disk, not into the store. With
 *    `on-cbw-error=break-snapshot` a copy that fails, or takes over `cbw-timeout` seconds, breaks the
 *    point-in-time view (the backup then fails) instead of failing or holding the guest's write.
 * 3. The view (`snapshot-access` over the filter) is exported read-only over NBD and pulled by
 *    `qemu-img convert` into the store's raw file: sparse (block status: holes are not read), rate
 *    limited by `-r`. A store that is slow, frozen or full holds or fails only that qemu-img.
 * 4. Teardown (success, failure, cancel; idempotent, from whatever part exists): the export, the
 *    NBD server, the device back onto the disk node (only if it is on our filter), the nodes, the
 *    fleece file and the socket.
 *
 * The previous mechanism (`blockdev-backup` straight into the store's file) made every first guest
 * write to a cluster wait for the store, and fail with it: a full store paused the guest with an
 * I/O error, a frozen store froze its writes. It also copied the backing chain into the target
 * inside the job's start (inside a quiesce freeze).
 *
 * Every name made here (nodes, export, files) starts with FLEECE_PREFIX, so that what a dead agent
 * left is recognisable (cancelOurBackupJobs).
 */

export const FLEECE_PREFIX = 'snapdrv-fleece-';
/** Default `cbw-timeout` (s): a copy into the local fleece image that takes longer breaks the backup, not the guest. */
export const DEFAULT_CBW_TIMEOUT_S = 5;
/** What the previous mechanism (blockdev-backup) named its jobs and target nodes; still cleaned up. */
const LEGACY_JOB_PREFIX = 'snapdrv-backup-';
const LEGACY_NODE_PREFIX = 'snapdrv-target-';
const POLL_MS = 20;
/** How long a killed copy of a dead agent may take to disappear. */
const READER_EXIT_MS = 5000;

export interface LiveBackupOptions {
  /** Copy rate limit in bytes/s (qemu-img convert -r); unset or 0: unlimited. */
  speed?: number;
  /** copy-before-write `cbw-timeout` in whole seconds (≥ 1); default DEFAULT_CBW_TIMEOUT_S. */
  cbwTimeoutS?: number;
  /**
   * Test hook: awaited before each QMP command of the start (`fleece-image`, `nbd-server`,
   * `cbw-filter`, `switch-drive`, `snapshot-access`, `export`), with the session's QMP client.
   */
  beforeStartCommand?: (step: StartStep, qmp: QmpClient) => Promise<void> | void;
}

export type StartStep = 'fleece-image' | 'nbd-server' | 'cbw-filter' | 'switch-drive' | 'snapshot-access' | 'export';

export interface LiveBackupContext extends LiveBackupOptions {
  /** Runs `fn` on the guest's QMP session; throws (InstanceInvalidState) once its QEMU is gone. */
  withQmp<T>(fn: (qmp: QmpClient) => Promise<T>): Promise<T>;
  /** Whether the guest's QEMU process (the one the backup runs in) is still there. */
  alive(): Promise<boolean>;
  qemuImg: QemuImg;
  log: Logger;
  /** Bound on each QMP command, and on waiting for an export to go. */
  timeoutMs: number;
  /** The instance's folder: the fleece image and the NBD socket go there. */
  instanceDir: string;
}

/** Everything one backup makes, named from its id. */
export interface Fleecing {
  /** `snapdrv-fleece-<hex>`: also the NBD export's id and name. */
  id: string;
  /** The fleece image's qcow2 node (its file child is left unnamed). */
  imageNode: string;
  /** The copy-before-write filter the guest's device is switched onto. */
  cbwNode: string;
  /** The snapshot-access node: the point-in-time view the export serves. */
  accessNode: string;
  imageFile: string;
  socket: string;
}

const NODE_SUFFIXES = ['-access', '-cbw', '-image'] as const;
const FILE_RE = new RegExp(`^(${FLEECE_PREFIX}[0-9a-f]+)\\.(qcow2|sock)$`);

/** `instanceDir` is made absolute: QEMU (daemonized in /) and qemu-img must find the same socket. */
export function fleecing(instanceDir: string, id: string): Fleecing {
  const dir = path.resolve(instanceDir);
  return {
    id,
    imageNode: `${id}-image`,
    cbwNode: `${id}-cbw`,
    accessNode: `${id}-access`,
    imageFile: path.join(dir, `${id}.qcow2`),
    socket: path.join(dir, `${id}.sock`),
  };
}

function idOfNode(name: string): string | undefined {
  if (!name.startsWith(FLEECE_PREFIX)) return undefined;
  const suffix = NODE_SUFFIXES.find((s) => name.endsWith(s));
  return suffix === undefined ? undefined : name.slice(0, -suffix.length);
}

/** Fleecings started by this process and not yet torn down, by fleece file (see releaseAbandoned). */
const active = new Set<string>();

/** `query-named-block-nodes` entry (the fields used here). */
interface BlockNodeInfo {
  'node-name'?: string;
  image?: { 'virtual-size': number };
}

/** `query-block-exports` entry. */
interface BlockExportInfo {
  id: string;
  'node-name': string;
  'shutting-down': boolean;
}

/** `query-block-jobs` entry (the fields used here). */
interface BlockJobInfo {
  device: string;
  status: string;
}

export async function startLiveBackup(ctx: LiveBackupContext, dest: ExportDest | string): Promise<QemuBackupJob> {
  const f = fleecing(ctx.instanceDir, `${FLEECE_PREFIX}${randomBytes(4).toString('hex')}`);
  const len = Buffer.byteLength(f.socket);
  if (len >= UNIX_SOCKET_PATH_MAX) {
    throw new ConfigError(
      `the live backup's NBD socket ${JSON.stringify(f.socket)} would be ${len} bytes, a unix socket path must be shorter than ` +
        `${UNIX_SOCKET_PATH_MAX}: choose a shorter [DEFAULT] instances_path`,
    );
  }
  const cbwTimeoutS = ctx.cbwTimeoutS ?? DEFAULT_CBW_TIMEOUT_S;
  if (!Number.isInteger(cbwTimeoutS) || cbwTimeoutS < 1 || cbwTimeoutS > 0xffffffff) {
    throw new ConfigError(`live backup cbw-timeout ${cbwTimeoutS}: expected whole seconds, at least 1`);
  }

  const virtualSize = await ctx.withQmp(async (qmp) => {
    await releaseAbandoned(qmp, ctx);
    const drive = await qmp.execute<string>('qom-get', { path: DISK_QOM_PATH, property: 'drive' });
    if (drive !== DISK_NODE) {
      throw new InstanceBusy(`cannot start a live backup: the guest's disk device is attached to node ${JSON.stringify(drive)}, not ${DISK_NODE} (another block job?)`);
    }
    const nodes = await qmp.execute<BlockNodeInfo[]>('query-named-block-nodes', { flat: true });
    const image = nodes.find((n) => n['node-name'] === DISK_NODE)?.image;
    if (!image) throw new QmpError('query-named-block-nodes', 'DeviceNotFound', `no block node ${DISK_NODE}`);
    return image['virtual-size'];
  });

  active.add(f.imageFile);
  let started: { startedAt: number; startPauseMs: number };
  try {
    // Metadata only: constant time whatever the disk holds (a backing chain is never read).
    await ctx.qemuImg.create(f.imageFile, { sizeBytes: virtualSize });
    // The store's receiver has made its file already; a plain file target is made here.
    if (typeof dest === 'string') await createTarget(dest, virtualSize);
    started = await ctx.withQmp(async (qmp) => {
      try {
        return await setUp(qmp, ctx, f, cbwTimeoutS);
      } catch (err) {
        // On this same connection: QEMU runs its commands in order, so a command that timed out
        // has taken effect (or not) by the time the teardown looks.
        ctx.log.warn({ err: errorMessage(err), fleecing: f.id }, 'live backup start failed: tearing down what it set up');
        await undoFleecings(qmp, [f], ctx.log, ctx.timeoutMs).catch((e: unknown) =>
          ctx.log.warn({ err: errorMessage(e), fleecing: f.id }, 'teardown on the start session failed (tried again below)'),
        );
        throw err;
      }
    });
  } catch (err) {
    try {
      await teardown(ctx, f);
    } catch (e) {
      ctx.log.error({ err: errorMessage(e), fleecing: f.id }, 'cannot tear down a live backup whose start failed (the next backup or the recovery removes it)');
    } finally {
      active.delete(f.imageFile);
    }
    throw err;
  }
  ctx.log.info({ fleecing: f.id, start_pause_ms: round(started.startPauseMs), cbw_timeout_s: cbwTimeoutS }, 'live backup started (fleecing)');
  return new QemuBackupJob(ctx, f, dest, virtualSize, started.startedAt, started.startPauseMs, cbwTimeoutS);
}

async function setUp(qmp: QmpClient, ctx: LiveBackupContext, f: Fleecing, cbwTimeoutS: number): Promise<{ startedAt: number; startPauseMs: number }> {
  const step = async (name: StartStep, command: string, args: Record<string, unknown>): Promise<void> => {
    await ctx.beforeStartCommand?.(name, qmp);
    await qmp.execute(command, args);
  };
  // Temporary data: never flushed (a guest's flush reaches the disk, not this image).
  await step('fleece-image', 'blockdev-add', {
    driver: 'qcow2',
    'node-name': f.imageNode,
    cache: { 'no-flush': true },
    file: { driver: 'file', filename: f.imageFile, cache: { 'no-flush': true } },
  });
  await step('nbd-server', 'nbd-server-start', { addr: { type: 'unix', data: { path: f.socket } }, 'max-connections': 1 });
  await step('cbw-filter', 'blockdev-add', {
    driver: 'copy-before-write',
    'node-name': f.cbwNode,
    file: DISK_NODE,
    target: f.imageNode,
    'on-cbw-error': 'break-snapshot',
    'cbw-timeout': cbwTimeoutS,
  });
  // The point in time: the device's I/O is drained and goes through the filter from now on.
  await ctx.beforeStartCommand?.('switch-drive', qmp);
  const t0 = performance.now();
  await qmp.execute('qom-set', { path: DISK_QOM_PATH, property: 'drive', value: f.cbwNode });
  const startPauseMs = performance.now() - t0;
  const startedAt = Date.now();
  await step('snapshot-access', 'blockdev-add', { driver: 'snapshot-access', 'node-name': f.accessNode, file: f.cbwNode });
  await step('export', 'block-export-add', { type: 'nbd', id: f.id, 'node-name': f.accessNode, name: f.id, writable: false });
  return { startedAt, startPauseMs };
}

/**
 * A running live backup: the fleecing in the guest's QEMU, and (from wait() on) the qemu-img that
 * pulls the view into the target. QMP is not held open while it copies.
 */
export class QemuBackupJob implements BackupJob {
  private readonly abort = new AbortController();
  private copying: Promise<void> | undefined;
  private waiting: Promise<void> | undefined;
  private cancelling: Promise<void> | undefined;
  private releasing: Promise<void> | undefined;
  /** The copy has ended (completed or failed). */
  private ended = false;

  constructor(
    private readonly ctx: LiveBackupContext,
    /** What the backup made in the guest's QEMU and the instance's folder. */
    readonly fleecing: Fleecing,
    readonly dest: ExportDest | string,
    /** The disk's virtual size: the most the copy can carry. */
    readonly virtualSize: number,
    readonly startedAt: number,
    readonly startPauseMs: number,
    readonly cbwTimeoutS: number,
  ) {}

  /** The point-in-time view, as qemu-img reads it. */
  get exportUri(): string {
    return `nbd+unix:///${encodeURIComponent(this.fleecing.id)}?socket=${this.fleecing.socket}`;
  }

  wait(onProgress?: (fraction: number) => void): Promise<void> {
    this.waiting ??= this.runWait(onProgress);
    return this.waiting;
  }

  cancel(): Promise<void> {
    this.cancelling ??= this.runCancel();
    return this.cancelling;
  }

  private async runWait(onProgress?: (fraction: number) => void): Promise<void> {
    if (this.abort.signal.aborted) throw this.cancelled();
    let last = 0;
    const report = (fraction: number) => {
      if (fraction > last) last = fraction;
      onProgress?.(last);
    };
    this.copying = this.ctx.qemuImg.convertNbdToRaw(this.exportUri, this.dest, {
      onProgress: report,
      signal: this.abort.signal,
      rateLimit: this.ctx.speed || undefined,
      sizeBytes: this.virtualSize,
      targetExists: true,
      // The guest runs all along.
      background: true,
    });
    try {
      await this.copying;
      // qemu-img convert writes a file target with cache=unsafe: nothing is on disk until this (the
      // store's receiver is fsynced by its commit).
      if (typeof this.dest === 'string') await fsyncFile(this.dest);
    } catch (err) {
      this.ended = true;
      await this.release().catch((e: unknown) => this.teardownFailed(e));
      if (this.abort.signal.aborted) throw this.cancelled();
      throw await this.explain(err);
    }
    this.ended = true;
    // The image is complete and flushed: a failed teardown is the guest's QEMU's problem, reported
    // loudly, not the image's (the next backup of this guest tears the leftover down first).
    await this.release().catch((e: unknown) => this.teardownFailed(e));
    report(1);
    this.ctx.log.info({ fleecing: this.fleecing.id }, 'live backup complete');
  }

  private async runCancel(): Promise<void> {
    const ended = this.ended;
    this.abort.abort();
    await this.copying?.catch(() => undefined);
    await this.release();
    if (!ended) this.ctx.log.info({ fleecing: this.fleecing.id }, 'live backup cancelled');
  }

  /** Tears the fleecing down; once it has succeeded, again on every call after a failure. */
  private release(): Promise<void> {
    this.releasing ??= teardown(this.ctx, this.fleecing).then(
      () => {
        active.delete(this.fleecing.imageFile);
      },
      (err: unknown) => {
        // Not ours any more: the next backup's start may tear it down as abandoned.
        active.delete(this.fleecing.imageFile);
        this.releasing = undefined;
        throw err;
      },
    );
    return this.releasing;
  }

  private teardownFailed(err: unknown): void {
    this.ctx.log.error({ err: errorMessage(err), fleecing: this.fleecing.id }, 'cannot tear down the live backup (the next backup of this guest or the recovery removes it)');
  }

  private cancelled(): QemuImgError {
    return new QemuImgError(`live backup ${this.fleecing.id} was cancelled`);
  }

  /** The copy's error, with what it means here. */
  private async explain(err: unknown): Promise<Error> {
    // The copy overran [hypervisor] export_timeout: it was killed, the fleecing is torn down.
    if (err instanceof ProgramTimeout) return err;
    const msg = errorMessage(err);
    const argv = err instanceof QemuImgError ? err.argv : [];
    const stderr = err instanceof QemuImgError ? err.stderr : '';
    if (!(await this.ctx.alive())) {
      return new QemuImgError(`live backup: the guest's QEMU process ended during the copy: ${msg}`, argv, stderr, { cause: err });
    }
    if (/error while reading/.test(msg)) {
      return new QemuImgError(
        `live backup: reading the point-in-time view failed: ${msg} (the view breaks, rather than the guest's write waiting or failing, ` +
          `when a copy of old data into the local fleece image fails or takes over ${this.cbwTimeoutS} s)`,
        argv,
        stderr,
        { cause: err },
      );
    }
    return new QemuImgError(`live backup: copying into ${exportFile(this.dest)} failed: ${msg}`, argv, stderr, { cause: err });
  }
}

/**
 * Tears down what a backup set up, from whatever part of it exists: in the guest's QEMU (when its
 * process is still there), then its files. Throws when QEMU's side could not be undone (the files
 * are then kept: the socket tells a later cleanup that the NBD server is ours).
 */
async function teardown(ctx: LiveBackupContext, f: Fleecing): Promise<void> {
  try {
    if (await ctx.alive()) await ctx.withQmp((qmp) => undoFleecings(qmp, [f], ctx.log, ctx.timeoutMs));
  } catch (err) {
    // With its QEMU gone, the nodes, the export and the server are gone too.
    if (await ctx.alive()) throw err;
  }
  await removeFleeceFiles([f]);
}

/**
 * Undoes fleecings in the guest's QEMU, idempotently: their exports (ended hard: a reader left is
 * cut off), the NBD server when it is ours, the device back onto the disk node when it is on one of
 * their filters, and their nodes. Resolves with what was found to undo.
 */
async function undoFleecings(qmp: QmpClient, list: readonly Fleecing[], log: Logger, timeoutMs: number): Promise<string[]> {
  const done: string[] = [];
  const ids = new Set(list.map((f) => f.id));
  const exports = (await qmp.execute<BlockExportInfo[]>('query-block-exports')).filter((e) => ids.has(e.id));
  for (const e of exports) {
    if (e['shutting-down']) continue;
    await qmp.execute('block-export-del', { id: e.id, mode: 'hard' }).catch((err: unknown) => {
      log.debug({ err: errorMessage(err), export: e.id }, 'block-export-del failed (gone meanwhile?)');
    });
  }
  if (exports.length > 0) {
    done.push(`removed NBD export(s) ${exports.map((e) => e.id).join(', ')}`);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const left = (await qmp.execute<BlockExportInfo[]>('query-block-exports')).filter((e) => ids.has(e.id));
      if (left.length === 0) break;
      if (Date.now() > deadline) throw new QmpTimeout(`NBD export(s) ${left.map((e) => e.id).join(', ')} still there ${timeoutMs} ms after block-export-del`);
      await sleep(POLL_MS);
    }
  }
  // QEMU has one NBD server. It is ours when it served our export or listens on our socket (QEMU
  // creates the socket when the server starts and removes it when it stops).
  const sockets = await Promise.all(list.map((f) => exists(f.socket)));
  if (exports.length > 0 || sockets.some(Boolean)) {
    await qmp.execute('nbd-server-stop').then(
      () => done.push('stopped the NBD server'),
      (err: unknown) => {
        if (!(err instanceof QmpError && /not running/i.test(err.desc))) throw err;
      },
    );
  }
  // The view first: while it is there the filter does not share writes to the disk node with
  // another parent, so the device could not go back onto the disk node.
  const present = new Set((await qmp.execute<BlockNodeInfo[]>('query-named-block-nodes', { flat: true })).map((n) => n['node-name'] ?? ''));
  const deleted: string[] = [];
  const del = async (node: string) => {
    if (!present.has(node)) return;
    await qmp.execute('blockdev-del', { 'node-name': node });
    deleted.push(node);
  };
  for (const f of list) await del(f.accessNode);
  const drive = await qmp.execute<string>('qom-get', { path: DISK_QOM_PATH, property: 'drive' });
  if (list.some((f) => f.cbwNode === drive)) {
    await qmp.execute('qom-set', { path: DISK_QOM_PATH, property: 'drive', value: DISK_NODE });
    done.push(`switched the guest's disk device back from ${drive} to ${DISK_NODE}`);
  }
  for (const f of list) await del(f.cbwNode);
  for (const f of list) await del(f.imageNode);
  if (deleted.length > 0) done.push(`removed block node(s) ${deleted.join(', ')}`);
  return done;
}

async function removeFleeceFiles(list: readonly Fleecing[]): Promise<void> {
  await Promise.all(list.flatMap((f) => [f.imageFile, f.socket]).map((p) => fs.rm(p, { force: true })));
}

/** The fleecings of ours in this QEMU and the instance's folder: from nodes, exports, the device's drive and files. */
async function findFleecings(qmp: QmpClient, instanceDir: string): Promise<Fleecing[]> {
  const ids = new Set<string>();
  for (const e of await qmp.execute<BlockExportInfo[]>('query-block-exports')) {
    if (e.id.startsWith(FLEECE_PREFIX)) ids.add(e.id);
  }
  for (const n of await qmp.execute<BlockNodeInfo[]>('query-named-block-nodes', { flat: true })) {
    const id = idOfNode(n['node-name'] ?? '');
    if (id !== undefined) ids.add(id);
  }
  for (const id of await fleeceIdsInDir(instanceDir)) ids.add(id);
  return [...ids].sort().map((id) => fleecing(instanceDir, id));
}

/** Ids of the fleece files and sockets in the instance's folder. */
async function fleeceIdsInDir(instanceDir: string): Promise<string[]> {
  const ids = new Set<string>();
  for (const name of await fs.readdir(instanceDir).catch(() => [] as string[])) {
    const m = FILE_RE.exec(name);
    if (m) ids.add(m[1]!);
  }
  return [...ids];
}

/** A process reading one of our NBD sockets in the instance's folder (a qemu-img convert of ours). */
interface Reader {
  pid: number;
  id: string;
}

/** Processes (but this one) whose argv names an NBD socket of ours in `instanceDir`. */
async function findReaders(instanceDir: string): Promise<Reader[]> {
  const needle = `?socket=${path.join(path.resolve(instanceDir), FLEECE_PREFIX)}`;
  const readers = await processesWhere((argv) => argv.some((a) => a.includes(needle)));
  return readers.map(({ pid, argv }) => {
    const arg = argv.find((a) => a.includes(needle))!;
    const socket = arg.slice(arg.indexOf(needle) + '?socket='.length);
    return { pid, id: path.basename(socket).replace(/\.sock$/, '') };
  });
}

/** SIGKILLs the readers and waits until they are gone (or zombies: their files closed). */
async function killReaders(readers: readonly Reader[]): Promise<void> {
  for (const r of readers) {
    try {
      process.kill(r.pid, 'SIGKILL');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
    }
  }
  const deadline = Date.now() + READER_EXIT_MS;
  for (const r of readers) {
    while (!(await processGone(r.pid))) {
      if (Date.now() > deadline) throw new Error(`the copy process ${r.pid} of live backup ${r.id} survived SIGKILL for ${READER_EXIT_MS} ms`);
      await sleep(POLL_MS);
    }
  }
}

async function processGone(pid: number): Promise<boolean> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  if (stat === '') return true;
  const state = stat.charAt(stat.lastIndexOf(')') + 2);
  return state === 'Z' || state === 'X';
}

/**
 * Before a new backup: fleecings of ours in this QEMU that no backup of this process owns were
 * left by a teardown that failed or by a dead agent; they are torn down, unless a copy still reads
 * one (another process's backup under way: InstanceBusy). Processes serialize their work on an
 * instance (InstanceLocks), so a fleecing of another live process is found only while it copies.
 */
async function releaseAbandoned(qmp: QmpClient, ctx: LiveBackupContext): Promise<void> {
  const abandoned = (await findFleecings(qmp, ctx.instanceDir)).filter((f) => !active.has(f.imageFile));
  if (abandoned.length === 0) return;
  const readers = (await findReaders(ctx.instanceDir)).filter((r) => abandoned.some((f) => f.id === r.id));
  if (readers.length > 0) {
    throw new InstanceBusy(
      `cannot start a live backup: another one is being copied from this guest (${readers.map((r) => `${r.id} by pid ${r.pid}`).join(', ')})`,
    );
  }
  const done = await undoFleecings(qmp, abandoned, ctx.log, ctx.timeoutMs);
  await removeFleeceFiles(abandoned);
  ctx.log.warn({ fleecings: abandoned.map((f) => f.id), actions: done }, 'tore down live backups left behind');
}

export interface CancelBackupsOptions {
  log: Logger;
  timeoutMs: number;
  /** The instance's folder (fleece files and NBD sockets). */
  instanceDir: string;
}

/**
 * Ends every live backup of ours in this QEMU, whatever state a dead agent left it in: its copy
 * (a qemu-img convert outliving the agent) is killed, so that nothing writes the store's partial
 * file any more; the fleecing is undone (export, NBD server, the device back onto the disk node,
 * nodes, files); jobs of the previous mechanism (blockdev-backup) are cancelled and released. Only
 * for a QEMU no other process of ours works on (recovery after a crash). Resolves with what was done.
 */
export async function cancelOurBackupJobs(qmp: QmpClient, opts: CancelBackupsOptions): Promise<string[]> {
  const { log, timeoutMs, instanceDir } = opts;
  const done: string[] = [];
  const readers = await findReaders(instanceDir);
  if (readers.length > 0) {
    await killReaders(readers);
    done.push(`killed the copy of live backup(s) ${readers.map((r) => `${r.id} (pid ${r.pid})`).join(', ')}`);
  }
  const found = await findFleecings(qmp, instanceDir);
  if (found.length > 0) {
    const undone = await undoFleecings(qmp, found, log, timeoutMs);
    await removeFleeceFiles(found);
    done.push(`tore down live backup(s) ${found.map((f) => f.id).join(', ')}${undone.length > 0 ? ` (${undone.join('; ')})` : ''}`);
  }
  const legacy = await cancelLegacyJobs(qmp, log, timeoutMs);
  if (legacy.length > 0) done.push(`cancelled backup job(s) ${legacy.join(', ')}`);
  return done;
}

/** For a guest with no QEMU process: the copies and fleece files a dead agent left. */
export async function endOrphanedBackups(instanceDir: string): Promise<string[]> {
  const done: string[] = [];
  const readers = await findReaders(instanceDir);
  if (readers.length > 0) {
    await killReaders(readers);
    done.push(`killed the copy of live backup(s) ${readers.map((r) => `${r.id} (pid ${r.pid})`).join(', ')}`);
  }
  const files = (await fleeceIdsInDir(instanceDir)).sort().map((id) => fleecing(instanceDir, id));
  if (files.length > 0) {
    await removeFleeceFiles(files);
    done.push(`removed the files of live backup(s) ${files.map((f) => f.id).join(', ')}`);
  }
  return done;
}

/** blockdev-backup jobs of the previous mechanism: cancelled, waited for, dismissed; their target nodes removed. */
async function cancelLegacyJobs(qmp: QmpClient, log: Logger, timeoutMs: number): Promise<string[]> {
  const ours = (await qmp.execute<BlockJobInfo[]>('query-block-jobs')).filter((j) => j.device.startsWith(LEGACY_JOB_PREFIX));
  for (const job of ours) {
    if (job.status === 'concluded') continue;
    await qmp.execute('job-cancel', { id: job.device }).catch((err: unknown) => {
      log.debug({ err: errorMessage(err), job_id: job.device }, 'job-cancel failed (concluded meanwhile?)');
    });
  }
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const left = (await qmp.execute<BlockJobInfo[]>('query-block-jobs')).filter((j) => j.device.startsWith(LEGACY_JOB_PREFIX) && j.status !== 'concluded');
    if (left.length === 0) break;
    if (Date.now() > deadline) throw new QmpTimeout(`backup jobs ${left.map((j) => j.device).join(', ')} did not end within ${timeoutMs} ms of job-cancel`);
    await sleep(POLL_MS);
  }
  for (const job of ours) {
    await qmp.execute('job-dismiss', { id: job.device }).catch((err: unknown) => {
      log.debug({ err: errorMessage(err), job_id: job.device }, 'job-dismiss failed (already gone?)');
    });
  }
  for (const n of await qmp.execute<BlockNodeInfo[]>('query-named-block-nodes', { flat: true })) {
    const name = n['node-name'] ?? '';
    if (!name.startsWith(LEGACY_NODE_PREFIX)) continue;
    await qmp.execute('blockdev-del', { 'node-name': name }).catch((err: unknown) => {
      log.warn({ err: errorMessage(err), node: name }, 'cannot remove a backup target node left behind');
    });
  }
  return ours.map((j) => j.device);
}

/** The target: a sparse raw file of the disk's virtual size, mode 0640 (qemu-img writes into it: -n). */
async function createTarget(dest: string, virtualSize: number): Promise<void> {
  const fh = await fs.open(dest, 'w', 0o640);
  try {
    await fh.chmod(0o640);
    await fh.truncate(virtualSize);
  } finally {
    await fh.close();
  }
}

async function exists(p: string): Promise<boolean> {
  return fs.lstat(p).then(
    () => true,
    () => false,
  );
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
