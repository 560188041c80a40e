import fs from 'node:fs/promises';
import type net from 'node:net';
import { QemuProcessError, QmpDisconnected, QmpError, errorMessage } from '../../errors.js';
import type { Logger } from '../../log.js';
import { fsyncDir } from '../../util/durable-fs.js';
import { faultPoint, faultPointAfterOutput } from '../../util/fault.js';
import { Phases } from '../../util/phases.js';
import type { LaunchHooks, ResumeResult, SaveResult } from '../types.js';
import { invalidState, type QemuGuests, removeFiles } from './guests.js';
import { DISK_NODE, INCOMING_ARGS } from './launch.js';
import { type InstanceLayout, type ManagedSaveRecord, readManagedSaveRecord, writeJsonAtomic } from './layout.js';
import { cancelMigration, waitForMigration, withinJobTimeout, type MigrationBounds } from './migration.js';
import { MigrationReceiver } from './migration-stream.js';
import { findGuestProcess } from './qemu-process.js';
import { eventTimeMs, type QmpClient } from './qmp.js';

/**
 * Managed save and resume of the qemu backend. A save migrates the guest's RAM and device state into
 * a state file (through a socket the agent listens on, copied into the file by `cat`), then the
 * process exits; a resume launches a new process waiting for an incoming migration, which reads the
 * file itself (inherited as its fd 3).
 */

/** The descriptor a resuming QEMU inherits its saved state on (launch's first inherited fd). */
const STATE_FD = 3;

/** Lifts QEMU's default 128 MiB/s migration cap for saves into a file (as libvirt does). */
const UNLIMITED_BANDWIDTH = Number.MAX_SAFE_INTEGER;

type PriorState = SaveResult['priorState'];

export interface SaveOptions {
  /** Bound on the whole migration of a save or a resume (`[hypervisor] job_timeout`). */
  jobTimeoutMs: number;
  /** Test hook: sees the connection a save's stream arrives on before it is read (to stall it). */
  beforeReadingSaveStream?: (socket: net.Socket) => Promise<void> | void;
}

/**
 * Managed save. A save whose migration fails or does not complete within the job timeout is cancelled
 * and undone: the guest is left as it was (its vCPUs run again if they ran); if they cannot run again,
 * the error says that the guest is paused.
 */
export async function managedSave(g: QemuGuests, uuid: string, opts: SaveOptions): Promise<SaveResult> {
  const p = await g.probe(uuid);
  if ((p.state !== 'running' && p.state !== 'paused') || p.pid === undefined) throw invalidState(p, 'save');
  const { layout } = p;
  const priorState = p.state;
  const log = g.log.child({ instance_uuid: layout.uuid });
  layout.assertSocketPathsFit();

  const phases = new Phases();
  const { bytes, vcpusStoppedAt } = await g.withQmp(layout, async (qmp) => {
    const saved = await saveState(g, qmp, layout, priorState, opts, log, phases);
    // The state is on disk: from here the process only has to go.
    await qmp.execute('quit').catch((err: unknown) => {
      if (!(err instanceof QmpDisconnected)) log.warn({ err: errorMessage(err) }, 'quit after managed save failed');
    });
    return saved;
  });
  await g.endProcess(layout, p.pid, 'quit-sent');
  phases.mark('exit');
  log.info({ prior_state: priorState, bytes, ...phases.ms }, 'instance managed-saved');
  return vcpusStoppedAt === undefined ? { priorState, bytes } : { priorState, bytes, vcpusStoppedAt };
}

/**
 * Resume from the managed save. A resume that fails before the state is loaded ends its new process
 * and keeps the saved state; once loaded, the new process is the guest: if its vCPUs cannot run again
 * (`cont` fails: e.g. another process holds the disk's write lock, which `cont` must take), it is
 * left paused and the error says so.
 */
export async function resume(g: QemuGuests, uuid: string, hooks: LaunchHooks, opts: SaveOptions): Promise<ResumeResult> {
  const p = await g.probe(uuid);
  if (p.state !== 'saved') throw invalidState(p, 'resume');
  const { layout } = p;
  const log = g.log.child({ instance_uuid: layout.uuid });
  const saved = await readManagedSaveRecord(layout.saveMeta).catch((err: unknown) => {
    throw new QemuProcessError(`cannot resume instance ${layout.uuid}: ${errorMessage(err)}`, { cause: err });
  });
  await hooks.beforeLaunch?.(layout.uuid);
  const phases = new Phases();
  // The new process reads the state file itself (its fd 3): no copy through the agent.
  const state = await fs.open(layout.saveState, 'r').catch((err: unknown) => {
    throw new QemuProcessError(`cannot resume instance ${layout.uuid}: ${errorMessage(err)}`, { cause: err });
  });
  let pid: number;
  try {
    pid = await g.launch(layout, p.record, INCOMING_ARGS, [state.fd]);
  } finally {
    await state.close();
  }
  phases.mark('launch');
  const progress = { loaded: false };
  let result: ResumeResult;
  try {
    result = await g.withQmp(layout, (qmp) => loadState(g, qmp, layout, saved, progress, opts, log, phases));
  } catch (err) {
    // Once loaded, the new process is the guest: it must not be killed.
    if (progress.loaded) throw err;
    throw await endFailedResume(g, layout, pid, err, log);
  }
  log.info({ state: result.state, ...phases.ms }, 'instance resumed from managed save');
  return result;
}

/**
 * Migrates the guest's state into the state file, stopping its vCPUs first if they run. On failure
 * the guest is left as it was (undoSave). Resolves with the state's size and when the vCPUs stopped.
 */
async function saveState(
  g: QemuGuests,
  qmp: QmpClient,
  layout: InstanceLayout,
  priorState: PriorState,
  opts: SaveOptions,
  log: Logger,
  phases: Phases,
): Promise<{ bytes: number; vcpusStoppedAt: number | undefined }> {
  // Everything that can be prepared is, before the guest stops: downtime starts at `stop`.
  await removeFiles([layout.saveSocket, layout.saveStatePartial]);
  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': UNLIMITED_BANDWIDTH });
  const receiver = await MigrationReceiver.listen(layout.saveSocket, layout.saveStatePartial, opts.beforeReadingSaveStream, g.guestCpus);
  let vcpusStoppedAt: number | undefined;
  phases.mark('prepare');
  try {
    if (priorState === 'running') vcpusStoppedAt = await stopVcpus(qmp, log, g.qmpTimeoutMs);
    phases.mark('stop');
    await qmp.execute('migrate', { uri: `unix:${layout.saveSocket}` });
    await faultPointAfterOutput('managed-save:migrating');
    // Bounded as a whole: QEMU's side (query-migrate) and ours (the stream into the file, fsynced).
    const startedAt = Date.now();
    const migrated = waitForMigration(qmp, 'save', bounds(g, opts)).then(() => phases.mark('migrate'));
    const [, bytes] = await withinJobTimeout(Promise.all([migrated, receiver.done]), 'save', opts.jobTimeoutMs, startedAt);
    phases.mark('sync');
    await receiver.close();
    // managed-save.json first: a state file never exists without it.
    await writeJsonAtomic(layout.saveMeta, { prior_state: priorState, bytes });
    await fs.rename(layout.saveStatePartial, layout.saveState);
    await fsyncDir(layout.dir);
    phases.mark('record');
    return { bytes, vcpusStoppedAt };
  } catch (err) {
    // The migration is cancelled before our end of its stream is: QEMU then stops on its own terms.
    const contError = await undoSave(qmp, layout, priorState, receiver, log, g.qmpTimeoutMs);
    if (contError === undefined) throw err;
    throw new QemuProcessError(
      `managed save of instance ${layout.uuid} failed (${errorMessage(err)}), and its vCPUs could not run again ` +
        `(cont: ${errorMessage(contError)}): it is paused`,
      { cause: err },
    );
  }
}

function bounds(g: QemuGuests, opts: SaveOptions): MigrationBounds {
  return { beginTimeoutMs: g.qmpTimeoutMs, jobTimeoutMs: opts.jobTimeoutMs };
}

/**
 * Leaves a guest whose save failed as it was: the migration cancelled, partial files removed, vCPUs
 * running again if they were. Resolves with the error of a `cont` that failed (the guest is paused).
 */
async function undoSave(
  qmp: QmpClient,
  layout: InstanceLayout,
  priorState: PriorState,
  receiver: MigrationReceiver,
  log: Logger,
  timeoutMs: number,
): Promise<unknown> {
  await cancelMigration(qmp, timeoutMs).catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'migrate_cancel failed'));
  await receiver.abort().catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'cannot end the save stream'));
  await removeFiles([layout.saveStatePartial, layout.saveState, layout.saveMeta, `${layout.saveMeta}.tmp`, layout.saveSocket]).catch(
    (err: unknown) => log.warn({ err: errorMessage(err) }, 'cannot remove partial managed-save files'),
  );
  if (priorState !== 'running') return undefined;
  return qmp.execute('cont').then(
    () => undefined,
    (err: unknown) => {
      // A QEMU that is gone (e.g. killed during the save) is not paused: the caller finds it dead.
      if (err instanceof QmpDisconnected) return undefined;
      log.error({ err: errorMessage(err) }, 'cannot run the guest again after a failed save: it is paused');
      return err;
    },
  );
}

/**
 * Feeds the saved state to the new process and, once it is loaded, removes the state file and runs
 * the vCPUs again if they ran before the save. Sets `progress.loaded` as soon as the process holds
 * the state. Resolves with the power state restored and when the vCPUs ran again.
 */
async function loadState(
  g: QemuGuests,
  qmp: QmpClient,
  layout: InstanceLayout,
  saved: ManagedSaveRecord,
  progress: { loaded: boolean },
  opts: SaveOptions,
  log: Logger,
  phases: Phases,
): Promise<ResumeResult> {
  phases.mark('connect');
  faultPoint('resume:loading');
  await qmp.execute('migrate-incoming', { uri: `fd:${STATE_FD}` });
  await waitForMigration(qmp, 'restore', bounds(g, opts));
  progress.loaded = true;
  phases.mark('load');
  // The new process holds the state now. Before the guest runs again the file stops being a saved
  // state (one older than the disk must never be resumed later): renamed back to partial, which is
  // never loaded, and removed once the guest runs (unlinking hundreds of MiB is not instant).
  await fs.rename(layout.saveState, layout.saveStatePartial);
  await removeFiles([layout.saveMeta]);
  await fsyncDir(layout.dir);
  faultPoint('resume:loaded');
  phases.mark('cleanup');
  let vcpusResumedAt: number | undefined;
  try {
    if (saved.prior_state === 'running') {
      vcpusResumedAt = await continueVcpus(qmp, log, g.qmpTimeoutMs).catch((err: unknown) => {
        if (err instanceof QmpDisconnected) throw err; // gone, not paused
        log.error({ err: errorMessage(err) }, 'the saved state is loaded, but the vCPUs cannot run again: the guest is paused');
        throw new QemuProcessError(
          `instance ${layout.uuid}: the saved state is loaded, but its vCPUs could not run again (cont: ${errorMessage(err)}): it is paused`,
          { cause: err },
        );
      });
    }
    phases.mark('cont');
  } finally {
    await removeFiles([layout.saveStatePartial]).catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'cannot remove the loaded state file'));
  }
  const state = await g.queryPowerState(qmp);
  return vcpusResumedAt === undefined ? { state } : { state, vcpusResumedAt };
}

/**
 * Ends the new process of a resume that failed before the state was loaded; the saved state is
 * kept. Resolves with the error to throw.
 */
async function endFailedResume(g: QemuGuests, layout: InstanceLayout, pid: number, err: unknown, log: Logger): Promise<unknown> {
  const died = (await findGuestProcess(layout.pidFile, layout.uuid)) === undefined;
  log.error({ err: errorMessage(err), qemu_exited: died }, 'resume failed: ending the new process, keeping the saved state');
  await g.endProcess(layout, pid, 'kill').catch((e: unknown) =>
    log.error({ err: errorMessage(e) }, 'cannot end the failed QEMU process'),
  );
  if (!died) return err;
  return new QemuProcessError(
    `cannot resume instance ${layout.uuid}: its QEMU exited while loading the saved state ` +
      `(${errorMessage(err)}); the saved state is kept`,
    { cause: err },
  );
}

/** QMP `stop`; resolves with when the vCPUs stopped (the STOP event's time). */
async function stopVcpus(qmp: QmpClient, log: Logger, timeoutMs: number): Promise<number> {
  const stopped = qmp.waitForEvent('STOP', undefined, timeoutMs);
  stopped.catch(() => undefined);
  const sentAt = Date.now();
  await qmp.execute('stop');
  return stopped.then(eventTimeMs, (err: unknown) => {
    // The vCPUs did stop (the command succeeded): the send time bounds it from below.
    log.warn({ err: errorMessage(err) }, 'no STOP event after stop: downtime measured from the command');
    return sentAt;
  });
}

/** QMP `cont`; resolves with when the vCPUs ran again (the RESUME event's time). */
async function continueVcpus(qmp: QmpClient, log: Logger, timeoutMs: number): Promise<number> {
  const resumed = qmp.waitForEvent('RESUME', undefined, timeoutMs);
  resumed.catch(() => undefined);
  await qmp.execute('cont');
  const answeredAt = Date.now();
  return resumed.then(eventTimeMs, (err: unknown) => {
    log.warn({ err: errorMessage(err) }, 'no RESUME event after cont: downtime measured to the reply');
    return answeredAt;
  });
}

/** `x-debug-query-block-graph` reply (the fields used here). */
interface BlockGraph {
  nodes: { id: number; type: string; name: string }[];
  edges: { parent: number; child: number; perm: string[] }[];
}

/**
 * Whether the guest's disk is inactive in its QEMU: a resume's process holds it so (no permissions,
 * no image lock) from its start until the disk is activated, at the end of the load or by the first
 * `cont`; when that fails (another process holds the write lock) it stays inactive while the guest is
 * paused. QEMU 7.2 must then not be asked for an internal snapshot: `blockdev-snapshot-delete-internal-
 * sync` on an inactive qcow2 node kills the process (seen on 7.2.22). QEMU 7.2 tells it only through
 * the block graph (`x-debug-query-block-graph`): no edge into the disk's node holds any permission.
 * A QEMU without that command is taken to have it active.
 */
export async function diskInactive(qmp: QmpClient): Promise<boolean> {
  let graph: BlockGraph;
  try {
    graph = await qmp.execute<BlockGraph>('x-debug-query-block-graph');
  } catch (err) {
    if (err instanceof QmpError && err.errorClass === 'CommandNotFound') return false;
    throw err;
  }
  const disk = graph.nodes.find((n) => n.type === 'block-driver' && n.name === DISK_NODE);
  if (disk === undefined) return false;
  const into = graph.edges.filter((e) => e.child === disk.id);
  return into.length > 0 && into.every((e) => e.perm.length === 0);
}
