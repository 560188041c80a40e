import cliProgress from 'cli-progress';
import type { Logger } from '../log.js';

export type PhaseProgress = (phase: string, fraction: number) => void;

/**
 * Progress of long work: a bar on a terminal (stderr), progress log lines (every 10%) otherwise.
 * Returns the callback and a `stop` to close the bar.
 */
export function progressReporter(log: Logger, stream: NodeJS.WriteStream = process.stderr): { onProgress: PhaseProgress; stop(): void } {
  if (stream.isTTY) {
    const bar = new cliProgress.SingleBar(
      { stream, format: '{phase} [{bar}] {percentage}%', hideCursor: true, clearOnComplete: false },
      cliProgress.Presets.shades_classic,
    );
    let phase: string | undefined;
    return {
      onProgress(p, f) {
        if (p !== phase) {
          if (phase !== undefined) bar.stop();
          phase = p;
          bar.start(100, 0, { phase: p.padEnd(8) });
        }
        bar.update(Math.round(f * 100), { phase: p.padEnd(8) });
      },
      stop: () => bar.stop(),
    };
  }
  const lastStep = new Map<string, number>();
  return {
    onProgress(phase, f) {
      const step = Math.floor(f * 10);
      if ((lastStep.get(phase) ?? -1) >= step) return;
      lastStep.set(phase, step);
      log.info({ phase, percent: step * 10 }, `${phase} ${step * 10}%`);
    },
    stop() {},
  };
}
