import { randomUUID } from 'node:crypto';
import { constants } from 'node:os';
import type { Command } from 'commander';
import { pino } from 'pino';
import type { Runtime } from '../service/runtime.js';
import { errorMessage, InvalidInstanceId, SnapshotFailed } from '../errors.js';
import { ImageStore } from '../image-store/image-store.js';
import { parseStrategy } from '../snapshot/engine.js';
import { isUuid } from '../util/uuid.js';
import type { RuntimeFactory } from '../service/runtime.js';
import { printJson, printTable } from './output.js';
import { progressReporter } from './progress.js';

/** The signals that interrupt a `snapshot` command: Ctrl-C, a kill, its terminal closed. */
const INTERRUPTS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
type Interrupt = (typeof INTERRUPTS)[number];

/** The operation was interrupted by a signal, and undone. */
class Interrupted extends Error {
  constructor(readonly signal: Interrupt) {
    super(`interrupted by ${signal}`);
    this.name = 'Interrupted';
  }
}

export function registerSnapshotCommand(program: Command, runtime: RuntimeFactory): void {
  program
    .command('snapshot <uuid>')
    .description('snapshot an instance into the image store')
    .option('--image-id <id>', 'image id (a UUID; default: a new one)')
    .option('--name <name>', 'image name')
    .option('--strategy <strategy>', 'override [snapshot] strategy')
    .option('--json', 'print the result as one JSON object')
    .action(async (uuid: string, opts: { imageId?: string; name?: string; strategy?: string; json?: boolean }) => {
      const rt = await runtime();
      // Bad input is refused before the instance's lock (a file) is taken.
      const imageId = opts.imageId ?? randomUUID();
      ImageStore.validateId(imageId);
      if (!isUuid(uuid)) throw new InvalidInstanceId(uuid);
      if (opts.strategy !== undefined) parseStrategy(opts.strategy);
      await rt.hv.info(uuid);
      // From here a signal interrupts the snapshot, not the process: it undoes what it did, then exits.
      const interrupts = catchInterrupts(rt);
      const progress = progressReporter(rt.log);
      try {
        const requestId = `req-${randomUUID()}`;
        // The instance is released once its data is in the store; the hashing needs only the image.
        const unfinished = await rt.locks.hold(uuid, `snapshot command ${requestId}`, { waitMs: 0 }, () => {
          rt.interrupt.signal.throwIfAborted(); // nothing touched yet
          return rt.engine.takeFromGuest({
            requestId,
            instanceUuid: uuid,
            imageId,
            name: opts.name,
            strategy: opts.strategy,
            onProgress: progress.onProgress,
          });
        });
        const result = await unfinished.finish();
        progress.stop();
        if (interrupts.signal !== undefined) {
          rt.log.warn({ signal: interrupts.signal, image_id: imageId }, 'the snapshot had completed when the signal came: kept');
        }
        if (opts.json) printJson(result);
        else printTable(['field', 'value'], Object.entries(result));
      } catch (err) {
        progress.stop();
        if (err instanceof SnapshotFailed && err.undoErrors.length > 0) {
          process.stderr.write(`snapshot-driver: cleanup after the failure also failed: ${err.undoErrors.map(errorMessage).join('; ')}\n`);
        }
        const signal = interrupts.signal;
        if (signal === undefined) throw err;
        // Undone (or, if an undo failed, left recorded for recovery): exit as a process killed by it would.
        process.stderr.write(`snapshot-driver: ${signal}: the snapshot was interrupted and undone: ${errorMessage(err)}\n`);
        process.exitCode = 128 + constants.signals[signal];
      } finally {
        interrupts.dispose();
      }
    });
}

/**
 * Catches SIGINT, SIGTERM and SIGHUP for the length of the operation: the first aborts it (it fails
 * at its next step and undoes what it did: the guest back in its prior state, the image killed, its
 * record ended); later ones are noted and wait for that undo. A closed terminal or pipe must not
 * kill the process midway either: failed writes to stdout, stderr and the log are dropped.
 */
function catchInterrupts(rt: Runtime): { readonly signal: Interrupt | undefined; dispose(): void } {
  let caught: Interrupt | undefined;
  const ignore = (): void => undefined;
  const logStream = (rt.log as unknown as Record<symbol, unknown>)[pino.symbols.streamSym] as NodeJS.EventEmitter | undefined;
  const streams: NodeJS.EventEmitter[] = [process.stdout, process.stderr, ...(logStream?.on ? [logStream] : [])];
  for (const s of streams) s.on('error', ignore);
  const handlers = INTERRUPTS.map((signal) => {
    const handler = () => {
      if (caught !== undefined) {
        rt.log.warn({ signal, first: caught }, 'already stopping: waiting for the snapshot to be undone');
        return;
      }
      caught = signal;
      rt.log.warn({ signal }, 'interrupted: the snapshot stops at its next step and undoes what it did');
      rt.interrupt.abort(new Interrupted(signal));
    };
    process.on(signal, handler);
    return [signal, handler] as const;
  });
  return {
    get signal() {
      return caught;
    },
    dispose() {
      for (const [signal, handler] of handlers) process.off(signal, handler);
      // The error listeners stay: output after this may still meet a closed terminal.
    },
  };
}
