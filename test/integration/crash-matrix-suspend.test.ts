/**
 * Issue 5, the crash matrix (1/2): for cold, suspend-create-resume-extract and double-suspend, the
 * agent is SIGKILLed right before each step acts (its journal record written) and before the commit,
 * on a real running guest over real RabbitMQ; the restarted agent recovers (test/helpers/crash-matrix.ts
 * lists every check).
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StrategyName } from '../../src/config/schema.js';
import { cliJson, runCli } from '../helpers/cli.js';
import { expectStoreConsistent, inSequence, killPoints, makeCrashBench, runCrashCase, type CrashBench, type CrashCase } from '../helpers/crash-matrix.js';

const STRATEGIES: StrategyName[] = ['cold', 'suspend-create-resume-extract', 'double-suspend'];
const CASES: CrashCase[] = inSequence(STRATEGIES.flatMap((strategy) => killPoints(strategy).map((point) => ({ strategy, point, guest: 'running' as const }))));
/** Kills inside the resume from the managed save: before any state is sent, and once it is loaded. */
const IN_RESUME: CrashCase[] = (['resume:loading', 'resume:loaded'] as const).flatMap((point) =>
  (['running', 'paused'] as const).map((guest) => ({ strategy: 'suspend-create-resume-extract' as const, point, guest })),
);

let bench: CrashBench;

beforeAll(async () => {
  bench = await makeCrashBench('crash-s', STRATEGIES);
});

afterAll(async () => {
  await bench?.close();
});

describe('SIGKILL at every step boundary, then restart (real QEMU, real RabbitMQ)', () => {
  it('covers every step of every strategy here', () => {
    expect(CASES).toHaveLength(6 + 8 + 10);
  });

  it.each(CASES)('$strategy, killed at $point, $guest guest', async (c) => {
    const { outcome } = await runCrashCase(bench, c);
    expect(outcome).toBe('error');
  });

  it.each(IN_RESUME)('$strategy, killed at $point, $guest guest', async (c) => {
    const { outcome, recovered } = await runCrashCase(bench, c);
    expect(outcome).toBe('error');
    const actions = (recovered as { actions: string[] }).actions;
    if (c.point === 'resume:loading') {
      // The new QEMU was still waiting for the state: ended, and the guest resumed from the kept file.
      expect(actions).toEqual(
        expect.arrayContaining(['ended a resume that had not finished loading the saved state (the state is kept)', 'resumed the guest from our managed save']),
      );
    } else if (c.guest === 'running') {
      // Loaded, its file gone, vCPUs not yet running: they are started, nothing is loaded twice.
      expect(actions).toContain('let the guest run again (stopped for a save that did not complete)');
    } else {
      expect(actions.filter((a) => /resumed|run again|started/.test(a))).toEqual([]);
    }
  });
});

describe('the fault switch, fail mode', () => {
  it('fail:<point> makes the step fail in the process: undone at once, guest back, image killed, nothing to recover', async () => {
    const conf = bench.confs.get('double-suspend')!;
    const uuid = await bench.guest('double-suspend', 'running');
    const res = await runCli(['--config-file', conf, 'snapshot', uuid, '--json'], { SNAPSHOT_DRIVER_FAULT: 'fail:step:7:delete-snapshot' });
    expect(res.code).toBe(1);
    expect(res.stderr).toContain('SnapshotFailed: step 8 (delete-snapshot) failed: injected failure at step:7:delete-snapshot (SNAPSHOT_DRIVER_FAULT)');
    const list = (await cliJson(conf, ['instances', 'list'])) as { uuid: string; state: string }[];
    expect(list.find((i) => i.uuid === uuid)?.state).toBe('running');
    expect((await bench.env.qemuImg.snapshotList(path.join(bench.env.instancesPath, uuid, 'disk'))).map((s) => s.name)).toEqual([]);
    expect(await fs.readdir(path.join(bench.stateDir, 'operations'))).toEqual([]);
    await expectStoreConsistent(bench);
  });
});
