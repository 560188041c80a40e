/**
 * Issue 5, the crash matrix (2/2): deferred-delete, live and monitor-snapshot at every step boundary
 * on a running guest; suspend-create-resume-extract on a paused guest; a kill while the managed save is being
 * written; and a kill after the operation is recorded but before any step (the request is then
 * carried out again). Checks: test/helpers/crash-matrix.ts.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StrategyName } from '../../src/config/schema.js';
import { inSequence, killPoints, makeCrashBench, runCrashCase, type CrashBench, type CrashCase } from '../helpers/crash-matrix.js';

const STRATEGIES: StrategyName[] = ['deferred-delete', 'live', 'monitor-snapshot', 'suspend-create-resume-extract'];
const CASES: CrashCase[] = inSequence([
  ...killPoints('deferred-delete').map((point) => ({ strategy: 'deferred-delete' as const, point, guest: 'running' as const })),
  ...killPoints('live').map((point) => ({ strategy: 'live' as const, point, guest: 'running' as const })),
  ...killPoints('monitor-snapshot').map((point) => ({ strategy: 'monitor-snapshot' as const, point, guest: 'running' as const })),
  ...killPoints('suspend-create-resume-extract').map((point) => ({ strategy: 'suspend-create-resume-extract' as const, point, guest: 'paused' as const })),
  { strategy: 'suspend-create-resume-extract', point: 'managed-save:migrating', guest: 'running' },
  { strategy: 'suspend-create-resume-extract', point: 'managed-save:migrating', guest: 'paused' },
]);

let bench: CrashBench;

beforeAll(async () => {
  bench = await makeCrashBench('crash-d', STRATEGIES);
});

afterAll(async () => {
  await bench?.close();
});

describe('SIGKILL at every step boundary, then restart (real QEMU, real RabbitMQ)', () => {
  it.each(CASES)('$strategy, killed at $point, $guest guest', async (c) => {
    const { outcome } = await runCrashCase(bench, c);
    expect(outcome).toBe('error');
  });

  it('a request whose operation was recorded but never started is carried out again', async () => {
    const { outcome } = await runCrashCase(bench, { strategy: 'suspend-create-resume-extract', point: 'operation-recorded', guest: 'running' });
    expect(outcome).toBe('completed');
  });
});
