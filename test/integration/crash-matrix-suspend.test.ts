/**
 * Issue 5, the crash matrix (1/2): for cold, suspend-create-resume-extract and double-suspend, the
 * agent is SIGKILLed right before each step acts (its journal record written) and before the commit,
 * on a real running guest over real RabbitMQ; the restarted agent recovers (test/helpers/crash-matrix.ts
 * lists every check).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StrategyName } from '../../src/config/schema.js';
import { killPoints, makeCrashBench, runCrashCase, type CrashBench } from '../helpers/crash-matrix.js';

const STRATEGIES: StrategyName[] = ['cold', 'suspend-create-resume-extract', 'double-suspend'];
const CASES = STRATEGIES.flatMap((strategy) => killPoints(strategy).map((point) => ({ strategy, point, guest: 'running' as const })));

let bench: CrashBench;

beforeAll(async () => {
  bench = await makeCrashBench('crash-s', STRATEGIES);
});

afterAll(async () => {
  await bench?.close();
});

describe('SIGKILL at every step boundary, then restart (real QEMU, real RabbitMQ)', () => {
  it('covers every step of every strategy here', () => {
    expect(CASES).toHaveLength(4 + 6 + 8);
  });

  it.each(CASES)('$strategy, killed at $point, $guest guest', async (c) => {
    const { outcome } = await runCrashCase(bench, c);
    expect(outcome).toBe('error');
  });
});
