import { Writable } from 'node:stream';
import { pino } from 'pino';
import type { Logger } from '../../src/log.js';

/** One pino line, parsed. */
export type CapturedLine = Record<string, unknown> & { msg?: string };

/**
 * A pino logger whose lines are parsed into `lines`, in the order they were written (the order of
 * the events they log: one thread, synchronous writes).
 */
export function captureLogger(level = 'info'): { log: Logger; lines: CapturedLine[] } {
  const lines: CapturedLine[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n')) if (line.trim()) lines.push(JSON.parse(line) as CapturedLine);
      cb();
    },
  });
  return { log: pino({ level }, stream), lines };
}
