import { errorMessage, InstanceInvalidState, LibvirtError } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { LaunchHooks, ResumeResult, SaveResult } from '../types.js';
import type { LibvirtDomains } from './domains.js';
import { DomainEventWatch } from './monitor-events.js';
import { parseKeyValues, type Virsh } from './virsh.js';
import { faultArmed, faultPoint } from '../../util/fault.js';

/**
 * Managed save and restore through libvirt (`virsh managedsave`, `virsh start`), with the vCPU stop
 * and resume times QEMU stamped on its STOP and RESUME events. The event listener of a save is kept
 * for the restore that follows (its RESUME comes from the new QEMU process, on the same listener).
 * An event missed (a listener that could not start in time, a libvirtd restart) falls back to our own
 * clock on the side that makes the downtime longer, never shorter.
 */

export interface SaveRestoreContext {
  domains: LibvirtDomains;
  virsh: Virsh;
  log: Logger;
  /** Bound of a managed save or a restore. */
  jobTimeoutMs: number;
  /** Bound of a quick virsh command (the listener's start, an event's arrival). */
  commandTimeoutMs: number;
  /** The event listeners of saves whose restore has not come yet, by uuid. */
  watches: Map<string, DomainEventWatch>;
}

/** How long an event may take to reach the listener after the command that caused it returned. */
const EVENT_GRACE_MS = 2_000;

async function openWatch(ctx: SaveRestoreContext, uuid: string): Promise<DomainEventWatch> {
  const kept = ctx.watches.get(uuid);
  if (kept !== undefined) return kept;
  const watch = await DomainEventWatch.open(ctx.virsh.opts, uuid, ctx.log, ctx.commandTimeoutMs);
  ctx.watches.set(uuid, watch);
  return watch;
}

function dropWatch(ctx: SaveRestoreContext, uuid: string): void {
  ctx.watches.get(uuid)?.close();
  ctx.watches.delete(uuid);
}

export async function managedSave(ctx: SaveRestoreContext, uuid: string): Promise<SaveResult> {
  const d = await ctx.domains.probe(uuid);
  if (d.state !== 'running' && d.state !== 'paused') throw new InstanceInvalidState(`cannot save domain ${d.name} (${d.uuid}): it is ${d.state}`);
  ctx.domains.requirePersistent(d, 'managed-save it');
  const priorState = d.state;
  const log = ctx.log.child({ instance_uuid: d.uuid });
  const watch = await openWatch(ctx, d.uuid);
  const askedAt = Date.now();
  try {
    // libvirt restores the state the domain had (a paused domain comes back paused).
    const saving = ctx.virsh.run(['managedsave', d.uuid], { uuid: d.uuid, timeoutMs: ctx.jobTimeoutMs });
    saving.catch(() => undefined);
    if (faultArmed('managed-save:migrating')) {
      // QEMU announces the migration into the save file.
      await watch.find('MIGRATION', askedAt - 1, ctx.jobTimeoutMs);
      faultPoint('managed-save:migrating');
    }
    await saving;
  } catch (err) {
    dropWatch(ctx, d.uuid);
    await abortJob(ctx, d.uuid, log);
    throw err;
  }
  // (The saved size is libvirt's to know; asking for it would cost a virsh process while the guest is down.)
  if (priorState === 'paused') {
    log.info({ prior_state: priorState }, 'domain managed-saved');
    return { priorState };
  }
  const stop = await watch.find('STOP', askedAt - 1, EVENT_GRACE_MS);
  if (stop === undefined) log.warn('no STOP event from QEMU: downtime measured from the save request');
  log.info({ prior_state: priorState }, 'domain managed-saved');
  return { priorState, vcpusStoppedAt: stop?.atMs ?? askedAt };
}

export async function resume(ctx: SaveRestoreContext, uuid: string, hooks: LaunchHooks = {}): Promise<ResumeResult> {
  const d = await ctx.domains.probe(uuid);
  if (d.state !== 'saved') throw new InstanceInvalidState(`cannot resume domain ${d.name} (${d.uuid}): it is ${d.state}`);
  const log = ctx.log.child({ instance_uuid: d.uuid });
  await hooks.beforeLaunch?.(d.uuid);
  const watch = await openWatch(ctx, d.uuid);
  try {
    const askedAt = Date.now();
    // `start` restores the managed save (and removes its image once restored).
    await ctx.virsh.run(['start', d.uuid], { uuid: d.uuid, timeoutMs: ctx.jobTimeoutMs });
    const returnedAt = Date.now();
    const { state } = await ctx.domains.probe(d.uuid);
    if (state !== 'running') {
      log.info({ state }, 'domain resumed from managed save');
      return { state };
    }
    const ev = await watch.find('RESUME', askedAt - 1, EVENT_GRACE_MS);
    if (ev === undefined) log.warn('no RESUME event from QEMU: downtime measured to the end of the restore');
    log.info({ state }, 'domain resumed from managed save');
    return { state, vcpusResumedAt: ev?.atMs ?? returnedAt };
  } finally {
    dropWatch(ctx, d.uuid);
  }
}

/**
 * Ends the domain's libvirt job if one is left (a save whose command failed or timed out may still
 * run in libvirtd: aborting a managed save resumes the guest) and waits until there is none.
 */
export async function abortJob(ctx: Pick<SaveRestoreContext, 'virsh' | 'commandTimeoutMs'>, uuid: string, log: Logger): Promise<string | undefined> {
  const jobOf = async () => parseKeyValues(await ctx.virsh.run(['domjobinfo', uuid], { uuid }));
  let job = await jobOf();
  if ((job.get('Job type') ?? 'None') === 'None') return undefined;
  const operation = job.get('Operation') ?? 'unknown';
  await ctx.virsh.run(['domjobabort', uuid], { uuid }).catch((err: unknown) => {
    // The job may have ended between the two commands.
    if (!(err instanceof LibvirtError)) throw err;
    log.warn({ err: errorMessage(err) }, 'domjobabort failed');
  });
  const deadline = Date.now() + ctx.commandTimeoutMs;
  while ((job = await jobOf()).get('Job type') !== 'None' && job.get('Job type') !== undefined) {
    if (Date.now() > deadline) throw new LibvirtError(`the ${operation} job of domain ${uuid} did not end within ${ctx.commandTimeoutMs} ms of domjobabort`, ['domjobabort', uuid]);
    await new Promise((r) => setTimeout(r, 100));
  }
  log.warn({ operation }, 'aborted a libvirt job left running');
  return operation;
}
