import { errorMessage, SnapshotFailed } from '../errors.js';
import type { SnapshotContext, Step } from './context.js';

/** Called before each step runs; throws to inject a failure there (tests, the fault switch). */
export type BeforeStep = (step: Step, index: number) => void | Promise<void>;

export interface StepHooks {
  /**
   * Records durably that step `index` is about to run, or to be undone (the operation journal).
   * Awaited before the step acts: a crash at any moment leaves a record of what may have happened.
   */
  record?: (index: number, phase: 'run' | 'undo') => Promise<void>;
  /** After the record, right before the step acts. */
  beforeStep?: BeforeStep;
}

/**
 * Runs the steps in order. When one fails, the steps already done are undone in reverse order (every
 * undo is tried even if another fails), and a SnapshotFailed is thrown naming the failed step.
 */
export async function runSteps(steps: readonly Step[], ctx: SnapshotContext, hooks: StepHooks = {}): Promise<void> {
  const done: number[] = [];
  for (const [index, step] of steps.entries()) {
    const log = ctx.log.child({ step: step.name, step_index: index });
    try {
      await hooks.record?.(index, 'run');
      await hooks.beforeStep?.(step, index);
      log.debug('step start');
      await step.run(ctx);
      log.debug('step done');
    } catch (err) {
      log.error({ err }, `step ${step.name} failed: ${errorMessage(err)}`);
      // The failed step may have half-acted (e.g. a suspend that stopped the guest): undo it too.
      const undoErrors = await undoAll(steps, [index, ...done.reverse()], ctx, hooks);
      throw new SnapshotFailed(`step ${index + 1} (${step.name}) failed: ${errorMessage(err)}`, undoErrors, {
        cause: err,
      });
    }
    done.push(index);
  }
}

async function undoAll(steps: readonly Step[], indices: readonly number[], ctx: SnapshotContext, hooks: StepHooks): Promise<unknown[]> {
  const errors: unknown[] = [];
  for (const index of indices) {
    const step = steps[index]!;
    if (!step.undo) continue;
    try {
      // A record that cannot be written must not stop the undo: the guest comes first.
      await hooks.record?.(index, 'undo').catch((err: unknown) => {
        ctx.log.error({ err, step: step.name }, `cannot record the undo of ${step.name} in the operation journal: ${errorMessage(err)}`);
      });
      await step.undo(ctx);
    } catch (err) {
      ctx.log.error({ err, step: step.name }, `undo of ${step.name} failed: ${errorMessage(err)}`);
      errors.push(err);
    }
  }
  return errors;
}
