/**
 * Issue 10, the crash matrix on the libvirt backend (2/2: deferred-delete, live, monitor-snapshot, a kill while
 * libvirtd writes a managed save, a kill before any step; 1/2 in crash-matrix-libvirt-a): the agent
 * (`serve`, driver = libvirt) SIGKILLed right before every step acts, restarted, recovers
 * (test/helpers/crash-matrix.ts lists every check: the domain back in its state, its disk clean, our
 * snapshots within policy, the image killed, the request ended), and libvirt's own view is right: no
 * managed-save image left, no job running.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StrategyName } from '../../src/config/schema.js';
import { inSequence, killPoints, makeCrashBench, runCrashCase, type CrashBench, type CrashCase } from '../helpers/crash-matrix.js';
import { libvirtView } from '../helpers/libvirt.js';

const STRATEGIES: StrategyName[] = ['deferred-delete', 'live', 'monitor-snapshot', 'suspend-create-resume-extract'];
const CASES: CrashCase[] = inSequence([
  // A kill before the first step (nothing done yet) is the same for every strategy: taken once.
  ...(['deferred-delete', 'live', 'monitor-snapshot'] as const).flatMap((strategy, i) =>
    killPoints(strategy)
      .filter((point) => i === 0 || !point.startsWith('step:0:'))
      .map((point) => ({ strategy, point, guest: 'running' as const })),
  ),
  { strategy: 'suspend-create-resume-extract', point: 'managed-save:migrating', guest: 'running' },
  { strategy: 'suspend-create-resume-extract', point: 'managed-save:migrating', guest: 'paused' },
]);

let bench: CrashBench;

beforeAll(async () => {
  bench = await makeCrashBench('crash-lvb', STRATEGIES, 'libvirt');
});

afterAll(async () => {
  await bench?.close();
});

describe('SIGKILL at every step boundary of every strategy, then restart (real libvirtd, real RabbitMQ)', () => {
  it.each(CASES)('$strategy, killed at $point, $guest guest', async (c) => {
    const { outcome } = await runCrashCase(bench, c);
    expect(outcome).toBe('error');
    const uuid = await bench.guest(c.strategy, c.guest);
    expect(await libvirtView(uuid)).toMatchObject({ managedSave: false, job: 'None', state: expect.stringMatching(c.guest === 'running' ? /^running/ : /^paused/) });
  });

  it('a request whose operation was recorded but never started is carried out again', async () => {
    const { outcome } = await runCrashCase(bench, { strategy: 'suspend-create-resume-extract', point: 'operation-recorded', guest: 'running' });
    expect(outcome).toBe('completed');
  });
});
