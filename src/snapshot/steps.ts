import fs from 'node:fs/promises';
import { errorMessage, GuestLeftPaused, GuestLost, InstanceInvalidState, QmpTimeout } from '../errors.js';
import { StreamedUploadCut } from '../image-store/errors.js';
import type { Logger } from '../log.js';
import { processHoldsDisk, type Hypervisor, type PowerState, type ResumeResult } from '../hypervisor/types.js';
import type { SnapshotContext, Step } from './context.js';
import { windowDowntimeMs, type SuspendWindow } from './downtime.js';
import type { PendingSnapshots } from './pending.js';
import { takePointInTime } from './quiesce-steps.js';

export async function holdsDisk(ctx: SnapshotContext): Promise<boolean> {
  return processHoldsDisk((await ctx.hv.info(ctx.uuid)).state);
}

/**
 * Resumes the guest if this operation managed-saved it (also after a save that failed half-way). A
 * guest whose QEMU process died meanwhile (no saved state to resume) is started again, never left down;
 * one that this operation left paused (a save undone, or a resume loaded, whose final `cont` failed)
 * is run again. A guest that was paused before the operation stays paused.
 */
async function resumeIfSuspended(ctx: SnapshotContext): Promise<void> {
  if (!ctx.suspended) return;
  let resumed: ResumeResult | undefined;
  try {
    // Asked straight away (the resume checks the state itself): the guest is down meanwhile, and a
    // backend's state query may cost a process (libvirt's virsh).
    resumed = await ctx.lifecycle.resume(ctx.uuid);
  } catch (err) {
    // Not saved: a save that failed half-way was undone (running, paused), or the QEMU process died;
    // or the resume failed: before the state was loaded (still saved), or after (paused, its `cont` failed).
    const state = await ctx.hv.info(ctx.uuid).then(
      (i) => i.state,
      () => undefined,
    );
    if (state === 'paused' && ctx.priorState === 'running') await runAgain(ctx, err);
    else if (!(err instanceof InstanceInvalidState)) throw err;
    else if (state === 'shutoff' || state === 'crashed') await startAgain(ctx, state);
    else if (state === 'saved' || state === undefined) throw err;
  }
  ctx.suspended = false;
  ctx.freeze?.guestRunning();
  if (ctx.suspendWindow !== undefined) {
    ctx.downtimeMs += windowDowntimeMs(ctx.suspendWindow, ctx.priorState, resumed, performance.now());
    ctx.suspendWindow = undefined;
  }
}

/**
 * The guest ran before the operation and is paused now, its process alive: this operation's save (or
 * resume) stopped its vCPUs and the `cont` that should have run them again failed. Asks once more
 * (every undo that reaches here asks again); if the guest still cannot run, GuestLeftPaused.
 */
async function runAgain(ctx: SnapshotContext, cause: unknown): Promise<void> {
  ctx.log.warn({ err: errorMessage(cause) }, 'the guest was left paused by this operation (its vCPUs did not run again): unpausing it');
  try {
    await ctx.hv.unpause(ctx.uuid);
  } catch (err) {
    throw new GuestLeftPaused(
      `instance ${ctx.uuid}: its vCPUs were stopped for a managed save and could not run again ` +
        `(${errorMessage(cause)}; unpause: ${errorMessage(err)}); it is paused, and recovered once that is possible`,
      { cause: err },
    );
  }
  ctx.log.warn('guest running again after its save or resume had left it paused');
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

/** What disposeOfFailedSnapshot did with the snapshot. */
export type FailedSnapshotFate = 'absent' | 'deleted' | 'pending';

/**
 * THE rule for the internal snapshot of an operation that failed (its undo) or was interrupted
 * (start-up recovery), whatever the strategy, deferred-delete included. No image needs it, so it is
 * deleted now wherever SPEC §2 lets the disk be changed now: with qemu-img when no process holds the
 * disk, through that very process's monitor when one does. Only when the process that holds the disk
 * cannot delete it (its monitor refuses: e.g. a QEMU whose disk is still inactive after a `cont` that
 * failed) is it recorded pending, so that the next restart of the guest's process deletes it (SPEC §3).
 * A qemu-img that fails on a disk no process holds is thrown, not made pending: the next launch would
 * run into the same failure before the guest could start.
 */
export async function disposeOfFailedSnapshot(
  d: { hv: Hypervisor; pending: PendingSnapshots; log: Logger },
  uuid: string,
  name: string,
): Promise<FailedSnapshotFate> {
  const exists = async () => (await d.hv.listInternalSnapshots(uuid)).some((s) => s.name === name);
  const log = d.log.child({ instance_uuid: uuid, snapshot: name });
  if (!(await exists())) {
    await d.pending.remove(uuid, name);
    return 'absent';
  }
  const { state } = await d.hv.info(uuid);
  try {
    if (processHoldsDisk(state)) await d.hv.liveSnapshotDelete(uuid, name);
    else await d.hv.offlineSnapshotDelete(uuid, name);
  } catch (err) {
    // Gone already (e.g. taken for an orphan by another agent on a shared libvirtd): what was wanted.
    if (await exists()) {
      if (!processHoldsDisk(state)) throw err;
      log.warn({ err: errorMessage(err), state }, "the guest's QEMU cannot delete the internal snapshot now: recorded pending, deleted at its next restart");
      await d.pending.add(uuid, name);
      return 'pending';
    }
    log.warn({ err: errorMessage(err) }, 'internal snapshot already gone when it was deleted');
  }
  await d.pending.remove(uuid, name);
  return 'deleted';
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
    await disposeOfFailedSnapshot(ctx, ctx.uuid, ctx.snapshotName);
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

/**
 * Exports into the store. With a guest waiting (`cold`'s of a guest it saved), the store writes the
 * data into the partial file as it comes and hashes it behind the writing: the step ends when the
 * data is written (the hashes are awaited by the commit, after the instance is released). An export
 * no guest waits for (`background`: its source is read again as it was) is taken at the hashes' pace
 * instead, or streamed by the store straight into the image: that step ends when the store has it
 * all, and when the store reports the upload cut with the image ready for another
 * (StreamedUploadCut, bounded by the store), the export is run again from its start.
 */
export async function exportInto(ctx: SnapshotContext, snapshotName: string | undefined, background: boolean): Promise<void> {
  await ctx.store.markSaving(ctx.imageId);
  for (let attempt = 1; ; attempt++) {
    // live's first step has made it ready already (staged: a backup job cannot be run again).
    const incoming = ctx.incoming ?? (await ctx.store.receive(ctx.imageId, ctx.diskSize, ctx.log, { streamable: background, background, attempt }));
    ctx.incoming = incoming;
    if (background && ctx.watched !== undefined) incoming.holdBack.set(ctx.watched.gate());
    try {
      await ctx.hv.exportDisk(ctx.uuid, { snapshotName, dest: incoming, onProgress: ctx.onProgress, background, virtualSize: ctx.diskSize });
      await incoming.finish();
      logHeldBack(ctx, incoming.holdBack.ms);
      return;
    } catch (err) {
      // A streamed upload that failed first fails the export too: the store's error says why.
      const cause = await incoming.abort(err);
      ctx.incoming = undefined;
      if (!(cause instanceof StreamedUploadCut)) throw cause;
      ctx.log.warn({ attempt, err: errorMessage(cause) }, 'streamed upload cut: running the export again into a new upload');
    }
  }
}

/** How long an export no guest waits for held back for the other guests of the host, if it did. */
export function logHeldBack(ctx: SnapshotContext, heldBackMs: number): void {
  if (heldBackMs > 0) ctx.log.info({ held_back_ms: Math.round(heldBackMs) }, 'the export held back while other guests of this host waited on their snapshots');
}

/** Removes the partial data (and stops its hashing, if it was being received). */
export async function removePartial(ctx: SnapshotContext): Promise<void> {
  await ctx.incoming?.abort(new Error('export undone'));
  ctx.incoming = undefined;
  await fs.rm(ctx.store.partialPath(ctx.imageId), { force: true });
}

/** Raw export of the active layer of the offline disk (cold: a guest it saved waits for it). */
export const exportDisk: Step = {
  name: 'export-disk',
  rerunnableExport: (prior) => !processHoldsDisk(prior),
  run: (ctx) => exportInto(ctx, undefined, !processHoldsDisk(ctx.priorState)),
  undo: removePartial,
};

/** Raw export of our internal snapshot (read with -U while the guest runs). */
export const exportSnapshot: Step = {
  name: 'export-snapshot',
  rerunnableExport: () => true,
  run: (ctx) => exportInto(ctx, ctx.snapshotName, true),
  undo: removePartial,
};

/** Delete our snapshot: through the running QEMU's monitor, or with qemu-img when it is offline. */
export const deleteSnapshot: Step = {
  name: 'delete-snapshot',
  async run(ctx) {
    try {
      await deleteOwnSnapshotNow(ctx);
    } catch (err) {
      // The image is finished by now. A monitor delete that only timed out goes on
      // in QEMU (its late reply is logged): it must not fail the image. The snapshot is recorded
      // pending, so that the next restart of the guest's process deletes it if it is still there.
      if (!(err instanceof QmpTimeout)) throw err;
      ctx.log.warn({ err: errorMessage(err), snapshot: ctx.snapshotName }, 'internal snapshot delete timed out (QEMU goes on with it): recorded pending, the image is kept');
      await ctx.pending.add(ctx.uuid, ctx.snapshotName);
    }
  },
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
