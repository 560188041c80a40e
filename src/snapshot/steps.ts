import fs from 'node:fs/promises';
import { errorMessage, GuestLost, InstanceInvalidState } from '../errors.js';
import type { Logger } from '../log.js';
import { processHoldsDisk, type BackupJob, type Hypervisor, type PowerState, type ResumeResult } from '../hypervisor/types.js';
import type { ImageStore } from '../image-store/image-store.js';
import type { Lifecycle } from '../compute/lifecycle.js';
import { windowDowntimeMs, type SuspendWindow } from './downtime.js';
import type { GuestFreeze, QuiesceOptions } from './guest-freeze.js';
import type { PendingSnapshots } from './pending.js';
import { takePointInTime } from './quiesce-steps.js';

/** What every step of one snapshot operation sees and updates. */
export interface SnapshotContext {
  readonly hv: Hypervisor;
  readonly store: ImageStore;
  readonly lifecycle: Lifecycle;
  readonly pending: PendingSnapshots;
  readonly log: Logger;
  readonly uuid: string;
  readonly imageId: string;
  /** The internal snapshot this operation makes: name_prefix + image id. */
  readonly snapshotName: string;
  /** Power state before the operation; the guest is back in it afterwards. */
  readonly priorState: PowerState;
  readonly quiesce: QuiesceOptions;
  onProgress?: (fraction: number) => void;
  /** True from the start of this operation's managed save until the guest is resumed. */
  suspended: boolean;
  /** Guest downtime so far, in ms: the time its vCPUs did not run (or its I/O was held). */
  downtimeMs: number;
  /** This operation's managed save, until the guest is resumed. */
  suspendWindow?: SuspendWindow;
  /** The guest-agent freeze, once one was asked for. */
  freeze?: GuestFreeze;
  /** live: the backup job, once started. */
  backup?: BackupJob;
  /** The image's point in time was taken (the first managed save, or the backup job's start). */
  pointInTimeTaken?: boolean;
  /** The point in time was taken while the guest's filesystems were frozen. */
  quiesced: boolean;
  /** The guest's QEMU died during the operation and was booted again (its memory state was lost). */
  guestRestarted?: boolean;
}

/** One step of a strategy, and how to undo it when a later step fails. */
export interface Step {
  readonly name: string;
  run(ctx: SnapshotContext): Promise<void>;
  undo?(ctx: SnapshotContext): Promise<void>;
}

export async function holdsDisk(ctx: SnapshotContext): Promise<boolean> {
  return processHoldsDisk((await ctx.hv.info(ctx.uuid)).state);
}

/**
 * Resumes the guest if this operation managed-saved it (also after a save that failed half-way). A
 * guest whose QEMU process died meanwhile (no saved state to resume) is started again, never left down.
 */
async function resumeIfSuspended(ctx: SnapshotContext): Promise<void> {
  if (!ctx.suspended) return;
  let resumed: ResumeResult | undefined;
  try {
    // Asked straight away (the resume checks the state itself): the guest is down meanwhile, and a
    // backend's state query may cost a process (libvirt's virsh).
    resumed = await ctx.lifecycle.resume(ctx.uuid);
  } catch (err) {
    if (!(err instanceof InstanceInvalidState)) throw err;
    // Not saved: a save that failed half-way was undone (running, paused), or the QEMU process died.
    const { state } = await ctx.hv.info(ctx.uuid);
    if (state === 'shutoff' || state === 'crashed') await startAgain(ctx, state);
    else if (state === 'saved') throw err;
  }
  ctx.suspended = false;
  ctx.freeze?.guestRunning();
  if (ctx.suspendWindow !== undefined) {
    ctx.downtimeMs += windowDowntimeMs(ctx.suspendWindow, ctx.priorState, resumed, performance.now());
    ctx.suspendWindow = undefined;
  }
}

/**
 * The guest's QEMU died during the operation (killed, or crashed while saving): its memory is lost, so
 * it is booted again into its prior power state. If even that fails it is reported shut off (GuestLost).
 */
export async function startAgain(ctx: Pick<SnapshotContext, 'hv' | 'lifecycle' | 'log' | 'uuid' | 'priorState'> & { guestRestarted?: boolean }, state: PowerState): Promise<void> {
  ctx.log.error({ state, prior_state: ctx.priorState }, "the guest's QEMU process died during the snapshot: starting it again (its memory state is lost)");
  try {
    await ctx.lifecycle.start(ctx.uuid);
    if (ctx.priorState === 'paused') await ctx.hv.pause(ctx.uuid);
  } catch (err) {
    throw new GuestLost(
      `instance ${ctx.uuid}: its QEMU process died during the snapshot and could not be started again (${errorMessage(err)}); it is shut off`,
      { cause: err },
    );
  }
  ctx.guestRestarted = true;
  ctx.log.warn({ state: ctx.priorState }, 'guest started again after its QEMU process died');
}

/** Delete our snapshot however §2 allows now: through the monitor if a process holds the disk. */
async function deleteOwnSnapshotNow(ctx: SnapshotContext): Promise<void> {
  if (await holdsDisk(ctx)) await ctx.hv.liveSnapshotDelete(ctx.uuid, ctx.snapshotName);
  else await ctx.hv.offlineSnapshotDelete(ctx.uuid, ctx.snapshotName);
}

async function ownSnapshotExists(ctx: SnapshotContext): Promise<boolean> {
  return (await ctx.hv.listInternalSnapshots(ctx.uuid)).some((s) => s.name === ctx.snapshotName);
}

/** Managed save of a running or paused guest; a shut-off (or saved) guest needs none. */
export const suspend: Step = {
  name: 'suspend',
  async run(ctx) {
    if (!(await holdsDisk(ctx))) return;
    takePointInTime(ctx);
    const window: SuspendWindow = { wallStartedAt: performance.now() };
    ctx.suspendWindow = window;
    ctx.suspended = true; // before the save: a save that fails half-way is undone by a resume
    window.save = await ctx.lifecycle.suspend(ctx.uuid);
    // Saved frozen: the guest's vCPUs do not run until the resume, which thaws it right after.
    ctx.freeze?.guestStopped();
  },
  async undo(ctx) {
    await resumeIfSuspended(ctx);
  },
};

/** Resume from our managed save, back to the prior state (pending snapshots are deleted first). */
export const resume: Step = {
  name: 'resume',
  run: resumeIfSuspended,
};

/** `qemu-img snapshot -c` on the offline disk. */
export const createSnapshot: Step = {
  name: 'create-snapshot',
  async run(ctx) {
    await ctx.hv.offlineSnapshotCreate(ctx.uuid, ctx.snapshotName);
  },
  async undo(ctx) {
    if (await ownSnapshotExists(ctx)) await deleteOwnSnapshotNow(ctx);
  },
};

/**
 * monitor-snapshot: our internal snapshot created by the process that holds the disk, through its
 * monitor, while the guest runs on (no managed save); with qemu-img when no process holds it. The
 * guest's disk I/O waits while the snapshot table is written: that is its downtime.
 */
export const monitorCreateSnapshot: Step = {
  name: 'monitor-create-snapshot',
  async run(ctx) {
    // Our freeze answered only because a process runs; else ask (a shut-off guest is never frozen).
    if (!ctx.freeze?.holding && !(await holdsDisk(ctx))) {
      await ctx.hv.offlineSnapshotCreate(ctx.uuid, ctx.snapshotName);
      return;
    }
    const { ioHeldMs } = await ctx.hv.liveSnapshotCreate(ctx.uuid, ctx.snapshotName);
    // A paused guest does no I/O: holding it costs the guest nothing.
    if (ctx.priorState === 'running') ctx.downtimeMs += ioHeldMs;
    // Quiesced only if the freeze held until the create returned.
    takePointInTime(ctx);
  },
  undo: createSnapshot.undo,
};

async function exportInto(ctx: SnapshotContext, snapshotName: string | undefined): Promise<void> {
  await ctx.store.markSaving(ctx.imageId);
  await ctx.hv.exportDisk(ctx.uuid, { snapshotName, dest: ctx.store.partialPath(ctx.imageId), onProgress: ctx.onProgress });
}

export async function removePartial(ctx: SnapshotContext): Promise<void> {
  await fs.rm(ctx.store.partialPath(ctx.imageId), { force: true });
}

/** Raw export of the active layer of the offline disk (cold). */
export const exportDisk: Step = {
  name: 'export-disk',
  run: (ctx) => exportInto(ctx, undefined),
  undo: removePartial,
};

/** Raw export of our internal snapshot (read with -U while the guest runs). */
export const exportSnapshot: Step = {
  name: 'export-snapshot',
  run: (ctx) => exportInto(ctx, ctx.snapshotName),
  undo: removePartial,
};

/** Delete our snapshot: through the running QEMU's monitor, or with qemu-img when it is offline. */
export const deleteSnapshot: Step = {
  name: 'delete-snapshot',
  run: deleteOwnSnapshotNow,
};

/** Delete the earlier pending snapshots of this disk (the guest's process is gone). */
export const deletePending: Step = {
  name: 'delete-pending',
  async run(ctx) {
    if (await holdsDisk(ctx)) return; // cannot happen after suspend; the next restart will do it
    await ctx.pending.deleteAll(ctx.hv, ctx.uuid, ctx.log);
  },
};

/** Keep our snapshot until the next process restart; a guest with no process gets it deleted at once. */
export const keepAsPending: Step = {
  name: 'keep-as-pending',
  async run(ctx) {
    if (await holdsDisk(ctx)) await ctx.pending.add(ctx.uuid, ctx.snapshotName);
    else await ctx.hv.offlineSnapshotDelete(ctx.uuid, ctx.snapshotName);
  },
};
