import { STRATEGIES } from '../config/schema.js';
import { errorMessage, ImageNotFound, SnapshotInterrupted } from '../errors.js';
import type { Hypervisor } from '../hypervisor/types.js';
import type { ImageMeta, ImageStoreBackend, StoreRequestAuth } from '../image-store/image-store.js';
import { operationLogger, type Logger } from '../log.js';
import type { AgentMetrics, OperationTrack } from '../metrics/agent-metrics.js';
import type { RpcContext, RpcTarget } from '../messaging/rpc-types.js';
import type { SnapshotEngine, SnapshotRequest, SnapshotResult, UnfinishedImage } from '../snapshot/engine.js';
import { rotateBackups } from './backup-rotation.js';
import { FifoSemaphore } from './fifo-semaphore.js';
import type { InstanceLocks } from '../snapshot/instance-locks.js';
import { KeyedQueue } from './keyed-queue.js';
import type { Lifecycle } from '../snapshot/lifecycle.js';
import { parseCall, SERVED_METHODS, type InstanceRef, type ParsedCall } from './rpc-args.js';

/** What the notifier is told about one snapshot or backup. */
export interface SnapshotInfo {
  instanceUuid: string;
  imageId: string;
  imageType: 'snapshot' | 'backup';
  backupType?: string;
  /** The configured default strategy when the manager was given it; at the end, the one the result names. */
  strategy?: string;
  requestId: string;
  userId?: string;
  projectId?: string;
  /** The `instance` argument as received: a nova Instance primitive, or a plain `{"uuid": …}`. */
  instance: Record<string, unknown>;
}

/**
 * Told around every snapshot and backup (the RPC layer turns these into instance.snapshot.start|end|error
 * notifications). A notifier that throws or rejects is logged and otherwise ignored.
 */
export interface SnapshotNotifier {
  snapshotStart(info: SnapshotInfo): void | Promise<void>;
  snapshotEnd(info: SnapshotInfo, result: SnapshotReply): void | Promise<void>;
  snapshotError(info: SnapshotInfo, err: unknown): void | Promise<void>;
}

/**
 * The image property that keeps the result of the run that made the image (the SnapshotResult the
 * request was answered with, as a JSON string), written durably once the image is active: a request carried out again
 * after a crash answers with it rather than running twice.
 */
export const RESULT_PROPERTY = 'snapshot_result';

/**
 * What a replayed request answers when its image had completed but the result of that run was never
 * recorded (the agent stopped between the image's commit and the record, or the record could not be
 * written): what the image itself says. What only that run knew (strategy, downtime, freeze, quiesced,
 * duration, internal snapshots left) is absent rather than made up.
 */
export type UnrecordedSnapshotResult = Pick<SnapshotResult, 'image_id' | 'status' | 'size' | 'checksum' | 'os_hash_algo' | 'os_hash_value'>;

/** What snapshot_instance/backup_instance resolve with. */
export type SnapshotReply = SnapshotResult | UnrecordedSnapshotResult;

const DEFAULT_LOCK_WAIT_MS = 15 * 60 * 1000;

/** The strategy label of a failed snapshot when the manager was given no default strategy (tests). */
const UNKNOWN_STRATEGY = 'unknown';

/** What is left of an operation once it has released its instance. */
type Rest = () => Promise<unknown>;

export interface ComputeManagerDeps {
  engine: Pick<SnapshotEngine, 'takeFromGuest'>;
  lifecycle: Lifecycle;
  store: ImageStoreBackend;
  hv: Hypervisor;
  log: Logger;
  /** `[DEFAULT] max_concurrent_snapshots`: snapshots and backups running at once, across instances. */
  maxConcurrentSnapshots: number;
  notifier?: SnapshotNotifier;
  /** `[snapshot] strategy`, only to fill SnapshotInfo.strategy. */
  defaultStrategy?: string;
  /** Held for each operation, so that no other process (a command) works on the instance meanwhile. */
  locks?: InstanceLocks;
  /** How long an operation waits for another process to finish with its instance (default 15 min). */
  lockWaitMs?: number;
  /**
   * Where the operations' facts are counted: in progress and waiting, and each snapshot's outcome
   * (snapshot_driver_snapshots_total, the downtime and duration histograms, the exported bytes).
   */
  metrics?: AgentMetrics;
}

/**
 * The RPC target of the agent (SPEC §5): nova's compute RPC API 6.x, for the methods this agent serves.
 *
 * Concurrency: operations on one instance run one at a time, in arrival order (the order of call());
 * at most maxConcurrentSnapshots snapshots/backups run at once. A snapshot waiting for a slot holds
 * its instance's place in line but never delays other instances' power operations.
 */
export class ComputeManager implements RpcTarget {
  readonly version = '6.2';
  readonly namespace: string | undefined = undefined;
  readonly methods: ReadonlySet<string> = new Set(SERVED_METHODS);

  private readonly perInstance = new KeyedQueue();
  /** The ends of each instance's snapshots and backups (hash, commit, rotation), in their order. */
  private readonly imageEnds = new KeyedQueue();
  private readonly snapshotSlots: FifoSemaphore;

  constructor(private readonly deps: ComputeManagerDeps) {
    this.snapshotSlots = new FifoSemaphore(deps.maxConcurrentSnapshots);
  }

  /** Throws NoSuchMethod or InvalidArgument (naming the argument); touches nothing. */
  validate(method: string, args: Record<string, unknown>): void {
    parseCall(method, args);
  }

  /**
   * snapshot_instance/backup_instance resolve with the SnapshotResult (a replayed one with the result
   * its first run recorded: SnapshotReply); the power operations with null.
   */
  call(method: string, args: Record<string, unknown>, ctx: RpcContext): Promise<unknown> {
    // Parsed synchronously, so that the place in the instance's line is taken in call order.
    let parsed: ParsedCall;
    try {
      parsed = parseCall(method, args);
    } catch (err) {
      return Promise.reject(err);
    }
    // The instance's line (and its lock) is held for the part that involves the guest; what is left
    // (a snapshot's hashing and commit) runs after the next operation on the instance may start.
    // Those of one instance's snapshots still end in their order: a backup's rotation must find
    // the backups before it active.
    const uuid = parsed.instance.uuid;
    const makesImage = parsed.method === 'snapshot_instance' || parsed.method === 'backup_instance';
    // Waiting in the instance's line, then in progress (but for a wait for a snapshot slot) to its end.
    const track = this.deps.metrics?.trackOperation();
    return this.perInstance
      .run(uuid, () => {
        track?.run();
        return this.run(parsed, ctx, track);
      })
      .then((rest) => (makesImage ? this.imageEnds.run(uuid, rest) : rest()))
      .finally(() => track?.end());
  }

  /** Snapshots/backups running now, and waiting for a slot. */
  snapshotStats(): { running: number; waiting: number; limit: number } {
    return { running: this.snapshotSlots.active, waiting: this.snapshotSlots.waiting, limit: this.snapshotSlots.limit };
  }

  /**
   * The operation's part that holds the instance (its place in line, and its lock against other
   * processes); resolves with the rest, to be run once the instance is released.
   */
  private async run(call: ParsedCall, ctx: RpcContext, track: OperationTrack | undefined): Promise<Rest> {
    const log = operationLogger(this.deps.log, ctx.requestId, call.instance.uuid).child({ method: call.method });
    const failed = (err: unknown) => {
      log.error({ err }, `operation failed: ${errorMessage(err)}`);
      throw err;
    };
    log.info('operation start');
    let rest: Rest;
    try {
      const locks = this.deps.locks;
      rest = locks
        ? await locks.hold(call.instance.uuid, `${call.method} request ${ctx.requestId}`, { waitMs: this.deps.lockWaitMs ?? DEFAULT_LOCK_WAIT_MS, log }, () =>
            this.dispatch(call, ctx, log, track),
          )
        : await this.dispatch(call, ctx, log, track);
    } catch (err) {
      return failed(err);
    }
    log.info('instance released');
    return () =>
      rest().then((result) => {
        log.info('operation end');
        return result;
      }, failed);
  }

  private async dispatch(call: ParsedCall, ctx: RpcContext, log: Logger, track: OperationTrack | undefined): Promise<Rest> {
    const { lifecycle } = this.deps;
    const uuid = call.instance.uuid;
    const done = (value: unknown) => () => Promise.resolve(value);
    switch (call.method) {
      case 'snapshot_instance':
        return this.snapshot(call.instance, call.imageId, ctx, log, track);
      case 'backup_instance': {
        const finish = await this.snapshot(call.instance, call.imageId, ctx, log, track, call.backupType);
        return async () => {
          const result = await finish();
          // Best effort, as in nova: the backup is made and active whatever happens to older ones.
          await rotateBackups(
            this.deps.store.forRequest({ ...storeAuth(ctx), log }),
            { instanceUuid: uuid, backupType: call.backupType, rotation: call.rotation, newImageId: call.imageId },
            log,
          ).catch((err: unknown) => log.error({ err }, `backup rotation failed: ${errorMessage(err)}`));
          return result;
        };
      }
      case 'reboot_instance':
        await (call.rebootType === 'HARD' ? lifecycle.hardReboot(uuid) : lifecycle.softReboot(uuid));
        return done(null);
      case 'start_instance':
        await lifecycle.start(uuid);
        return done(null);
      case 'stop_instance':
        await lifecycle.stop(uuid, call.cleanShutdown);
        return done(null);
    }
  }

  /**
   * The snapshot's guest part; resolves with its finish (hash, commit, record, notify), which holds
   * the snapshot slot but not the instance.
   */
  private async snapshot(
    instance: InstanceRef,
    imageId: string,
    ctx: RpcContext,
    log: Logger,
    track: OperationTrack | undefined,
    backupType?: string,
  ): Promise<() => Promise<SnapshotReply>> {
    const imageType = backupType === undefined ? 'snapshot' : 'backup';
    const info: SnapshotInfo = {
      instanceUuid: instance.uuid,
      imageId,
      imageType,
      backupType,
      strategy: this.deps.defaultStrategy,
      requestId: ctx.requestId,
      userId: ctx.userId ?? instance.userId,
      projectId: ctx.projectId ?? instance.projectId,
      instance: instance.raw,
    };
    const store = this.deps.store.forRequest({ ...storeAuth(ctx), log });
    if (ctx.replayed) {
      const earlier = await this.earlierOutcome(store, info, log);
      if (earlier !== undefined) return () => Promise.resolve(earlier);
    }
    // A slot is granted at once only when one is free and nobody waits for it (FifoSemaphore).
    if (this.snapshotSlots.active >= this.snapshotSlots.limit || this.snapshotSlots.waiting > 0) {
      log.info(this.snapshotStats(), 'snapshot waiting for a slot');
      track?.wait();
    }
    const release = await this.snapshotSlots.acquire();
    track?.run();
    log.info(this.snapshotStats(), 'snapshot slot acquired');
    const releaseSlot = () => {
      release();
      log.info(this.snapshotStats(), 'snapshot slot released');
    };
    const { metrics } = this.deps;
    const failed = async (err: unknown): Promise<never> => {
      // The strategy it would have run with: the configured one (the RPC request names none).
      metrics?.snapshotFailed(info.strategy ?? UNKNOWN_STRATEGY);
      await this.notify(log, 'snapshotError', (n) => n.snapshotError(info, err));
      throw err;
    };
    let unfinished: UnfinishedImage;
    try {
      await this.notify(log, 'snapshotStart', (n) => n.snapshotStart(info));
      const name = await this.imageName(instance, backupType);
      const req: SnapshotRequest = {
        requestId: ctx.requestId,
        instanceUuid: instance.uuid,
        imageId,
        name,
        imageType,
        backupType,
        // As nova: the image belongs to the requester (falling back to the instance's owner).
        userId: info.userId,
        owner: info.projectId,
        baseImageRef: instance.imageRef || undefined,
        auth: storeAuth(ctx),
      };
      unfinished = await this.deps.engine.takeFromGuest(req);
    } catch (err) {
      try {
        return await failed(err);
      } finally {
        releaseSlot();
      }
    }
    return async () => {
      try {
        const result = await unfinished.finish().catch(failed);
        metrics?.snapshotSucceeded({
          strategy: result.strategy,
          downtimeSeconds: result.downtime_ms / 1000,
          durationSeconds: result.duration_ms / 1000,
          bytes: result.size,
        });
        // Before anyone is told: from here a crash leaves a request that answers with this result again.
        await this.recordResult(store, result, log);
        await this.notify(log, 'snapshotEnd', (n) => n.snapshotEnd({ ...info, strategy: result.strategy }, result));
        return result;
      } finally {
        releaseSlot();
      }
    };
  }

  /**
   * Keeps the result in the image's metadata (RESULT_PROPERTY), fsynced. The snapshot is made
   * whatever happens here: a failure is logged, and a replay would then answer UnrecordedSnapshotResult.
   */
  private async recordResult(store: ImageStoreBackend, result: SnapshotResult, log: Logger): Promise<void> {
    const value = JSON.stringify(result);
    if (value.length > store.maxPropertyChars) {
      // Glance keeps at most 255 characters a property: a replay then answers with the image's own facts.
      log.debug({ image_id: result.image_id, chars: value.length }, 'snapshot result not recorded with the image: too long for the store');
      return;
    }
    try {
      // A JSON string: image properties are strings in Glance, where this store's records go too.
      await store.setProperties(result.image_id, { [RESULT_PROPERTY]: value });
    } catch (err) {
      log.error({ err, image_id: result.image_id }, `could not record the snapshot's result with its image: ${errorMessage(err)}`);
    }
  }

  /**
   * A request carried out again from the journal after a crash, whose operation had got as far as
   * making its image: it is not run twice. An active image means it had completed: it answers with
   * the result that run recorded (RESULT_PROPERTY), or, if none was, with what the image says
   * (UnrecordedSnapshotResult); its end is notified, perhaps again. An unfinished or killed one means
   * it was interrupted — start-up recovery has put the guest back and killed the image — and it ends
   * with SnapshotInterrupted (naming the image's kill reason) and an error notification. Undefined:
   * no image of this request, so it is carried out.
   */
  private async earlierOutcome(store: ImageStoreBackend, info: SnapshotInfo, log: Logger): Promise<SnapshotReply | undefined> {
    let meta: ImageMeta;
    try {
      meta = await store.show(info.imageId);
    } catch (err) {
      if (err instanceof ImageNotFound) return undefined;
      throw err;
    }
    // Another request's image: the normal path refuses the id (ImageExists).
    if (meta.properties.instance_uuid.toLowerCase() !== info.instanceUuid.toLowerCase()) return undefined;
    if (meta.status === 'active') {
      const recorded = recordedResult(meta);
      const { strategy: _configured, ...rest } = info;
      if (recorded) {
        log.warn({ image_id: meta.id }, 'replayed request had completed before the agent stopped: not run again; answering with its recorded result');
        await this.notify(log, 'snapshotEnd', (n) => n.snapshotEnd({ ...rest, strategy: recorded.strategy }, recorded));
        return recorded;
      }
      const result = unrecordedResult(meta);
      log.warn(
        { image_id: meta.id },
        "replayed request had completed before the agent stopped: not run again; its run's result was not recorded, answering with the image's",
      );
      // The strategy that made the image is not known: not the configured one, none.
      await this.notify(log, 'snapshotEnd', (n) => n.snapshotEnd(rest, result));
      return result;
    }
    if (meta.status === 'queued' || meta.status === 'saving') {
      await store.kill(meta.id, 'interrupted: found unfinished when the request was carried out again after an agent stop');
      meta = await store.show(meta.id);
    }
    const why = typeof meta.properties.kill_reason === 'string' ? meta.properties.kill_reason : `image ${meta.status}`;
    const err = new SnapshotInterrupted(`snapshot ${meta.id} of instance ${info.instanceUuid} did not complete (${why}); image ${meta.id} is ${meta.status}`);
    log.warn({ image_id: meta.id, status: meta.status }, 'replayed request had been interrupted: not run again');
    await this.notify(log, 'snapshotError', (n) => n.snapshotError(info, err));
    throw err;
  }

  /** "snapshot of <name>" / "<backup_type> backup of <name>", <name> = display_name or the hypervisor's name. */
  private async imageName(instance: InstanceRef, backupType: string | undefined): Promise<string> {
    const name = instance.displayName || (await this.deps.hv.info(instance.uuid)).name;
    return backupType === undefined ? `snapshot of ${name}` : `${backupType} backup of ${name}`;
  }

  private async notify(log: Logger, what: keyof SnapshotNotifier, send: (n: SnapshotNotifier) => void | Promise<void>): Promise<void> {
    const { notifier } = this.deps;
    if (!notifier) return;
    try {
      await send(notifier);
    } catch (err) {
      log.warn({ err }, `notifier ${what} failed: ${errorMessage(err)}`);
    }
  }
}

/** What the image store sends with this request's calls (Glance: the token, in memory only). */
function storeAuth(ctx: RpcContext): Omit<StoreRequestAuth, 'log'> {
  const roles = Array.isArray(ctx.raw.roles) ? ctx.raw.roles.filter((r): r is string => typeof r === 'string') : undefined;
  return {
    requestId: ctx.requestId,
    ...(ctx.authToken !== undefined && { authToken: ctx.authToken }),
    ...(ctx.projectId !== undefined && { projectId: ctx.projectId }),
    ...(ctx.userId !== undefined && { userId: ctx.userId }),
    ...(roles !== undefined && roles.length > 0 && { roles }),
  };
}

/**
 * The result recorded with an active image (RESULT_PROPERTY), if there is one that is whole and
 * agrees with the image; undefined otherwise.
 */
function recordedResult(meta: ImageMeta): SnapshotResult | undefined {
  const raw = meta.properties[RESULT_PROPERTY];
  if (typeof raw !== 'string') return undefined;
  let r: unknown;
  try {
    r = JSON.parse(raw);
  } catch {
    return undefined;
  }
  if (typeof r !== 'object' || r === null || Array.isArray(r)) return undefined;
  const v = r as Record<string, unknown>;
  const count = (x: unknown): x is number => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
  const whole =
    (STRATEGIES as readonly unknown[]).includes(v.strategy) &&
    count(v.downtime_ms) &&
    count(v.freeze_ms) &&
    typeof v.quiesced === 'boolean' &&
    count(v.duration_ms) &&
    count(v.internal_snapshots) &&
    // The run's record of this very image: same id and the data it committed.
    typeof v.image_id === 'string' &&
    v.image_id.toLowerCase() === meta.id.toLowerCase() &&
    v.size === meta.size &&
    v.checksum === meta.checksum &&
    v.os_hash_algo === meta.os_hash_algo &&
    v.os_hash_value === meta.os_hash_value;
  if (!whole) return undefined;
  return {
    image_id: v.image_id as string,
    status: meta.status,
    strategy: v.strategy as SnapshotResult['strategy'],
    downtime_ms: v.downtime_ms as number,
    freeze_ms: v.freeze_ms as number,
    quiesced: v.quiesced as boolean,
    duration_ms: v.duration_ms as number,
    size: v.size as number,
    checksum: v.checksum as string,
    os_hash_algo: v.os_hash_algo as string,
    os_hash_value: v.os_hash_value as string,
    internal_snapshots: v.internal_snapshots as number,
  };
}

/** What an active image without a recorded result says of itself (see UnrecordedSnapshotResult). */
function unrecordedResult(meta: ImageMeta): UnrecordedSnapshotResult {
  return {
    image_id: meta.id,
    status: meta.status,
    size: meta.size ?? 0,
    checksum: meta.checksum ?? '',
    os_hash_algo: meta.os_hash_algo,
    os_hash_value: meta.os_hash_value ?? '',
  };
}
