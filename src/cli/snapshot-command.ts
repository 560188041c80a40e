import { randomUUID } from 'node:crypto';
import type { Command } from 'commander';
import { errorMessage, InvalidInstanceId, SnapshotFailed } from '../errors.js';
import { ImageStore } from '../image-store/image-store.js';
import { parseStrategy } from '../snapshot/engine.js';
import { isUuid } from '../util/uuid.js';
import type { RuntimeFactory } from './main.js';
import { printJson, printTable } from './output.js';
import { progressReporter } from './progress.js';

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
      const progress = progressReporter(rt.log);
      try {
        const requestId = `req-${randomUUID()}`;
        const result = await rt.locks.hold(uuid, `snapshot command ${requestId}`, { waitMs: 0 }, () =>
          rt.engine.take({
            requestId,
            instanceUuid: uuid,
            imageId,
            name: opts.name,
            strategy: opts.strategy,
            onProgress: progress.onProgress,
          }),
        );
        progress.stop();
        if (opts.json) printJson(result);
        else printTable(['field', 'value'], Object.entries(result));
      } catch (err) {
        progress.stop();
        if (err instanceof SnapshotFailed && err.undoErrors.length > 0) {
          process.stderr.write(`snapshot-driver: cleanup after the failure also failed: ${err.undoErrors.map(errorMessage).join('; ')}\n`);
        }
        throw err;
      }
    });
}
