import { errorMessage, GuestAgentError } from '../errors.js';
import { processHoldsDisk } from '../hypervisor/types.js';
import { GuestFreeze } from './guest-freeze.js';
import type { SnapshotContext, Step } from './context.js';

/**
 * Quiesce (SPEC §3), for every strategy on a running guest: the guest's filesystems are frozen
 * through its agent right before the image's point in time is taken (the managed save, the backup
 * job's start) and thawed as soon as the guest runs again, so that every image mounts without a
 * journal replay. The freeze never lasts longer than max_freeze_seconds of the guest's running time.
 */

/**
 * Freeze the guest's filesystems (quiesce = auto | required). Only a guest with a running QEMU
 * process has an agent that can answer; one with no process has its disk at rest. `required` fails
 * here, before the guest is touched, when the agent cannot freeze.
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
      return unquiesced(`no guest agent is connected or none answered within ${agentTimeoutMs} ms`);
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
    if (!freeze.holding) unquiesced('the freeze ran out (max_freeze_seconds) before the point in time could be taken');
  },
  async undo(ctx) {
    await ctx.freeze?.thaw();
  },
};

/** End the freeze: right after the backup job started, or as soon as the saved guest runs again. */
export const thaw: Step = {
  name: 'thaw',
  async run(ctx) {
    await ctx.freeze?.thaw();
  },
};

/**
 * The image's point in time is taken (called right before the first managed save, whose `stop` fixes
 * it, and right after a backup job started): it is quiesced if our freeze holds, and `required` fails
 * if it does not (the freeze ran out). Later saves (double-suspend's second) take no point in time.
 */
export function takePointInTime(ctx: SnapshotContext): void {
  if (ctx.pointInTimeTaken) return;
  ctx.pointInTimeTaken = true;
  ctx.quiesced = ctx.freeze?.holding ?? false;
  if (ctx.quiesce.mode === 'required' && ctx.freeze !== undefined && !ctx.quiesced) {
    throw new GuestAgentError('quiesce = required, but the freeze ran out (max_freeze_seconds) before the point in time was taken');
  }
}
