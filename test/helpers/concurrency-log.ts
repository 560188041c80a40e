/**
 * Reading the compute manager's and the snapshot engine's log lines (pino objects, in the order they
 * were written) back into what ran when: per-instance operation order, and how many snapshots ran at
 * once. Pure functions the tests assert on, and expectConcurrencyBound, which asserts itself.
 *
 * Lines used (src/compute/manager.ts, src/snapshot/engine.ts), each with request_id and instance_uuid:
 * 'operation start' | 'instance released' (its guest part done) | 'operation end' | 'operation failed: …';
 * 'snapshot slot acquired' | 'snapshot slot released' (running, waiting, limit);
 * 'snapshot start' (prior_state) | 'snapshot end' | 'snapshot failed'.
 */
import { expect } from 'vitest';

export type Line = Record<string, unknown> & { msg?: string };

export interface Sweep {
  /** Most intervals open at once. */
  max: number;
  /** Intervals opened, in all. */
  opened: number;
  /** Keys opened and never closed. */
  open: string[];
  /** A close with no open interval of its key, or a key opened twice. */
  errors: string[];
}

/**
 * Sweep line over `lines` in order: an interval opens at a line matching `opens` and closes at the
 * next line of the same key matching `closes`. Line order is exact (one writer, one thread), where
 * the lines' whole-millisecond `time` would tie.
 */
export function sweep(lines: readonly Line[], opens: (l: Line) => boolean, closes: (l: Line) => boolean, key: (l: Line) => string): Sweep {
  const openKeys = new Set<string>();
  const errors: string[] = [];
  let max = 0;
  let opened = 0;
  lines.forEach((l, i) => {
    if (opens(l)) {
      const k = key(l);
      if (openKeys.has(k)) errors.push(`line ${i}: ${k} opened twice (${l.msg})`);
      openKeys.add(k);
      opened++;
      max = Math.max(max, openKeys.size);
    } else if (closes(l)) {
      const k = key(l);
      if (!openKeys.delete(k)) errors.push(`line ${i}: ${k} closed without being open (${l.msg})`);
    }
  });
  return { max, opened, open: [...openKeys], errors };
}

const requestId = (l: Line): string => String(l.request_id);
const is = (msg: string) => (l: Line) => l.msg === msg;

const isSlotLine = (l: Line) => l.msg === 'snapshot slot acquired' || l.msg === 'snapshot slot released';

/** Snapshots holding a slot at once, from 'snapshot slot acquired' / 'snapshot slot released'. */
export function slotSweep(lines: readonly Line[]): Sweep & { maxRunningField: number; limits: number[] } {
  const slotLines = lines.filter(isSlotLine);
  const num = (v: unknown) => (typeof v === 'number' ? v : Number.NaN);
  return {
    ...sweep(slotLines, is('snapshot slot acquired'), is('snapshot slot released'), requestId),
    maxRunningField: Math.max(0, ...slotLines.map((l) => num(l.running))),
    limits: [...new Set(slotLines.map((l) => num(l.limit)))],
  };
}

/**
 * Snapshot operations that had to wait for a slot: those whose 'operation start' line came while
 * `limit` slots were held (by the sweep of the slot lines up to that line).
 */
export function waitedForSlot(lines: readonly Line[], limit: number): string[] {
  const held = new Set<string>();
  const waited: string[] = [];
  for (const l of lines) {
    if (l.msg === 'snapshot slot acquired') held.add(requestId(l));
    else if (l.msg === 'snapshot slot released') held.delete(requestId(l));
    else if (l.msg === 'operation start' && (l.method === 'snapshot_instance' || l.method === 'backup_instance') && held.size >= limit) {
      waited.push(requestId(l));
    }
  }
  return waited;
}

/** Snapshots inside the engine at once: from 'snapshot start' to 'snapshot end' or 'snapshot failed'. */
export function engineSweep(lines: readonly Line[]): Sweep {
  return sweep(lines, is('snapshot start'), (l) => l.msg === 'snapshot end' || l.msg === 'snapshot failed', requestId);
}

export interface OperationEvent {
  event: 'start' | 'end' | 'failed';
  requestId: string;
  method: string;
}

/**
 * The manager's operation lines, per instance, in log order: each operation's hold on its instance,
 * from its start to 'instance released' (a snapshot's hashing and commit come after it, beside the
 * instance's next operation), or to its failure before that.
 */
export function operationsByInstance(lines: readonly Line[]): Map<string, OperationEvent[]> {
  const out = new Map<string, OperationEvent[]>();
  const released = new Set<string>();
  for (const l of lines) {
    const msg = l.msg ?? '';
    const failed = msg.startsWith('operation failed') && !released.has(requestId(l));
    const event = msg === 'operation start' ? 'start' : msg === 'instance released' ? 'end' : failed ? 'failed' : undefined;
    if (event === undefined) continue;
    if (event === 'end') released.add(requestId(l));
    const uuid = String(l.instance_uuid);
    const list = out.get(uuid) ?? [];
    list.push({ event, requestId: requestId(l), method: String(l.method) });
    out.set(uuid, list);
  }
  return out;
}

/** Request ids in the order their operations started. */
export function startOrder(ops: readonly OperationEvent[]): string[] {
  return ops.filter((o) => o.event === 'start').map((o) => o.requestId);
}

/**
 * Where one instance's operations overlapped: each start must be followed by that same request's end
 * (or failure) before the next start. Returns the problems found (none: one at a time).
 */
export function serialProblems(ops: readonly OperationEvent[]): string[] {
  const problems: string[] = [];
  let running: string | undefined;
  for (const o of ops) {
    if (o.event === 'start') {
      if (running !== undefined) problems.push(`${o.requestId} started while ${running} was running`);
      running = o.requestId;
    } else {
      if (running !== o.requestId) problems.push(`${o.requestId} ended (${o.event}) while ${running ?? 'nothing'} was running`);
      running = undefined;
    }
  }
  if (running !== undefined) problems.push(`${running} never ended`);
  return problems;
}

/**
 * From the manager's slot lines and, independently, the engine's snapshot start/end lines: every one
 * of `snapshots` snapshots ran, never more than `limit` at once, `limit` was reached, and at least
 * one snapshot waited for a slot (else the limit was never put to the test).
 */
export function expectConcurrencyBound(lines: readonly Line[], limit: number, snapshots: number): void {
  const slots = slotSweep(lines);
  expect(slots.errors).toEqual([]);
  expect(slots.open).toEqual([]);
  expect(slots.opened).toBe(snapshots);
  expect(slots.limits).toEqual([limit]);
  expect(slots.max).toBe(limit);
  expect(slots.maxRunningField).toBe(limit);
  expect(waitedForSlot(lines, limit).length).toBeGreaterThanOrEqual(1);
  const inEngine = engineSweep(lines);
  expect(inEngine.errors).toEqual([]);
  expect(inEngine.open).toEqual([]);
  expect(inEngine.opened).toBe(snapshots);
  expect(inEngine.max).toBe(limit);
}
