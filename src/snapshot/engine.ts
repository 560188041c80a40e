import { STRATEGIES, type StrategyName } from '../config/schema.js';
import type { Lifecycle } from './lifecycle.js';
import { ImageStore, type ImageStoreBackend, type StoreRequestAuth } from '../image-store/image-store.js';
import type { Hypervisor } from '../hypervisor/types.js';
import { ConfigError, errorMessage, InvalidInstanceId, SnapshotFailed, UnknownStrategy, UsageError } from '../errors.js';
import { operationLogger, type Logger } from '../log.js';
import { isUuid } from '../util/uuid.js';
import { DEFAULT_QUIESCE, type QuiesceOptions } from './guest-freeze.js';
import type { OperationHandle, OperationJournal } from './operation-journal.js';
import { runSteps, type BeforeStep } from './run-steps.js';
import type { SnapshotContext } from './context.js';
import { STRATEGY_STEPS, USES_MANAGED_SAVE } from './strategies.js';
import type { GuestWaits } from '../util/guest-waits.js';

export interface SnapshotRequest {
  requestId: string;
  instanceUuid: string;
  imageId: string;
  /** Image name; defaults to "snapshot of <instance name>". */
  name?: string;
  /** Overrides [snapshot] strategy. */
  strategy?: string;
  imageType?: 'snapshot' | 'backup';
  backupType?: string;
  userId?: string;
  owner?: string;
  baseImageRef?: string;
  /** What a remote store (Glance) is sent with this request's calls: its token (in memory only), project, user. */
  auth?: Omit<StoreRequestAuth, 'requestId' | 'log'>;
  onProgress?: (phase: 'export' | 'checksum', fraction: number) => void;
}

/** What `snapshot --json` prints (SPEC §8). */
export interface SnapshotResult {
  image_id: string;
  status: string;
  strategy: StrategyName;
  /**
   * Guest downtime: how long its vCPUs did not run (suspend strategies; 0 for a guest that was
   * paused anyway), or how long the backup job's start held its disk I/O (`live`).
   */
  downtime_ms: number;
  /** How long the guest's filesystems may have been frozen (guest agent), 0 when no freeze. */
  freeze_ms: number;
  /** The image was taken while the guest's filesystems were frozen. */
  quiesced: boolean;
  duration_ms: number;
  size: number;
  checksum: string;
  os_hash_algo: string;
  os_hash_value: string;
  /** Our internal snapshots left on the disk afterwards. */
  internal_snapshots: number;
}

/** A snapshot whose guest part is done: its data is in the store, not yet hashed nor active. */
export interface UnfinishedImage {
  /** Makes the image active (fsync, hashes, rename); on failure kills it and throws SnapshotFailed. */
  finish(): Promise<SnapshotResult>;
}

export interface SnapshotEngineDeps {
  hv: Hypervisor;
  store: ImageStoreBackend;
  lifecycle: Lifecycle;
  log: Logger;
  namePrefix: string;
  defaultStrategy: StrategyName;
  /** Filesystem freeze of the `live` strategy (`quiesceOptions(config.snapshot)`); default DEFAULT_QUIESCE. */
  quiesce?: QuiesceOptions;
  /** The operation journal: every step is recorded in it before it acts. */
  operations: OperationJournal;
  /** Fault injection before each step (tests). */
  beforeStep?: BeforeStep;
  /**
   * Fault injection at the engine's other named points (the fault switch, src/util/fault.ts):
   * `operation-recorded` (journaled and image queued, no step begun) and `commit` (every step done).
   */
  faultPoint?: (point: string) => void | Promise<void>;
  /** The host's guests waiting on their snapshots (`[hypervisor] background_export_yield_seconds`); none: exports never hold back. */
  guestWaits?: GuestWaits;
}

export function parseStrategy(s: string): StrategyName {
  if (!(STRATEGIES as readonly string[]).includes(s)) throw new UnknownStrategy(s, STRATEGIES);
  return s as StrategyName;
}

export class SnapshotEngine {
  /** Refuses, at start, a default strategy the backend cannot carry out. */
  constructor(private readonly deps: SnapshotEngineDeps) {
    if (!this.supports(deps.defaultStrategy)) {
      throw new ConfigError(
        `[snapshot] strategy = ${deps.defaultStrategy}: the ${deps.hv.driver} hypervisor backend cannot take live backups; ` +
          `choose one of ${STRATEGIES.filter((s) => this.supports(s)).join(', ')}`,
      );
    }
  }

  private supports(strategy: StrategyName): boolean {
    return strategy !== 'live' || this.deps.hv.supportsLiveBackup;
  }

  /** Takes one snapshot. Bad input is refused before anything is touched. */
  async take(req: SnapshotRequest): Promise<SnapshotResult> {
    return (await this.takeFromGuest(req)).finish();
  }

  /**
   * Does everything of a snapshot that involves the guest: every step of its strategy, the data
   * exported into the store. What is left, `finish()` (fsync and hash the data, make the image
   * active), needs neither the guest nor its disk: a caller holding the instance's lock releases it
   * first. Until `finish()` settles the operation's record stays open (a crash before then is
   * recovered like one during the steps). Bad input is refused before anything is touched.
   */
  async takeFromGuest(req: SnapshotRequest): Promise<UnfinishedImage> {
    const { hv, lifecycle } = this.deps;
    ImageStore.validateId(req.imageId);
    if (!isUuid(req.instanceUuid)) throw new InvalidInstanceId(req.instanceUuid);
    const strategy = parseStrategy(req.strategy ?? this.deps.defaultStrategy);
    if (!this.supports(strategy)) {
      throw new UsageError(
        `strategy ${strategy}: the ${this.deps.hv.driver} hypervisor backend cannot take live backups; ` +
          `expected one of ${STRATEGIES.filter((s) => this.supports(s)).join(', ')}`,
      );
    }
    const log = operationLogger(this.deps.log, req.requestId, req.instanceUuid).child({ image_id: req.imageId, strategy });
    const store = this.deps.store.forRequest({ ...req.auth, requestId: req.requestId, log });

    const started = performance.now();
    const instance = await hv.info(req.instanceUuid);
    await hv.checkSnapshottable?.(req.instanceUuid, { managedSave: USES_MANAGED_SAVE[strategy] });
    const disk = await hv.diskInfo(req.instanceUuid);
    const snapshotName = `${this.deps.namePrefix}${req.imageId}`;
    const steps = STRATEGY_STEPS[strategy];
    const streamable = steps.some((s) => s.rerunnableExport?.(instance.state) === true);
    await store.ensureSpace(req.imageId, disk.actualSize, { streamable });
    // Recorded before anything is touched: from here a crash leaves a record that start-up recovers.
    const op = await this.deps.operations.begin({
      image_id: req.imageId,
      instance_uuid: req.instanceUuid,
      request_id: req.requestId,
      strategy,
      snapshot_name: snapshotName,
      prior_state: instance.state,
      steps: steps.map((s) => s.name),
    });
    try {
      await store.create({
        id: req.imageId,
        name: req.name ?? `snapshot of ${instance.name}`,
        instanceUuid: req.instanceUuid,
        imageType: req.imageType ?? 'snapshot',
        backupType: req.backupType,
        userId: req.userId,
        owner: req.owner,
        baseImageRef: req.baseImageRef,
        virtualSize: disk.virtualSize,
      });
    } catch (err) {
      await endRecord(op, log);
      throw err;
    }
    await this.deps.faultPoint?.('operation-recorded');
    log.info({ prior_state: instance.state }, 'snapshot start');

    const ctx: SnapshotContext = {
      hv,
      store,
      lifecycle,
      pending: lifecycle.pending,
      log,
      uuid: req.instanceUuid,
      imageId: req.imageId,
      snapshotName,
      priorState: instance.state,
      quiesce: this.deps.quiesce ?? DEFAULT_QUIESCE,
      diskSize: disk.virtualSize,
      onProgress: req.onProgress && ((f) => req.onProgress?.('export', f)),
      suspended: false,
      downtimeMs: 0,
      quiesced: false,
    };
    const failed = (err: unknown) => this.failed(err, { req, op, ctx, store, log, priorState: instance.state });
    // Until its steps (or their undoing) end: down or frozen, the guest holds the host's other exports back.
    ctx.watched = this.deps.guestWaits?.watch(() => ctx.suspended || ctx.freeze?.holding === true);
    let left: number;
    try {
      await runSteps(steps, ctx, { record: (index, phase) => op.step(index, phase), beforeStep: this.deps.beforeStep });
      left = (await hv.listInternalSnapshots(req.instanceUuid)).filter((s) => s.name.startsWith(this.deps.namePrefix)).length;
      await op.commit();
    } catch (err) {
      return await failed(err);
    } finally {
      ctx.watched?.end();
    }
    return {
      finish: async () => {
        try {
          await this.deps.faultPoint?.('commit');
          // The last act: after it the image is active, and nothing may fail any more.
          const image = await store.commit(req.imageId, {
            virtualSize: disk.virtualSize,
            onProgress: req.onProgress && ((f) => req.onProgress?.('checksum', f)),
            digests: ctx.incoming?.digests(),
          });
          await endRecord(op, log);
          const result: SnapshotResult = {
            image_id: image.id,
            status: image.status,
            strategy,
            downtime_ms: Math.round(ctx.downtimeMs),
            freeze_ms: Math.round(ctx.freeze?.frozenMs ?? 0),
            quiesced: ctx.quiesced,
            duration_ms: Math.round(performance.now() - started),
            size: image.size ?? 0,
            checksum: image.checksum ?? '',
            os_hash_algo: image.os_hash_algo,
            os_hash_value: image.os_hash_value ?? '',
            internal_snapshots: left,
          };
          log.info(result, 'snapshot end');
          return result;
        } catch (err) {
          return failed(err);
        }
      },
    };
  }

  /** A failed snapshot: its image killed, its record ended if all was put right; throws SnapshotFailed. */
  private async failed(
    err: unknown,
    { req, op, ctx, store, log, priorState }: { req: SnapshotRequest; op: OperationHandle; ctx: SnapshotContext; store: ImageStoreBackend; log: Logger; priorState: string },
  ): Promise<never> {
    const { hv } = this.deps;
    // Data still being hashed is not wanted any more.
    await ctx.incoming?.abort(err);
    const killed = await store.kill(req.imageId, errorMessage(err)).then(
      () => true,
      (killErr: unknown) => {
        log.error({ err: killErr }, `could not mark image killed: ${errorMessage(killErr)}`);
        return false;
      },
    );
    // Not put right (an undo failed, or the image is still unfinished): the record stays, so that
    // the next start's recovery tries again rather than nobody ever doing it.
    const undone = !(err instanceof SnapshotFailed) || err.undoErrors.length === 0;
    if (killed && undone) await endRecord(op, log);
    else {
      await op.abandon().catch((abandonErr: unknown) => log.error({ err: abandonErr }, `cannot mark the operation record abandoned: ${errorMessage(abandonErr)}`));
      log.error({ undo_failed: !undone, image_killed: killed }, 'operation journal record kept: recovery puts this operation right (a serving agent within seconds, else the next start)');
    }
    const state = await hv.info(req.instanceUuid).then((i) => i.state, () => 'unknown');
    // Every failure path thaws, and the freeze's own deadline thaws again; if all of that failed, say so.
    const frozen = ctx.freeze?.mayBeFrozen === true;
    log.error({ err, prior_state: priorState, state, ...(frozen && { filesystems_may_be_frozen: true }) }, 'snapshot failed');
    const restarted = ctx.guestRestarted === true ? "; the guest's QEMU process had died and the guest was started again (its memory state was lost)" : '';
    if (err instanceof SnapshotFailed) {
      if (restarted === '') throw err;
      throw new SnapshotFailed(`${err.message}${restarted}`, err.undoErrors, { cause: err.cause });
    }
    throw new SnapshotFailed(`snapshot of ${req.instanceUuid} failed: ${errorMessage(err)}${restarted}`, [], { cause: err });
  }
}

/**
 * Removes an ended operation's record. If that fails the record stays, and the next start-up
 * "recovers" an operation that had in fact ended: harmless (it finds the guest as it should be and
 * the image active or killed already), so it is only logged.
 */
async function endRecord(op: OperationHandle, log: Logger): Promise<void> {
  await op.end().catch((err: unknown) => log.error({ err }, `cannot remove the operation journal record: ${errorMessage(err)}`));
}
