import { InjectedFault } from '../../errors.js';
import type { Hypervisor, InstanceFactory } from '../types.js';

/**
 * A public operation of the fake hypervisor, or a point inside one. `backupWait` and `backupCancel`
 * are a live backup job's `wait()` and `cancel()`. Points inside calls (counted and faulted like
 * calls, but not in `calls`):
 * - `cont`: the vCPUs of a paused guest run again (QMP `cont`): in `unpause`, at the end of the
 *   `resume` of a guest that ran (the saved state is loaded by then: a fault leaves the guest paused
 *   and the resume throws), and in the undo of a failed `managedSave` of a guest that ran (a fault
 *   leaves it paused; the save throws its own error);
 * - `saveMigration`: a `managedSave` writing the guest's state, its vCPUs stopped: a fault fails the
 *   save half-way, undone as the qemu backend does (no state file, the vCPUs run again if they ran).
 */
export type FakeOp =
  | Exclude<keyof Hypervisor, 'driver'>
  | keyof InstanceFactory
  | 'backupWait'
  | 'backupCancel'
  | 'cont'
  | 'saveMigration';

export interface FaultSpec {
  op: FakeOp;
  /**
   * Fire on the nth call of `op` (1-based) since the fake was created, counting calls for any
   * instance, or only those for `uuid` when given. Default: the next matching call.
   */
  nth?: number;
  /** Only calls for this instance match; default: calls for any instance. */
  uuid?: string;
  /** 'before' (default): throw instead of running. 'after': the operation takes effect, then throws. */
  when?: 'before' | 'after';
  /** Default: InjectedFault naming op and nth. */
  error?: Error;
}

/** Holds one call back until `until` settles (a slow hypervisor, a hung command). Counted like a fault. */
export interface HoldSpec {
  op: FakeOp;
  /** As FaultSpec.nth. */
  nth?: number;
  uuid?: string;
  /** The call runs once this settles (either way). */
  until: Promise<unknown>;
}

export interface FiredFaults {
  before?: Error;
  after?: Error;
  /** Settles when the call may run. */
  hold?: Promise<unknown>;
}

interface ArmedFault {
  spec: FaultSpec;
  nth: number;
}

interface ArmedHold {
  spec: HoldSpec;
  nth: number;
}

/** One-shot faults: each fires on its nth matching call and is then gone. Counts every call. */
export class FaultInjector {
  private armed: ArmedFault[] = [];
  private holds: ArmedHold[] = [];
  /** Calls so far per op, and per op and instance. */
  private readonly counts = new Map<string, number>();

  inject(spec: FaultSpec): void {
    this.armed.push({ spec: { ...spec }, nth: this.nthOf(spec, 'fault') });
  }

  hold(spec: HoldSpec): void {
    this.holds.push({ spec: { ...spec }, nth: this.nthOf(spec, 'hold') });
  }

  private nthOf(spec: { op: FakeOp; uuid?: string; nth?: number }, what: string): number {
    const done = this.count(spec.op, spec.uuid);
    const nth = spec.nth ?? done + 1;
    if (!Number.isInteger(nth) || nth < 1) throw new RangeError(`${what} nth must be an integer ≥ 1, got ${nth}`);
    if (nth <= done) {
      throw new RangeError(`${what} on ${spec.op} call #${nth} would never fire: ${done} such calls were already made`);
    }
    return nth;
  }

  /** Calls of `op` made so far (for `uuid` only, when given). */
  count(op: FakeOp, uuid?: string): number {
    return this.counts.get(countKey(op, uuid)) ?? 0;
  }

  clear(): void {
    this.armed = [];
    this.holds = [];
  }

  pending(): FaultSpec[] {
    return this.armed.map((a) => ({ ...a.spec, nth: a.nth }));
  }

  /** Counts this call against every matching fault; returns (and disarms) those that fire now. */
  onCall(op: FakeOp, uuid: string | undefined): FiredFaults {
    this.counts.set(countKey(op), this.count(op) + 1);
    if (uuid !== undefined) this.counts.set(countKey(op, uuid), this.count(op, uuid) + 1);
    const fired: FiredFaults = {};
    this.armed = this.armed.filter((a) => {
      if (a.spec.op !== op || (a.spec.uuid !== undefined && a.spec.uuid !== uuid)) return true;
      if (this.count(op, a.spec.uuid) !== a.nth) return true;
      const when = a.spec.when ?? 'before';
      const error = a.spec.error ?? defaultFault(op, a.nth, a.spec.uuid, when);
      if (fired[when] === undefined) fired[when] = error;
      return false;
    });
    const holds: Promise<unknown>[] = [];
    this.holds = this.holds.filter((h) => {
      if (h.spec.op !== op || (h.spec.uuid !== undefined && h.spec.uuid !== uuid)) return true;
      if (this.count(op, h.spec.uuid) !== h.nth) return true;
      holds.push(h.spec.until);
      return false;
    });
    if (holds.length > 0) fired.hold = Promise.allSettled(holds);
    return fired;
  }
}

function countKey(op: FakeOp, uuid?: string): string {
  return uuid === undefined ? op : `${op}\u0000${uuid}`;
}

function defaultFault(op: FakeOp, nth: number, uuid: string | undefined, when: 'before' | 'after'): InjectedFault {
  const on = uuid === undefined ? '' : ` on ${uuid}`;
  return new InjectedFault(`injected fault: ${op} call #${nth}${on} (${when})`);
}
