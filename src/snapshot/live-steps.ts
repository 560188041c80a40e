import { errorMessage, GuestAgentError } from '../errors.js';
import { processHoldsDisk } from '../hypervisor/types.js';
import { GuestFreeze } from './guest-freeze.js';
import { holdsDisk, removePartial, type SnapshotContext, type Step } from './steps.js';

/**
 * The `live` strategy's steps (SPEC §3): nothing is suspended and no internal snapshot is made; a
 * point-in-time backup job copies the running disk into the store. The filesystem freeze, if any,
 * lasts only while the job starts, and never longer than max_freeze_seconds.
 */

/** queued → saving, before any freeze: the metadata write must not lengthen the freeze. */
export const markSaving: Step = {
  name: 'mark-saving',
  async run(ctx) {
    await ctx.store.markSaving(ctx.imageId);
  },
};

/**
 * Freeze the guest's filesystems through its agent (quiesce = auto | required). Only a guest with a
 * running QEMU process has an agent that can answer; one with no process has its disk at rest.
 * `required` fails here, before the guest is touched, when the agent cannot freeze.
 */
export const quiesce: Step = {
  name: 'quiesce',
  async run(ctx) {
    const { mode, agentTimeoutMs } = ctx.quiesce;
    if (mode === 'off') return;
    const { state } = await ctx.hv.info(ctx.uuid);
    if (!processHoldsDisk(state)) return;
    const unquiesced = (why: string): void => {
      if (mode === 'required') throw new GuestAgentError(`quiesce = required, but ${why}`);
      ctx.log.info(`not quiesced: ${why}`);
    };
    if (state !== 'running') return unquiesced(`the guest is ${state}: its agent cannot answer`);
    if (!(await ctx.hv.guestAgentAvailable(ctx.uuid, agentTimeoutMs))) {
      return unquiesced(`no guest agent answered within ${agentTimeoutMs} ms`);
    }
    const freeze = new GuestFreeze(ctx.hv, ctx.uuid, ctx.quiesce, ctx.log);
    ctx.freeze = freeze;
    try {
      await freeze.freeze();
    } catch (err) {
      if (mode === 'required') throw new GuestAgentError(`quiesce = required, but the freeze failed: ${errorMessage(err)}`, { cause: err });
      ctx.log.warn({ err }, 'not quiesced: the freeze failed');
      await freeze.thaw(); // it may have frozen some filesystems, or all of them late
      return;
    }
    if (!freeze.holding) unquiesced('the freeze ran out (max_freeze_seconds) before the backup could start');
  },
  async undo(ctx) {
    await ctx.freeze?.thaw();
  },
};

/**
 * Start the point-in-time backup job into the store's partial file. A guest with no QEMU process
 * (shut off, saved) needs no job: its offline disk is exported as it is.
 */
export const startBackup: Step = {
  name: 'start-backup',
  async run(ctx) {
    const dest = ctx.store.partialPath(ctx.imageId);
    // Our freeze answered only because a process runs; else ask (a shut-off guest is never frozen).
    if (!ctx.freeze?.holding && !(await holdsDisk(ctx))) {
      await ctx.hv.exportDisk(ctx.uuid, { dest, onProgress: ctx.onProgress });
      return;
    }
    ctx.backup = await ctx.hv.startLiveBackup(ctx.uuid, dest);
    ctx.downtimeMs += ctx.backup.startPauseMs;
    ctx.quiesced = ctx.freeze?.holding ?? false;
    if (ctx.quiesce.mode === 'required' && !ctx.quiesced) {
      throw new GuestAgentError('quiesce = required, but the freeze ran out (max_freeze_seconds) before the backup job started');
    }
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

/** End the freeze as soon as the job has started (quiesce's undo thaws on every failure path). */
export const thaw: Step = {
  name: 'thaw',
  async run(ctx) {
    await ctx.freeze?.thaw();
  },
};

/** Wait for the job to copy everything; the guest runs (and writes) meanwhile. */
export const waitBackup: Step = {
  name: 'wait-backup',
  async run(ctx: SnapshotContext) {
    await ctx.backup?.wait(ctx.onProgress);
  },
};
