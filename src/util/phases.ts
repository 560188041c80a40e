import { performance } from 'node:perf_hooks';

/**
 * Where an operation's time went: the milliseconds from one mark to the next, as `<name>_ms`
 * fields for its log line (an operator sees which part of a downtime grew).
 */
export class Phases {
  private last = performance.now();
  readonly ms: Record<string, number> = {};

  /** Ends the phase `name` now (the next phase starts). */
  mark(name: string): void {
    const now = performance.now();
    this.ms[`${name}_ms`] = Math.round(now - this.last);
    this.last = now;
  }
}
