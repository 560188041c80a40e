import type { Logger } from '../log.js';
import { processHoldsDisk, type Hypervisor, type LaunchHooks, type PowerState, type ResumeResult, type SaveResult } from '../hypervisor/types.js';
import type { PendingSnapshots } from './pending.js';
import { InstanceInvalidState } from '../errors.js';

/** Nova's default of [libvirt] wait_soft_reboot_seconds. */
export const DEFAULT_SOFT_REBOOT_WAIT_MS = 120_000;

export interface LifecycleOptions {
  /** `[hypervisor] wait_soft_reboot_seconds` in ms; default DEFAULT_SOFT_REBOOT_WAIT_MS. */
  softRebootWaitMs?: number;
}

/**
 * Power operations on an instance, with deferred deletion hooked into every restart of the guest's
 * QEMU process (power on, hard reboot, resume from a managed save): SPEC §3.
 */
export class Lifecycle {
  private readonly hooks: LaunchHooks;

  /** How long a soft reboot waits for the guest to shut down before a hard reboot. */
  readonly softRebootWaitMs: number;

  constructor(
    readonly hv: Hypervisor,
    readonly pending: PendingSnapshots,
    private readonly log: Logger,
    opts: LifecycleOptions = {},
  ) {
    this.hooks = { beforeLaunch: (uuid) => this.pending.deleteAll(this.hv, uuid, this.log).then(() => undefined) };
    this.softRebootWaitMs = opts.softRebootWaitMs ?? DEFAULT_SOFT_REBOOT_WAIT_MS;
  }

  start(uuid: string): Promise<void> {
    return this.hv.start(uuid, this.hooks);
  }

  stop(uuid: string, graceful: boolean): Promise<void> {
    return this.hv.stop(uuid, { graceful });
  }

  /**
   * Nova's soft reboot: guest-cooperative (the ACPI power button; the guest shuts down and is reset
   * in the same process: deletes nothing), and a hard reboot when the guest has not shut down within
   * `[hypervisor] wait_soft_reboot_seconds` (a paused guest cannot: hard at once). Resolves with
   * which one it was.
   */
  async softReboot(uuid: string): Promise<'soft' | 'hard'> {
    if (await this.hv.softReboot(uuid, { waitMs: this.softRebootWaitMs })) {
      this.log.info({ instance_uuid: uuid }, 'instance soft rebooted');
      return 'soft';
    }
    this.log.warn(
      { instance_uuid: uuid, wait_ms: this.softRebootWaitMs },
      'guest did not shut down on the ACPI power button in time ([hypervisor] wait_soft_reboot_seconds): hard reboot',
    );
    await this.hardReboot(uuid);
    return 'hard';
  }

  /** Restarts the guest's QEMU process (a paused or saved guest comes back running). */
  async hardReboot(uuid: string): Promise<void> {
    const { state } = await this.hv.info(uuid);
    if (processHoldsDisk(state)) await this.hv.stop(uuid, { graceful: false });
    if (state === 'saved') {
      // Nova's hard reboot discards a managed save; we resume it instead of losing the guest's RAM,
      // then restart, so that the result is the same (running, fresh process).
      await this.hv.resume(uuid, this.hooks);
      await this.hv.stop(uuid, { graceful: false });
    }
    await this.hv.start(uuid, this.hooks);
  }

  suspend(uuid: string): Promise<SaveResult> {
    return this.hv.managedSave(uuid);
  }

  resume(uuid: string): Promise<ResumeResult> {
    return this.hv.resume(uuid, this.hooks);
  }

  /** Deletes pending snapshots now if no process holds the disk; returns what was deleted. */
  async deletePendingIfOffline(uuid: string): Promise<string[]> {
    // Most instances have none: no need to ask the hypervisor (a virsh process on libvirt).
    if ((await this.pending.list(uuid)).length === 0) return [];
    const { state } = await this.hv.info(uuid);
    if (processHoldsDisk(state)) return [];
    return this.pending.deleteAll(this.hv, uuid, this.log);
  }

  async requireState(uuid: string, allowed: readonly PowerState[], action: string): Promise<PowerState> {
    const { state } = await this.hv.info(uuid);
    if (!allowed.includes(state)) {
      throw new InstanceInvalidState(`cannot ${action} instance ${uuid}: it is ${state} (needs ${allowed.join(' or ')})`);
    }
    return state;
  }
}
