import fs from 'node:fs/promises';
import path from 'node:path';
import type { StrategyName } from '../config/schema.js';
import type { Lifecycle } from './lifecycle.js';
import { errorMessage, ImageNotFound, InstanceNotFound } from '../errors.js';
import { processHoldsDisk, type Hypervisor, type PowerState } from '../hypervisor/types.js';
import type { ImageStoreBackend } from '../image-store/image-store.js';
import { operationLogger, type Logger } from '../log.js';
import type { AgentMetrics } from '../metrics/agent-metrics.js';
import { isRunning, type ProcessIdentity } from '../util/process-identity.js';
import { isUuid } from '../util/uuid.js';
import type { OperationJournal, OperationRecord } from './operation-journal.js';
import type { PendingSnapshots } from './pending.js';
import type { InstanceLocks } from './instance-locks.js';
import { disposeOfFailedSnapshot, startAgain } from './steps.js';
import { USES_MANAGED_SAVE } from './strategies.js';

/**
 * Start-up recovery (SPEC §2 "on every path, including crashes"): what an agent that died in the
 * middle of a snapshot left behind is put right from the operation journal and the real state of
 * guest, disk and store — guest back in its prior power state (also one that a failed undo left
 * paused: its record is kept for that), our internal snapshot gone by the same rule as a failure's
 * undo (disposeOfFailedSnapshot: pending only when the guest's QEMU cannot delete it), no partial
 * data, the image `killed` (or forgotten when no step had begun, so that the request is carried out
 * again) — and internal snapshots of ours that nothing explains are removed.
 */

export interface RecoveryDeps {
  hv: Hypervisor;
  store: ImageStoreBackend;
  lifecycle: Lifecycle;
  pending: PendingSnapshots;
  operations: OperationJournal;
  log: Logger;
  namePrefix: string;
  /** `[snapshot] strategy`: decides how an orphaned snapshot of ours on a running guest goes (scanOrphans). */
  strategy: StrategyName;
  /** Guest-agent command timeout (thaw after an interrupted freeze). */
  agentTimeoutMs: number;
  /** Whether the writer of a record still runs (default: /proc). Tests. */
  ownerRunning?: (owner: ProcessIdentity) => Promise<boolean>;
  /** Instance locks: an instance another process is working on is left for the next time. */
  locks?: InstanceLocks;
  /** Each recovered operation's outcome (snapshot_driver_recovered_operations_total). */
  metrics?: AgentMetrics;
}

/** What became of one interrupted operation. */
export interface RecoveredOperation {
  image_id: string;
  instance_uuid: string;
  request_id: string;
  strategy: string;
  /** Where it stopped, e.g. `step 3 (resume)`, `setup`, `commit`. */
  stopped_at: string;
  /** The guest's state as found (after ending what the dead agent left going) and as left. */
  guest_found: PowerState | 'missing';
  guest_now: PowerState | 'missing';
  actions: string[];
  /** active: it had completed; killed; discarded: no step had begun (the request is carried out again). */
  image: 'active' | 'killed' | 'discarded' | 'deleted' | 'missing';
  /** Set when recovery failed; the record is kept for the next start. */
  error?: string;
}

/** What the store sweep removed or killed. */
export interface StoreSweep {
  /** Files in `.partial/` that no operation in the journal is writing. */
  partialsRemoved: string[];
  /** Temp files of metadata writes whose process is gone. */
  tempsRemoved: string[];
  /** Folders of exports' NBD sockets (in the temp dir) whose agent is gone. */
  socketDirsRemoved: string[];
  /** Images left queued or saving with no operation in the journal. */
  imagesKilled: string[];
}

export interface OrphanAction {
  instance_uuid: string;
  snapshot: string;
  action: 'deleted' | 'pending';
}

/**
 * Recovers every operation (of one instance, if given) whose process is gone, oldest first. Never
 * throws for one operation: its failure is in its result, and its record stays for the next start.
 */
export async function recoverOperations(deps: RecoveryDeps, uuid?: string): Promise<RecoveredOperation[]> {
  const ownerRunning = deps.ownerRunning ?? isRunning;
  const out: RecoveredOperation[] = [];
  for (const rec of await deps.operations.list()) {
    if (uuid !== undefined && rec.instance_uuid.toLowerCase() !== uuid.toLowerCase()) continue;
    if (rec.abandoned !== true && (await ownerRunning(rec.owner))) {
      deps.log.info({ image_id: rec.image_id, owner_pid: rec.owner.pid }, 'operation under way in another process: left alone');
      continue;
    }
    const recovered = deps.locks
      ? (await deps.locks.tryHold(rec.instance_uuid, 'recovery', () => recoverOne(deps, rec)))?.value
      : await recoverOne(deps, rec);
    if (recovered === undefined) {
      deps.log.warn({ image_id: rec.image_id, instance_uuid: rec.instance_uuid }, 'interrupted snapshot left for later: another process is working on its instance');
      continue;
    }
    deps.metrics?.operationRecovered(recovered.error !== undefined ? 'failed' : recovered.image);
    out.push(recovered);
  }
  return out;
}

function stoppedAt(rec: OperationRecord): string {
  if (rec.phase === 'setup' || rec.phase === 'commit') return rec.phase;
  const what = `step ${rec.step_index + 1} (${rec.steps[rec.step_index] ?? '?'})`;
  return rec.phase === 'undo' ? `undo of ${what}` : what;
}

async function recoverOne(deps: RecoveryDeps, rec: OperationRecord): Promise<RecoveredOperation> {
  const log = operationLogger(deps.log, rec.request_id, rec.instance_uuid).child({ image_id: rec.image_id, strategy: rec.strategy, recovery: true });
  const where = stoppedAt(rec);
  log.warn({ stopped_at: where, prior_state: rec.prior_state, started_at: rec.started_at }, 'recovering an interrupted snapshot');
  const result: RecoveredOperation = {
    image_id: rec.image_id,
    instance_uuid: rec.instance_uuid,
    request_id: rec.request_id,
    strategy: rec.strategy,
    stopped_at: where,
    guest_found: 'missing',
    guest_now: 'missing',
    actions: [],
    image: 'missing',
  };
  let guestError: unknown;
  try {
    await recoverGuest(deps, rec, result, log);
  } catch (err) {
    guestError = err;
    log.error({ err }, `cannot bring the guest back: ${errorMessage(err)}`);
  }
  try {
    const reason =
      (rec.abandoned === true
        ? `failed at ${where} of ${rec.strategy}, and its undo did not finish: recovered it later`
        : `interrupted: the agent stopped at ${where} of ${rec.strategy}, and recovery took it over`) +
      (result.actions.length > 0 ? ` (${result.actions.join('; ')})` : '') +
      (guestError !== undefined ? `; the guest could not be brought back: ${errorMessage(guestError)}` : '');
    result.image = await recoverImage(deps, rec, reason);
  } catch (err) {
    guestError ??= err;
    log.error({ err }, `cannot settle the image: ${errorMessage(err)}`);
  }
  if (guestError !== undefined) {
    result.error = errorMessage(guestError);
    log.error({ ...result }, 'recovery incomplete: the record is kept for the next start');
    return result;
  }
  await deps.operations.remove(rec.image_id);
  log.warn({ ...result }, 'interrupted snapshot recovered');
  return result;
}

async function recoverGuest(deps: RecoveryDeps, rec: OperationRecord, out: RecoveredOperation, log: Logger): Promise<void> {
  const { hv, lifecycle } = deps;
  const uuid = rec.instance_uuid;
  const stateOf = async (): Promise<PowerState | 'missing'> =>
    hv.info(uuid).then(
      (i) => i.state,
      (err: unknown) => {
        if (err instanceof InstanceNotFound) return 'missing' as const;
        throw err;
      },
    );
  if ((await stateOf()) === 'missing') return;
  out.actions.push(...(await hv.endInterruptedWork(uuid)));
  let state = await stateOf();
  out.guest_found = state;
  if (state === 'missing') return;

  // With no process on the disk, our snapshot goes now, before the guest is started again.
  if (!processHoldsDisk(state)) await removeOwnSnapshot(deps, rec, state, out);

  const prior = rec.prior_state;
  if (prior === 'running' || prior === 'paused') {
    if (state === 'saved') {
      await lifecycle.resume(uuid);
      out.actions.push('resumed the guest from our managed save');
    } else if (state === 'paused' && prior === 'running' && usedManagedSave(rec.strategy)) {
      // Its vCPUs were stopped for a managed save that did not happen.
      await hv.unpause(uuid);
      out.actions.push('let the guest run again (stopped for a save that did not complete)');
    } else if (state === 'shutoff' || state === 'crashed') {
      await startAgain({ hv, lifecycle, log, uuid, priorState: prior }, state);
      out.actions.push(`started the guest again: its QEMU process had died (${state}), its memory state is lost`);
    }
    state = await stateOf();
  }
  // A freeze travels with the guest's RAM through a managed save: thaw once it runs again.
  if (state === 'running' && mayHaveFrozen(rec) && (await hv.guestAgentAvailable(uuid, deps.agentTimeoutMs))) {
    const n = await hv.thawFilesystems(uuid, deps.agentTimeoutMs);
    out.actions.push(`thawed ${n} filesystem(s)`);
  }
  out.guest_now = state;
  if (state !== 'missing' && processHoldsDisk(state)) await removeOwnSnapshot(deps, rec, state, out);
}

/** Whether the record's strategy stops the vCPUs for a managed save (one this agent does not know: yes). */
function usedManagedSave(strategy: string): boolean {
  return (USES_MANAGED_SAVE as Record<string, boolean | undefined>)[strategy] ?? true;
}

/** The record says a freeze may have been asked for and not yet undone. */
function mayHaveFrozen(rec: OperationRecord): boolean {
  const quiesce = rec.steps.indexOf('quiesce');
  return quiesce >= 0 && rec.step_index >= quiesce && rec.phase !== 'commit';
}

/**
 * The interrupted operation's own snapshot. An operation whose image is active had completed: what
 * is left of its snapshot is what its strategy leaves (deferred-delete: pending on a disk a process
 * holds, deleted at once on one it does not, as keep-as-pending does). Any other operation failed, and
 * its snapshot goes by the one rule for a failed operation's snapshot (disposeOfFailedSnapshot): the
 * same as the undo of a failure the agent lived through.
 */
async function removeOwnSnapshot(deps: RecoveryDeps, rec: OperationRecord, state: PowerState, out: RecoveredOperation): Promise<void> {
  const uuid = rec.instance_uuid;
  const name = rec.snapshot_name;
  if (processHoldsDisk(state) && rec.phase === 'commit' && (await imageActive(deps, rec.image_id))) {
    if ((await deps.hv.listInternalSnapshots(uuid)).some((s) => s.name === name) && !(await deps.pending.list(uuid)).includes(name)) {
      await deps.pending.add(uuid, name);
      out.actions.push(`kept internal snapshot ${name} of the completed operation as pending (deleted at the guest's next restart)`);
    }
    return;
  }
  const fate = await disposeOfFailedSnapshot(deps, uuid, name);
  if (fate === 'deleted') out.actions.push(processHoldsDisk(state) ? `deleted internal snapshot ${name} through the guest's monitor` : `deleted internal snapshot ${name}`);
  else if (fate === 'pending') out.actions.push(`kept internal snapshot ${name} as pending: the guest's QEMU could not delete it (deleted at its next restart)`);
}

async function imageActive(deps: RecoveryDeps, imageId: string): Promise<boolean> {
  return deps.store.show(imageId).then(
    (image) => image.status === 'active',
    (err: unknown) => {
      if (err instanceof ImageNotFound) return false;
      throw err;
    },
  );
}

async function recoverImage(deps: RecoveryDeps, rec: OperationRecord, reason: string): Promise<RecoveredOperation['image']> {
  // No token (never journaled): with Glance on keystone this fails with GlanceAuthMissing and the
  // record is kept, for an operator (or a noauth Glance) to finish.
  const store = deps.store.forRequest({ requestId: rec.request_id, log: operationLogger(deps.log, rec.request_id, rec.instance_uuid) });
  // Any backup job writing it was cancelled above.
  await fs.rm(store.partialPath(rec.image_id), { force: true });
  let status: string;
  try {
    status = (await store.show(rec.image_id)).status;
  } catch (err) {
    if (err instanceof ImageNotFound) return 'missing';
    throw err;
  }
  switch (status) {
    case 'active':
      // Committed before the crash: the operation had completed. Active before its commit (a
      // streamed upload Glance finished inside the export step, then a later step was cut short),
      // the snapshot failed: its image goes as any failed snapshot's.
      if (rec.phase === 'commit') return 'active';
      break;
    case 'killed':
    case 'deleted':
      return status;
    case 'queued':
      if (rec.phase === 'setup') {
        // Nothing was touched: forget the image, so that a journaled request is carried out again.
        // Glance's record is nova-api's, and a deleted id cannot be used again there: it is left
        // queued for the replay to adopt.
        if (store.backend === 'local') await store.delete(rec.image_id);
        return 'discarded';
      }
  }
  await store.kill(rec.image_id, reason);
  return 'killed';
}

/**
 * After the operations are recovered: partial data that no operation in the journal is writing is
 * removed, and so are temp files of metadata writes whose process is gone; an image left queued or
 * saving that no operation explains (its record lost) is killed. An operation's record is written
 * before its image and its partial data exist, so a live operation's files are never touched.
 */
export async function sweepStore(deps: RecoveryDeps): Promise<StoreSweep> {
  const { store, operations, log } = deps;
  const out: StoreSweep = { partialsRemoved: [], tempsRemoved: [], socketDirsRemoved: [], imagesKilled: [] };
  for (const img of await store.unfinishedOwnImages()) {
    if (!(await operations.has(img.id))) {
      await store.kill(img.id, 'interrupted: found unfinished at start-up, with no operation in the journal');
      out.imagesKilled.push(img.id);
    }
  }
  const { partials, temps, socketDirs } = await store.leftovers();
  for (const name of partials) {
    if (isUuid(name) && (await operations.has(name))) continue;
    await fs.rm(path.join(store.partialDir, name), { force: true, recursive: true });
    out.partialsRemoved.push(name);
  }
  for (const t of temps) {
    if (await isRunning({ pid: t.pid, start: null, boot: null })) continue;
    await fs.rm(t.file, { force: true });
    out.tempsRemoved.push(path.basename(t.file));
  }
  for (const s of socketDirs) {
    if (await isRunning({ pid: s.pid, start: null, boot: null })) continue;
    await fs.rm(s.dir, { force: true, recursive: true });
    out.socketDirsRemoved.push(s.dir);
  }
  if (out.partialsRemoved.length + out.tempsRemoved.length + out.socketDirsRemoved.length + out.imagesKilled.length > 0) log.warn({ ...out }, 'image store swept');
  return out;
}

/**
 * Internal snapshots carrying our prefix that nothing explains — not pending, not the snapshot of an
 * operation in the journal — are removed: with qemu-img when no process holds the disk; on a running
 * guest recorded as pending under deferred-delete, else deleted through its monitor. Snapshots
 * without our prefix are never touched, nor instances another process is working on.
 */
export async function scanOrphans(deps: RecoveryDeps, uuid?: string): Promise<OrphanAction[]> {
  const { hv, log } = deps;
  const out: OrphanAction[] = [];
  const instances = uuid !== undefined ? [await hv.info(uuid)] : await hv.list();
  for (const inst of instances) {
    try {
      const scan = () => scanInstance(deps, inst.uuid, out);
      if (deps.locks) await deps.locks.tryHold(inst.uuid, 'orphan scan', scan);
      else await scan();
    } catch (err) {
      log.error({ instance_uuid: inst.uuid, err }, `orphan scan failed for this instance: ${errorMessage(err)}`);
    }
  }
  return out;
}

async function scanInstance(deps: RecoveryDeps, uuid: string, out: OrphanAction[]): Promise<void> {
  const { hv, pending, operations, namePrefix, log } = deps;
  const ours = (await hv.listInternalSnapshots(uuid)).map((s) => s.name).filter((n) => n.startsWith(namePrefix));
  if (ours.length === 0) return;
  const known = new Set(await pending.list(uuid));
  for (const name of ours) {
    if (known.has(name)) continue;
    const imageId = name.slice(namePrefix.length);
    // An operation's record is written before its snapshot is made: checked now, not listed earlier.
    if (isUuid(imageId) && (await operations.has(imageId))) continue;
    const { state } = await hv.info(uuid);
    let action: OrphanAction['action'];
    if (!processHoldsDisk(state)) {
      await hv.offlineSnapshotDelete(uuid, name);
      action = 'deleted';
    } else if (deps.strategy === 'deferred-delete') {
      await pending.add(uuid, name);
      action = 'pending';
    } else {
      await hv.liveSnapshotDelete(uuid, name);
      action = 'deleted';
    }
    log.warn({ instance_uuid: uuid, snapshot: name, action, state }, 'orphaned internal snapshot of ours');
    out.push({ instance_uuid: uuid, snapshot: name, action });
  }
}
