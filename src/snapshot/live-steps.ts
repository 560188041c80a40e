import { takePointInTime } from './quiesce-steps.js';
import { exportInto, holdsDisk, logHeldBack, removePartial } from './steps.js';
import type { SnapshotContext, Step } from './context.js';

/**
 * The `live` strategy's steps (SPEC §3): nothing is suspended and no internal snapshot is made; a
 * point-in-time backup job copies the running disk into the store. The filesystem freeze, if any
 * (quiesce-steps.ts), lasts only while the job starts, and never longer than max_freeze_seconds.
 */

/**
 * queued → saving, and the store ready to receive the data, before any freeze: neither the metadata
 * write nor the receiver's start (its file, its socket, its hash threads) may lengthen the freeze.
 */
export const markSaving: Step = {
  name: 'mark-saving',
  async run(ctx) {
    await ctx.store.markSaving(ctx.imageId);
    ctx.incoming = await ctx.store.receive(ctx.imageId, ctx.diskSize, ctx.log, { background: true });
    // No guest waits for the copy (its own is frozen only while the job starts).
    if (ctx.watched !== undefined) ctx.incoming.holdBack.set(ctx.watched.gate());
  },
  undo: removePartial,
};

/**
 * Start the point-in-time backup job into the store's partial file. A guest with no QEMU process
 * (shut off, saved) needs no job: its offline disk is exported as it is.
 */
export const startBackup: Step = {
  name: 'start-backup',
  async run(ctx) {
    // Our freeze answered only because a process runs; else ask (a shut-off guest is never frozen).
    if (!ctx.freeze?.holding && !(await holdsDisk(ctx))) {
      await exportInto(ctx, undefined, true); // no guest is down for it
      return;
    }
    ctx.backup = await ctx.hv.startLiveBackup(ctx.uuid, ctx.incoming ?? ctx.store.partialPath(ctx.imageId));
    // A paused guest does no I/O: holding it costs the guest nothing (as a managed save of one).
    if (ctx.priorState === 'running') ctx.downtimeMs += ctx.backup.startPauseMs;
    // The point in time is the job's start: quiesced only if the freeze held until it returned.
    takePointInTime(ctx);
  },
  async undo(ctx) {
    try {
      await ctx.backup?.cancel();
    } finally {
      ctx.backup = undefined;
      await removePartial(ctx);
    }
  },
};

/** Wait for the job to copy everything; the guest runs (and writes) meanwhile. */
export const waitBackup: Step = {
  name: 'wait-backup',
  async run(ctx: SnapshotContext) {
    if (!ctx.backup) return; // exported offline by start-backup
    await ctx.backup.wait(ctx.onProgress);
    await ctx.incoming?.finish();
    if (ctx.incoming !== undefined) logHeldBack(ctx, ctx.incoming.holdBack.ms);
  },
};
