import { InjectedFault } from '../errors.js';

/** The fault-injection switch for tests: `SNAPSHOT_DRIVER_FAULT=kill:<point>`, `fail:<point>` or `stop:<point>`. */
export const FAULT_ENV = 'SNAPSHOT_DRIVER_FAULT';

/**
 * A named point where a test may make the agent die (SIGKILL, as in a crash), fail, or stop (SIGSTOP,
 * until continued). Points:
 * - `rpc-accepted`: the request is journaled and acknowledged, not yet run;
 * - `operation-recorded`: a snapshot is in the operation journal and its image queued, no step begun;
 * - `step:<name>` and `step:<index>:<name>` (index from 0 in the strategy's list): right before a
 *   step acts, its journal record written;
 * - `commit`: every step done, the image not yet committed;
 * - `streamed-upload` (Glance): the first run of an export streamed into Glance is about to start its
 *   PUT, nothing of the export sent yet;
 * - `managed-save:migrating`: the guest's state is being written out (libvirt: the domain is
 *   `paused (saving)`, its save carried on by libvirtd);
 * - `resume:loading` (qemu backend): the new QEMU waits for the saved state, none of it sent yet;
 * - `resume:loaded` (qemu backend): the state is loaded and its file removed, the vCPUs not yet running.
 */
export function faultPoint(point: string): void {
  const spec = process.env[FAULT_ENV];
  if (spec === undefined || spec === '') return;
  if (spec === `kill:${point}`) process.kill(process.pid, 'SIGKILL');
  // Stopped where it stands (SIGSTOP) until the test sends SIGCONT: a moment a test can act in.
  if (spec === `stop:${point}`) process.kill(process.pid, 'SIGSTOP');
  if (spec === `fail:${point}`) throw new InjectedFault(`injected failure at ${point} (${FAULT_ENV})`);
}

/** Whether the switch names this point (to look for a moment that only a test needs to find). */
export function faultArmed(point: string): boolean {
  const spec = process.env[FAULT_ENV];
  return spec === `kill:${point}` || spec === `fail:${point}`;
}

/**
 * faultPoint for a point reached right after output that is still buffered in this process (the
 * AMQP ack at `rpc-accepted`: amqplib queues frames and writes them to the socket on a later turn
 * of the event loop). A kill there first gives the event loop a moment to write that output out,
 * so that the crash comes after it, as the point's name says; without it the ack dies with the
 * process and the broker redelivers the message.
 */
export async function faultPointAfterOutput(point: string): Promise<void> {
  if (process.env[FAULT_ENV] === `kill:${point}`) await new Promise((resolve) => setTimeout(resolve, 100));
  faultPoint(point);
}
