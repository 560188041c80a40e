import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { STRATEGIES, type StrategyName } from '../../src/config/schema.js';
import type { ExportOptions, ResumeResult, SaveResult } from '../../src/hypervisor/types.js';
import { windowDowntimeMs } from '../../src/snapshot/downtime.js';
import { STRATEGY_STEPS, USES_MANAGED_SAVE } from '../../src/snapshot/strategies.js';
import { allowedLeft, expectSafeFailure, guestIn, makeFakeEnv, PREFIX, type FakeEnv } from '../helpers/fake-env.js';

const STATES = ['running', 'paused', 'shutoff', 'saved'] as const;
const IO_HELD_MS = 7;
let envs: FakeEnv[] = [];
afterEach(async () => {
  await Promise.all(envs.map((e) => e.cleanup()));
  envs = [];
});
async function env(strategy: StrategyName, opts: Parameters<typeof makeFakeEnv>[0] = {}) {
  const e = await makeFakeEnv({ strategy, ...opts });
  envs.push(e);
  return e;
}

describe.each(STRATEGIES)('strategy %s on the fake hypervisor', (strategy) => {
  it.each(STATES)('snapshots a %s guest: point-in-time image, prior state kept, §2 kept', async (state) => {
    const e = await env(strategy, { hv: { liveSnapshotIoHeldMs: IO_HELD_MS } });
    const uuid = randomUUID();
    await guestIn(e, state, uuid);
    const imageId = randomUUID();
    // The disk as of the point in time: captured when the step that fixes it is about to run (an
    // offline disk does not change); for a live backup job, the fake records it at the job's start;
    // a snapshot created through the monitor is read once made (the guest writes during the call).
    let pointInTime: Buffer | undefined;
    e.beforeStep = (step) => {
      if (pointInTime !== undefined) return;
      if (['create-snapshot', 'export-disk', 'start-backup'].includes(step.name)) pointInTime = e.hv.diskContent(uuid);
      if (strategy === 'monitor-snapshot' && step.name === 'thaw') pointInTime = e.hv.snapshotContent(uuid, `${PREFIX}${imageId}`);
    };
    const mark = e.hv.calls.length;
    const result = await e.engine.take({ requestId: 'req-1', instanceUuid: uuid, imageId });
    const ops = e.hv.calls.slice(mark).map((c) => c.op);

    expect(result.status).toBe('active');
    expect(result.strategy).toBe(strategy);
    const jobs = e.hv.liveBackups(uuid);
    const hasProcess = state === 'running' || state === 'paused';
    expect(jobs).toHaveLength(strategy === 'live' && hasProcess ? 1 : 0);
    if (jobs[0]) {
      expect(jobs[0].status).toBe('completed');
      pointInTime = jobs[0].pointInTime;
    }
    const data = await fs.readFile(path.join(e.tmp, 'images', imageId));
    expect(pointInTime).toBeDefined();
    expect(data.equals(pointInTime!)).toBe(true);
    expect(e.hv.wasDiskState(uuid, data)).toBe(true);
    if (state === 'running') {
      // The guest kept writing after the snapshot (for live: during the job): the image is not
      // simply the current disk.
      expect(data.equals(e.hv.diskContent(uuid))).toBe(false);
    }
    // Nothing to suspend, or vCPUs that were stopped anyway; live holds no I/O in the fake; a
    // snapshot through the monitor holds a running guest's I/O as long as the backend says.
    if (strategy === 'monitor-snapshot') expect(result.downtime_ms).toBe(state === 'running' ? IO_HELD_MS : 0);
    else if (state !== 'running' || strategy === 'live') expect(result.downtime_ms).toBe(0);
    // Every strategy quiesces a running guest (whose agent answers), and only a running one.
    expect(result.quiesced).toBe(state === 'running');
    if (!result.quiesced) expect(result.freeze_ms).toBe(0);
    expect(e.hv.frozen(uuid)).toBe(false);
    const agentOps = ops.filter((op) => /Filesystems|guestAgent/.test(op));
    expect(agentOps).toEqual(result.quiesced ? ['guestAgentAvailable', 'freezeFilesystems', 'thawFilesystems'] : []);
    // live and monitor-snapshot never stop the guest's vCPUs or its process.
    if (!USES_MANAGED_SAVE[strategy]) expect(ops.filter((op) => /managedSave|resume|pause|stop|start$/.test(op))).toEqual([]);
    expect((await e.hv.info(uuid)).state).toBe(state);
    expect(e.hv.violations).toEqual([]);
    const left = await e.ownSnapshots(uuid);
    expect(left.length).toBe(allowedLeft(strategy, state));
    expect(result.internal_snapshots).toBe(left.length);
    expect((await e.store.verify(imageId)).ok).toBe(true);
    expect(await e.partialFiles()).toEqual([]);
  });
});

describe('monitor-snapshot', () => {
  const KEY_OPS = /Filesystems|SnapshotCreate|SnapshotDelete|exportDisk|managedSave|resume|pause/;

  it('a running guest: frozen only around the create through the monitor, never saved; its snapshot exported, then deleted through the monitor', async () => {
    const e = await env('monitor-snapshot');
    const uuid = randomUUID();
    await guestIn(e, 'running', uuid);
    const mark = e.hv.calls.length;
    const result = await e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId: randomUUID() });
    const ops = e.hv.calls.slice(mark).map((c) => c.op).filter((op) => KEY_OPS.test(op));
    expect(ops).toEqual(['freezeFilesystems', 'liveSnapshotCreate', 'thawFilesystems', 'exportDisk', 'liveSnapshotDelete']);
    expect(result).toMatchObject({ status: 'active', quiesced: true, internal_snapshots: 0 });
  });

  it.each(['shutoff', 'saved'] as const)('a %s guest: created, exported and deleted offline, no freeze', async (state) => {
    const e = await env('monitor-snapshot');
    const uuid = randomUUID();
    await guestIn(e, state, uuid);
    const mark = e.hv.calls.length;
    const result = await e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId: randomUUID() });
    const ops = e.hv.calls.slice(mark).map((c) => c.op).filter((op) => KEY_OPS.test(op));
    expect(ops).toEqual(['offlineSnapshotCreate', 'exportDisk', 'offlineSnapshotDelete']);
    expect(result).toMatchObject({ status: 'active', quiesced: false, downtime_ms: 0 });
    expect(e.hv.powerState(uuid)).toBe(state);
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
        // quiesce = auto: a freeze that fails is cleaned up (thawed) and the snapshot goes on unquiesced.
        const mayComplete = op === 'freezeFilesystems';
        await expectSafeFailure(e, uuid, state, strategy, randomUUID(), { mayComplete });
        cases++;
      }
    }
    expect(cases).toBe(ops.length * 2);
  });
});

describe('downtime', () => {
  const SUSPENDING = STRATEGIES.filter((s) => USES_MANAGED_SAVE[s]);

  it.each(SUSPENDING)('%s: the sum of vcpusResumedAt − vcpusStoppedAt over its suspend/resume pairs', async (strategy) => {
    // A clock that jumps 1000 s per reading: the figure can only come from the hypervisor's times.
    let t = 1_700_000_000_000;
    const e = await env(strategy, { hv: { now: () => (t += 1_000_000) } });
    const uuid = randomUUID();
    await guestIn(e, 'running', uuid);
    const saves = vi.spyOn(e.hv, 'managedSave');
    const resumes = vi.spyOn(e.hv, 'resume');
    const result = await e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId: randomUUID() });

    const stopped = await Promise.all(saves.mock.results.map((r) => r.value as Promise<SaveResult>));
    const resumed = await Promise.all(resumes.mock.results.map((r) => r.value as Promise<ResumeResult>));
    expect(stopped.length).toBe(strategy === 'double-suspend' ? 2 : 1);
    expect(resumed.length).toBe(stopped.length);
    const expected = stopped.reduce((sum, s, i) => sum + resumed[i]!.vcpusResumedAt! - s.vcpusStoppedAt!, 0);
    expect(expected).toBeGreaterThanOrEqual(1_000_000 * stopped.length);
    expect(result.downtime_ms).toBe(expected);
  });

  it.each(SUSPENDING)('%s: a paused guest has no downtime (its vCPUs were stopped anyway)', async (strategy) => {
    let t = 0;
    const e = await env(strategy, { hv: { now: () => (t += 1_000_000) } });
    const uuid = randomUUID();
    await guestIn(e, 'paused', uuid);
    const result = await e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId: randomUUID() });
    expect(result.downtime_ms).toBe(0);
    expect(e.hv.powerState(uuid)).toBe('paused');
  });

  it('windowDowntimeMs: hypervisor times when both are known, else the wall-clock window; 0 when paused', () => {
    const save: SaveResult = { priorState: 'running', bytes: 1, vcpusStoppedAt: 5_000 };
    expect(windowDowntimeMs({ wallStartedAt: 10, save }, 'running', { state: 'running', vcpusResumedAt: 5_250 }, 900)).toBe(250);
    // No resume time (or no save result: a save that failed half-way): the wall clock.
    expect(windowDowntimeMs({ wallStartedAt: 10, save }, 'running', { state: 'running' }, 900)).toBe(890);
    expect(windowDowntimeMs({ wallStartedAt: 10 }, 'running', { state: 'running', vcpusResumedAt: 5_250 }, 900)).toBe(890);
    expect(windowDowntimeMs({ wallStartedAt: 10 }, 'running', undefined, 900)).toBe(890);
    // Paused before: by the save's account, or by the operation's prior state.
    expect(windowDowntimeMs({ wallStartedAt: 10, save: { priorState: 'paused', bytes: 1 } }, 'running', { state: 'paused' }, 900)).toBe(0);
    expect(windowDowntimeMs({ wallStartedAt: 10 }, 'paused', undefined, 900)).toBe(0);
  });
});

describe('export priority', () => {
  // Only cold's export of a guest it saved has a guest waiting for it; every other export runs at
  // a lower CPU priority (qemu-img at BACKGROUND_NICE), so that other guests' saves and restores
  // come first on a busy host.
  it.each(STRATEGIES.flatMap((strategy) => STATES.map((state) => [strategy, state] as const)))('%s, %s guest', async (strategy, state) => {
    const e = await env(strategy);
    const uuid = randomUUID();
    await guestIn(e, state, uuid);
    const mark = e.hv.calls.length;
    expect(await e.engine.take({ requestId: 'req-prio', instanceUuid: uuid, imageId: randomUUID() })).toMatchObject({ status: 'active' });
    const exports = e.hv.calls.slice(mark).filter((c) => c.op === 'exportDisk');
    // live on a guest with a process copies through its backup job, not exportDisk.
    const viaJob = strategy === 'live' && (state === 'running' || state === 'paused');
    expect(exports).toHaveLength(viaJob ? 0 : 1);
    const guestWaits = strategy === 'cold' && (state === 'running' || state === 'paused');
    for (const c of exports) expect((c.args[1] as ExportOptions).background).toBe(!guestWaits);
  });
});
