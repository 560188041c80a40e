/**
 * Issue 10, the crash matrix on the libvirt backend (1/2: cold, suspend-create-resume-extract; 2/2 in
 * crash-matrix-libvirt-b): the agent (`serve`, driver = libvirt) SIGKILLed right before every step
 * acts, restarted, recovers (test/helpers/crash-matrix.ts lists every check: the domain back in its
 * state, its disk clean, our snapshots within policy, the image killed, the request ended), and
 * libvirt's own view is right: no managed-save image left, no job running.
 *
 * What a kill leaves on the libvirt side is one of a few situations (a domain running or saved, with
 * or without our snapshot, a managed save under way, a backup job): cold and
 * suspend-create-resume-extract reach every one of them that a managed save makes. double-suspend
 * adds no new one (its second save is the first's situation, with the image further along, which is
 * backend-independent recovery: the qemu crash matrix kills it at every step), and a kill before the
 * first step (nothing done yet) is the same for every strategy: taken once per file.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StrategyName } from '../../src/config/schema.js';
import { inSequence, killPoints, makeCrashBench, runCrashCase, type CrashBench, type CrashCase } from '../helpers/crash-matrix.js';
import { libvirtView } from '../helpers/libvirt.js';

const SUSPENDING: StrategyName[] = ['cold', 'suspend-create-resume-extract'];
const CASES: CrashCase[] = inSequence(
  SUSPENDING.flatMap((strategy, i) =>
    killPoints(strategy)
      .filter((point) => i === 0 || !point.startsWith('step:0:'))
      .map((point) => ({ strategy, point, guest: 'running' as const })),
  ),
);

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
