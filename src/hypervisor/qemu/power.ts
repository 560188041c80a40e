import { QmpTimeout, errorMessage } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { LaunchHooks, PowerState } from '../types.js';
import { invalidState, type QemuGuests, removeFiles } from './guests.js';
import type { InstanceLayout } from './layout.js';
import { waitForGuestExit } from './qemu-process.js';
import type { QmpEvent } from './qmp.js';

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

/**
 * Soft reboot as libvirt does it (its "fake reboot"): the guest's QEMU is kept alive across the
 * guest's shutdown, for this reboot only (QMP `set-action shutdown=pause`, the runtime form of
 * `-no-shutdown`), the ACPI power button is pressed, and once the guest has shut down (SHUTDOWN from
 * the guest) it is reset and continued: same process, a clean shutdown of the guest's OS, a fresh
 * boot. A guest that reboots itself on the button (RESET from the guest) has rebooted too.
 *
 * Resolves false, leaving the guest as it is, when it did not shut down within `waitMs` (0: at
 * once), or is paused (it cannot act on the button): the caller hard reboots it. The shutdown action
 * is back to `poweroff` before anything else happens, whatever the outcome, so that a guest that
 * powers off at any other time ends its QEMU process (shut off), as always. Holds the guest's QMP
 * session while it waits (events arrive only on an open session).
 */
export async function softReboot(g: QemuGuests, uuid: string, waitMs: number): Promise<boolean> {
  const p = await g.probe(uuid);
  if (p.state !== 'running' && p.state !== 'paused') throw invalidState(p, 'reboot');
  const log = g.log.child({ instance_uuid: p.layout.uuid });
  if (p.state === 'paused' || waitMs <= 0) return false;
  return g.withQmp(p.layout, async (qmp) => {
    await qmp.execute('set-action', { shutdown: 'pause' });
    let restored = false;
    const restore = async () => {
      if (restored) return;
      restored = true;
      await qmp.execute('set-action', { shutdown: 'poweroff' });
    };
    try {
      const byGuest = (ev: QmpEvent) => ev.data?.guest === true;
      const complied = qmp.waitForEvent(['SHUTDOWN', 'RESET'], byGuest, waitMs);
      complied.catch(() => undefined);
      await qmp.execute('system_powerdown');
      let ev: QmpEvent;
      try {
        ev = await complied;
      } catch (err) {
        if (!(err instanceof QmpTimeout)) throw err;
        log.warn({ wait_ms: waitMs }, 'guest did not shut down on the ACPI power button in time');
        return false;
      }
      await restore();
      if (ev.event === 'SHUTDOWN') {
        // Stopped in the `shutdown` run state: reset it, and continue once the reset has happened
        // (`cont` is refused until then; system_reset only requests it).
        const reset = qmp.waitForEvent('RESET', () => true, g.qmpTimeoutMs);
        reset.catch(() => undefined);
        await qmp.execute('system_reset');
        await reset;
        await qmp.execute('cont');
      }
      log.info({ by: ev.event === 'SHUTDOWN' ? 'shutdown, reset' : 'guest reset' }, 'guest soft rebooted');
      return true;
    } finally {
      await restore().catch((err: unknown) =>
        log.error({ err: errorMessage(err) }, 'cannot set the shutdown action back to poweroff: a guest power-off would leave its QEMU stopped'),
      );
    }
  });
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
