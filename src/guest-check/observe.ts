import { observed, type GuestConsole, type GuestObserved } from './console.js';

/**
 * What a running test guest saw of one operation, from its own console: the writer's last fsynced
 * record right before the operation began and right after it ended (bounds for the image's last
 * record), and the stops and stalls the probe and the writer reported in between.
 */
export interface Observation<T> {
  result: T;
  /** A record the guest had fsynced before the operation began: the image must hold it. */
  fsyncedBefore: number;
  /** A record the guest fsynced after the operation ended: the image cannot hold a later one. */
  fsyncedAfter: number;
  guest: GuestObserved;
}

/** Probe ticks to wait for after the operation: a stop is reported at the first quiet tick after it. */
const SETTLE_TICKS = 3;

/**
 * Runs `op` on a running guest and collects what the guest observed. Waits for a fresh writer line
 * first (so the bound is tight) and afterwards for the probe to have looked at everything.
 */
export async function observeRunningGuest<T>(console: GuestConsole, op: () => Promise<T>, timeoutMs = 60_000): Promise<Observation<T>> {
  const fsyncedBefore = await console.waitForFsynced(await console.mark(), timeoutMs);
  const from = await console.mark();
  const result = await op();
  const end = await console.mark();
  const fsyncedAfter = await console.waitForFsynced(end, timeoutMs);
  await console.waitForTicks(end, SETTLE_TICKS, timeoutMs);
  // Up to now: the settling ticks after the operation belong to it (its stop is reported then).
  return { result, fsyncedBefore, fsyncedAfter, guest: observed(await console.events(from)) };
}
