import { errorMessage, SnapshotFailed } from '../errors.js';
import type { SnapshotContext, Step } from './steps.js';

/** Called before each step runs; throws to inject a failure there (tests, the fault switch). */
export type BeforeStep = (step: Step, index: number) => void | Promise<void>;

/**
 * Runs the steps in order. When one fails, the steps already done are undone in reverse order (every
 * undo is tried even if another fails), and a SnapshotFailed is thrown naming the failed step.
 */
export async function runSteps(steps: readonly Step[], ctx: SnapshotContext, beforeStep?: BeforeStep): Promise<void> {
  const done: Step[] = [];
  for (const [index, step] of steps.entries()) {
    const log = ctx.log.child({ step: step.name, step_index: index });
    try {
      await beforeStep?.(step, index);
      log.debug('step start');
      await step.run(ctx);
      log.debug('step done');
    } catch (err) {
      log.error({ err }, `step ${step.name} failed: ${errorMessage(err)}`);
      // The failed step may have half-acted (e.g. a suspend that stopped the guest): undo it too.
      const undoErrors = await undoAll([step, ...done.reverse()], ctx);
      throw new SnapshotFailed(`step ${index + 1} (${step.name}) failed: ${errorMessage(err)}`, undoErrors, {
        cause: err,
      });
    }
    done.push(step);
  }
}

async function undoAll(steps: readonly Step[], ctx: SnapshotContext): Promise<unknown[]> {
  const errors: unknown[] = [];
  for (const step of steps) {
    if (!step.undo) continue;
    try {
      await step.undo(ctx);
    } catch (err) {
      ctx.log.error({ err, step: step.name }, `undo of ${step.name} failed: ${errorMessage(err)}`);
      errors.push(err);
    }
  }
  return errors;
}
