import { InjectedFault } from '../errors.js';

/** The fault-injection switch for tests: `SNAPSHOT_DRIVER_FAULT=kill:<point>` or `fail:<point>`. */
export const FAULT_ENV = 'SNAPSHOT_DRIVER_FAULT';

/**
 * A named point where a test may make the agent die (SIGKILL, as in a crash) or fail. Points:
 * `rpc-accepted` (journaled and acked, not yet run), and `step:<name>` before each snapshot step.
 */
export function faultPoint(point: string): void {
  const spec = process.env[FAULT_ENV];
  if (spec === undefined || spec === '') return;
  if (spec === `kill:${point}`) process.kill(process.pid, 'SIGKILL');
  if (spec === `fail:${point}`) throw new InjectedFault(`injected failure at ${point} (${FAULT_ENV})`);
}
