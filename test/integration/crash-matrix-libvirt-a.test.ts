/**
 * Issue 10, the crash matrix on the libvirt backend (1/2: cold, suspend-create-resume-extract,
 * double-suspend; 2/2 in crash-matrix-libvirt-b): the agent (`serve`, driver = libvirt) SIGKILLed
 * right before every step acts, restarted, recovers (test/helpers/crash-matrix.ts lists every check:
 * the domain back in its state, its disk clean, our snapshots within policy, the image killed, the
 * request ended), and libvirt's own view is right: no managed-save image left, no job running.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StrategyName } from '../../src/config/schema.js';
import { killPoints, makeCrashBench, runCrashCase, type CrashBench, type CrashCase } from '../helpers/crash-matrix.js';
import { libvirtView } from '../helpers/libvirt.js';

const SUSPENDING: StrategyName[] = ['cold', 'suspend-create-resume-extract', 'double-suspend'];
const CASES: CrashCase[] = SUSPENDING.flatMap((strategy) => killPoints(strategy).map((point) => ({ strategy, point, guest: 'running' as const })));

let bench: CrashBench;

beforeAll(async () => {
  bench = await makeCrashBench('crash-lva', SUSPENDING, 'libvirt');
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

});
