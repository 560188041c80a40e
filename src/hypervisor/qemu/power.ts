import type { Logger } from '../../log.js';
import type { LaunchHooks, PowerState } from '../types.js';
import { invalidState, type QemuGuests, removeFiles } from './guests.js';
import type { InstanceLayout } from './layout.js';
import { waitForGuestExit } from './qemu-process.js';

/** Power operations of the qemu backend: power on and off, reset, pause and unpause. */

export async function start(g: QemuGuests, uuid: string, hooks: LaunchHooks): Promise<void> {
  const p = await g.probe(uuid);
  if (p.state !== 'shutoff' && p.state !== 'crashed') throw invalidState(p, 'start');
  // A crashed guest may still have its (stopped) process: end it first.
  if (p.pid !== undefined) await g.endProcess(p.layout, p.pid, 'quit');
  await hooks.beforeLaunch?.(p.layout.uuid);
  await g.launch(p.layout, p.record, []);
  g.log.info({ instance_uuid: p.layout.uuid }, 'instance started');
}

/** `shutdownTimeoutMs`: how long a graceful stop waits for the guest to power off before forcing it. */
export async function stop(g: QemuGuests, uuid: string, opts: { graceful: boolean }, shutdownTimeoutMs: number): Promise<void> {
  const p = await g.probe(uuid);
  if (p.state === 'shutoff' || p.state === 'saved') throw invalidState(p, 'stop');
  const log = g.log.child({ instance_uuid: p.layout.uuid });
  if (p.pid === undefined) {
    // Crashed and gone: only its runtime files are left.
    await removeFiles(p.layout.staleRuntimeFiles);
    log.info('crashed instance cleaned up');
    return;
  }
  // A paused guest cannot act on an ACPI power-down: no point waiting for it.
  if (opts.graceful && p.state === 'running' && (await powerDown(g, p.layout, p.pid, shutdownTimeoutMs, log))) return;
  await g.endProcess(p.layout, p.pid, 'quit');
  log.info('instance stopped');
}

export function softReboot(g: QemuGuests, uuid: string): Promise<void> {
  return runIn(g, uuid, ['running', 'paused'], 'reboot', 'system_reset');
}

export function pause(g: QemuGuests, uuid: string): Promise<void> {
  return runIn(g, uuid, ['running'], 'pause', 'stop');
}

export function unpause(g: QemuGuests, uuid: string): Promise<void> {
  return runIn(g, uuid, ['paused'], 'unpause', 'cont');
}

/**
 * ACPI power-down, then waits up to `timeoutMs` for the guest to power off. Resolves true if it did
 * (its runtime files are then removed), false if it has to be forced.
 */
async function powerDown(g: QemuGuests, layout: InstanceLayout, pid: number, timeoutMs: number, log: Logger): Promise<boolean> {
  await g.withQmp(layout, (qmp) => qmp.execute('system_powerdown'));
  if (await waitForGuestExit(pid, layout.uuid, timeoutMs)) {
    await removeFiles(layout.processFiles);
    log.info('instance powered off by the guest');
    return true;
  }
  log.warn({ timeout_ms: timeoutMs }, 'guest did not power off in time: forcing');
  return false;
}

/** Runs one QMP command on a guest in one of the `allowed` states; InstanceInvalidState naming `action` otherwise. */
async function runIn(g: QemuGuests, uuid: string, allowed: readonly PowerState[], action: string, command: string): Promise<void> {
  const p = await g.probe(uuid);
  if (!allowed.includes(p.state)) throw invalidState(p, action);
  await g.withQmp(p.layout, (qmp) => qmp.execute(command));
}
