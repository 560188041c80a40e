import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { QemuProcessError } from '../../src/errors.js';
import { MigrationTimeout } from '../../src/errors.js';
import { waitForMigration, withinJobTimeout } from '../../src/hypervisor/qemu/migration.js';
import type { QmpClient } from '../../src/hypervisor/qemu/qmp.js';

/**
 * A managed save's (or a resume's) migration is bounded by `[hypervisor] job_timeout` (the qemu
 * backend's jobTimeoutMs), not only its start: fake timers, a QMP that reports what the test says.
 * (The cancel and the guest running again, on real QEMU: test/integration/cont-failure.test.ts.)
 */

const BOUNDS = { beginTimeoutMs: 1_000, jobTimeoutMs: 60_000 };

function qmpReporting(status: () => string | undefined): { qmp: QmpClient; queries: () => number } {
  let n = 0;
  const qmp = {
    execute: async (command: string) => {
      if (command !== 'query-migrate') throw new Error(`unexpected QMP ${command}`);
      n++;
      const s = status();
      return s === undefined ? {} : { status: s };
    },
  } as unknown as QmpClient;
  return { qmp, queries: () => n };
}

/** Settles-or-not probe of a promise, without awaiting it. */
function track<T>(p: Promise<T>) {
  const t: { settled: boolean; error?: unknown } = { settled: false };
  p.then(
    () => (t.settled = true),
    (err: unknown) => {
      t.settled = true;
      t.error = err;
    },
  );
  return t;
}

beforeEach(() => {
  vi.useFakeTimers();
});
afterEach(() => {
  vi.useRealTimers();
});

describe('waitForMigration', () => {
  it('a migration that stays active (its destination stalls) fails with MigrationTimeout at job_timeout, not before', async () => {
    const { qmp, queries } = qmpReporting(() => 'active');
    const t = track(waitForMigration(qmp, 'save', BOUNDS));
    await vi.advanceTimersByTimeAsync(BOUNDS.jobTimeoutMs - 100);
    expect(t.settled).toBe(false);
    expect(queries()).toBeGreaterThan(100); // polling all along
    await vi.advanceTimersByTimeAsync(200);
    expect(t.settled).toBe(true);
    expect(t.error).toBeInstanceOf(MigrationTimeout);
    expect(t.error).toBeInstanceOf(QemuProcessError);
    expect(String(t.error)).toMatch(/save migration did not complete within 60000 ms \(\[hypervisor\] job_timeout\): still active/);
  });

  it('completes when QEMU reports completed within the bound; a failed migration says why', async () => {
    let status = 'active';
    const { qmp } = qmpReporting(() => status);
    const t = track(waitForMigration(qmp, 'restore', BOUNDS));
    await vi.advanceTimersByTimeAsync(30_000);
    status = 'completed';
    await vi.advanceTimersByTimeAsync(20);
    expect(t).toEqual({ settled: true });

    const failed = qmpReporting(() => 'failed');
    await expect(waitForMigration(failed.qmp, 'save', BOUNDS)).rejects.toThrow(/save migration failed/);
  });

  it('one that never begins fails after the begin timeout', async () => {
    const { qmp } = qmpReporting(() => undefined);
    const t = track(waitForMigration(qmp, 'save', BOUNDS));
    await vi.advanceTimersByTimeAsync(BOUNDS.beginTimeoutMs + 20);
    expect(t.settled).toBe(true);
    expect(String(t.error)).toMatch(/did not begin within 1000 ms/);
  });
});

describe('withinJobTimeout (our own end of the stream)', () => {
  it('rejects with MigrationTimeout once the bound from the start has passed, for work that never settles', async () => {
    const t = track(withinJobTimeout(new Promise<never>(() => undefined), 'save', 5_000, Date.now() - 1_000));
    await vi.advanceTimersByTimeAsync(3_990);
    expect(t.settled).toBe(false);
    await vi.advanceTimersByTimeAsync(20);
    expect(t.error).toBeInstanceOf(MigrationTimeout);
  });

  it('passes on what settles in time, and leaves no timer behind', async () => {
    await expect(withinJobTimeout(Promise.resolve(42), 'restore', 5_000, Date.now())).resolves.toBe(42);
    await expect(withinJobTimeout(Promise.reject(new Error('EPIPE')), 'restore', 5_000, Date.now())).rejects.toThrow('EPIPE');
    expect(vi.getTimerCount()).toBe(0);
  });
});
