import { errorMessage } from '../errors.js';
import {
  recoverOperations,
  scanOrphans,
  sweepStore,
  type OrphanAction,
  type RecoveredOperation,
  type RecoveryDeps,
  type StoreSweep,
} from '../snapshot/recovery.js';
import type { Runtime } from './runtime.js';

/** What start-up (serve) or `cleanup` found and did. */
export interface RecoveryReport {
  operations: RecoveredOperation[];
  store: StoreSweep;
  orphans: OrphanAction[];
  /** Pending snapshots deleted because their guest has no QEMU process now. */
  pendingDeleted: { instance_uuid: string; snapshots: string[] }[];
}

export function recoveryDeps(rt: Runtime): RecoveryDeps {
  return {
    hv: rt.hv,
    store: rt.store,
    lifecycle: rt.lifecycle,
    pending: rt.pending,
    operations: rt.operations,
    log: rt.log,
    namePrefix: rt.config.snapshot.name_prefix,
    strategy: rt.config.snapshot.strategy,
    agentTimeoutMs: rt.config.snapshot.guest_agent_timeout * 1000,
    locks: rt.locks,
    metrics: rt.metrics,
  };
}

/**
 * Before an agent serves, and in `cleanup`: recovers the operations a crash interrupted, removes
 * orphaned internal snapshots of ours, and deletes the pending snapshots that the safety rule
 * allows now (guests with no QEMU process). One instance only when `uuid` is given.
 */
export async function recoverAtStart(rt: Runtime, uuid?: string): Promise<RecoveryReport> {
  const deps = recoveryDeps(rt);
  const operations = await recoverOperations(deps, uuid);
  // The store is swept for every instance's images; `cleanup <uuid>` leaves other instances' alone.
  const store = uuid === undefined ? await sweepStore(deps) : { partialsRemoved: [], tempsRemoved: [], socketDirsRemoved: [], imagesKilled: [] };
  const orphans = await scanOrphans(deps, uuid);
  const pendingDeleted: RecoveryReport['pendingDeleted'] = [];
  const instances = uuid !== undefined ? [await rt.hv.info(uuid)] : await rt.hv.list();
  for (const inst of instances) {
    try {
      const held = await rt.locks.tryHold(inst.uuid, 'pending snapshot deletion', () => rt.lifecycle.deletePendingIfOffline(inst.uuid));
      const snapshots = held?.value ?? [];
      if (snapshots.length > 0) pendingDeleted.push({ instance_uuid: inst.uuid, snapshots });
    } catch (err) {
      rt.log.error({ instance_uuid: inst.uuid, err }, `cannot delete pending snapshots: ${errorMessage(err)}`);
    }
  }
  if (operations.length > 0 || orphans.length > 0) {
    rt.log.warn(
      { recovered: operations.length, failed: operations.filter((o) => o.error !== undefined).length, orphans: orphans.length },
      'start-up recovery done',
    );
  }
  return { operations, store, orphans, pendingDeleted };
}
