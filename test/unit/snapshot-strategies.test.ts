import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { STRATEGIES, type StrategyName } from '../../src/config/schema.js';
import { SnapshotFailed } from '../../src/errors.js';
import { SNAPSHOTS_LEFT_MAX, STRATEGY_STEPS } from '../../src/snapshot/strategies.js';
import { guestIn, makeFakeEnv, PREFIX, type FakeEnv } from '../helpers/fake-env.js';

const STATES = ['running', 'paused', 'shutoff', 'saved'] as const;
let envs: FakeEnv[] = [];
afterEach(async () => {
  await Promise.all(envs.map((e) => e.cleanup()));
  envs = [];
});
async function env(strategy: StrategyName) {
  const e = await makeFakeEnv({ strategy });
  envs.push(e);
  return e;
}

/** Snapshots left allowed after the operation, given the guest's state. */
function allowedLeft(strategy: StrategyName, state: string): number {
  return state === 'running' || state === 'paused' ? SNAPSHOTS_LEFT_MAX[strategy] : 0;
}

describe.each(STRATEGIES)('strategy %s on the fake hypervisor', (strategy) => {
  it.each(STATES)('snapshots a %s guest: point-in-time image, prior state kept, §2 kept', async (state) => {
    const e = await env(strategy);
    const uuid = randomUUID();
    await guestIn(e, state, uuid);
    // The disk as of the point in time: captured when the step that fixes it is about to run.
    let pointInTime: Buffer | undefined;
    e.beforeStep = (step) => {
      if (pointInTime === undefined && (step.name === 'create-snapshot' || step.name === 'export-disk')) {
        pointInTime = e.hv.diskContent(uuid);
      }
    };
    const imageId = randomUUID();
    const result = await e.engine.take({ requestId: 'req-1', instanceUuid: uuid, imageId });

    expect(result.status).toBe('active');
    expect(result.strategy).toBe(strategy);
    const data = await fs.readFile(path.join(e.tmp, 'images', imageId));
    expect(pointInTime).toBeDefined();
    expect(data.equals(pointInTime!)).toBe(true);
    if (state === 'running') {
      // The guest kept writing after the snapshot: the image is not simply the current disk.
      expect(data.equals(e.hv.diskContent(uuid))).toBe(false);
    }
    if (state === 'shutoff' || state === 'saved') expect(result.downtime_ms).toBe(0); // nothing to suspend
    expect((await e.hv.info(uuid)).state).toBe(state);
    expect(e.hv.violations).toEqual([]);
    const left = await e.ownSnapshots(uuid);
    expect(left.length).toBe(allowedLeft(strategy, state));
    expect(result.internal_snapshots).toBe(left.length);
    expect((await e.store.verify(imageId)).ok).toBe(true);
    expect(await e.partialFiles()).toEqual([]);
  });
});

describe('deferred-delete', () => {
  async function twoSnapshots(e: FakeEnv, uuid: string) {
    const first = randomUUID();
    const second = randomUUID();
    await e.engine.take({ requestId: 'r1', instanceUuid: uuid, imageId: first });
    await e.engine.take({ requestId: 'r2', instanceUuid: uuid, imageId: second });
    expect(await e.ownSnapshots(uuid)).toEqual([`${PREFIX}${second}`]);
    expect(await e.pending.list(uuid)).toEqual([`${PREFIX}${second}`]);
  }

  it.each([
    ['hard reboot', (e: FakeEnv, uuid: string) => e.lifecycle.hardReboot(uuid)],
    ['stop then start', async (e: FakeEnv, uuid: string) => {
      await e.lifecycle.stop(uuid, false);
      expect(await e.ownSnapshots(uuid)).toHaveLength(1); // a stop alone restarts nothing
      await e.lifecycle.start(uuid);
    }],
    ['suspend then resume', async (e: FakeEnv, uuid: string) => {
      await e.lifecycle.suspend(uuid);
      await e.lifecycle.resume(uuid);
    }],
  ])('two snapshots leave the newest only; %s leaves none', async (_name, restart) => {
    const e = await env('deferred-delete');
    const uuid = randomUUID();
    await guestIn(e, 'running', uuid);
    await twoSnapshots(e, uuid);
    await restart(e, uuid);
    expect(await e.ownSnapshots(uuid)).toEqual([]);
    expect(await e.pending.list(uuid)).toEqual([]);
    expect((await e.hv.info(uuid)).state).toBe('running');
    expect(e.hv.violations).toEqual([]);
  });

  it('a soft reboot deletes nothing', async () => {
    const e = await env('deferred-delete');
    const uuid = randomUUID();
    await guestIn(e, 'running', uuid);
    await twoSnapshots(e, uuid);
    await e.lifecycle.softReboot(uuid);
    expect(await e.ownSnapshots(uuid)).toHaveLength(1);
  });

  it('never deletes a snapshot it did not make', async () => {
    const e = await env('deferred-delete');
    const uuid = randomUUID();
    await guestIn(e, 'shutoff', uuid);
    await e.hv.offlineSnapshotCreate(uuid, 'operator-backup');
    await e.lifecycle.start(uuid);
    await twoSnapshots(e, uuid);
    await e.lifecycle.hardReboot(uuid);
    expect((await e.hv.listInternalSnapshots(uuid)).map((s) => s.name)).toEqual(['operator-backup']);
  });
});

/** Runs one snapshot and checks every §2 invariant after an injected failure. */
async function expectSafeFailure(e: FakeEnv, uuid: string, state: string, strategy: StrategyName, imageId: string) {
  const err = await e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId }).then(
    () => undefined,
    (x: unknown) => x,
  );
  expect(err).toBeInstanceOf(Error);
  expect((await e.hv.info(uuid)).state).toBe(state);
  expect(e.hv.violations).toEqual([]);
  // A failure before the image record was made leaves no record; after, the record is killed.
  const image = await e.store.show(imageId).catch(() => undefined);
  if (image) {
    expect(err).toBeInstanceOf(SnapshotFailed);
    expect(image.status).toBe('killed');
  }
  await expect(fs.stat(path.join(e.tmp, 'images', imageId))).rejects.toThrow();
  expect(await e.partialFiles()).toEqual([]);
  expect((await e.ownSnapshots(uuid)).length).toBeLessThanOrEqual(allowedLeft(strategy, state));
}

describe.each(STRATEGIES)('strategy %s with a failure injected', (strategy) => {
  it.each(STATES)('at every step, on a %s guest: state kept, no violation, no active image', async (state) => {
    const steps = STRATEGY_STEPS[strategy];
    for (let at = 0; at < steps.length; at++) {
      const e = await env(strategy);
      const uuid = randomUUID();
      await guestIn(e, state, uuid);
      e.beforeStep = (_step, i) => {
        if (i === at) throw new Error(`injected before step ${i}`);
      };
      await expectSafeFailure(e, uuid, state, strategy, randomUUID());
    }
  });

  it.each(STATES)('at every hypervisor call, before and after it acts, on a %s guest', async (state) => {
    // Record the calls a clean run makes, then fail each one in turn.
    const probe = await env(strategy);
    const probeUuid = randomUUID();
    await guestIn(probe, state, probeUuid);
    const from = probe.hv.calls.length;
    await probe.engine.take({ requestId: 'probe', instanceUuid: probeUuid, imageId: randomUUID() });
    const ops = probe.hv.calls.slice(from).map((c) => c.op);
    expect(ops.length).toBeGreaterThan(0);

    const seen = new Map<string, number>();
    let cases = 0;
    for (const op of ops) {
      const nth = (seen.get(op) ?? 0) + 1;
      seen.set(op, nth);
      for (const when of ['before', 'after'] as const) {
        const e = await env(strategy);
        const uuid = randomUUID();
        await guestIn(e, state, uuid);
        const before = e.hv.calls.filter((c) => c.op === op).length;
        e.hv.injectFault({ op, nth: before + nth, when });
        await expectSafeFailure(e, uuid, state, strategy, randomUUID());
        cases++;
      }
    }
    expect(cases).toBe(ops.length * 2);
  });
});
