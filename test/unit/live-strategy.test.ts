import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { pino } from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { loadConfigFromText } from '../../src/config/load.js';
import { defaultConfig } from '../../src/config/schema.js';
import { ConfigError, GuestAgentError, InjectedFault, SnapshotFailed } from '../../src/errors.js';
import type { FakeGuestAgent } from '../../src/hypervisor/fake/fake-hypervisor.js';
import { SnapshotEngine, type SnapshotResult } from '../../src/snapshot/engine.js';
import { DEFAULT_QUIESCE, quiesceOptions } from '../../src/snapshot/guest-freeze.js';
import { STRATEGY_STEPS } from '../../src/snapshot/strategies.js';
import { expectSafeFailure, guestIn, makeFakeEnv, snapshotFailure, type FakeEnv, type FakeEnvOptions } from '../helpers/fake-env.js';

let envs: FakeEnv[] = [];
afterEach(async () => {
  await Promise.all(envs.map((e) => e.cleanup()));
  envs = [];
});
async function env(opts: FakeEnvOptions = {}) {
  const e = await makeFakeEnv({ strategy: 'live', ...opts });
  envs.push(e);
  return e;
}

/** A live env with one guest in `state`; `ops()` lists the hypervisor calls made since. */
async function liveGuest(
  state: 'running' | 'paused' | 'shutoff' | 'saved',
  agent: FakeGuestAgent,
  opts: FakeEnvOptions = {},
) {
  const e = await env(opts);
  const uuid = randomUUID();
  await guestIn(e, state, uuid, agent);
  const mark = e.hv.calls.length;
  return { e, uuid, ops: () => e.hv.calls.slice(mark).map((c) => c.op) };
}

async function take(e: FakeEnv, uuid: string, imageId = randomUUID()): Promise<SnapshotResult> {
  return e.engine.take({ requestId: 'req-live', instanceUuid: uuid, imageId });
}


/** The image is the disk as of the live job's start (the fake records it there). */
async function expectImageIsJobStart(e: FakeEnv, uuid: string, imageId: string) {
  const jobs = e.hv.liveBackups(uuid);
  expect(jobs).toHaveLength(1);
  const data = await fs.readFile(path.join(e.tmp, 'images', imageId));
  expect(data.equals(jobs[0]!.pointInTime)).toBe(true);
  expect((await e.store.verify(imageId)).ok).toBe(true);
}

/**
 * The freeze deadline runs out while `op` is under way, whatever the machine's speed: with the
 * deadline's timer faked, `op` is held, the clock advanced past max_freeze_seconds when `op` is
 * reached, and released once the deadline's thaw has answered. Call useRealTimers afterwards.
 */
function deadlineDuring(e: FakeEnv, op: 'startLiveBackup' | 'liveSnapshotCreate' | 'freezeFilesystems', maxFreezeMs: number): void {
  // performance too: the freeze's own clock moves by the limit, and by nothing else.
  vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance'] });
  const thawed = onThaw(e);
  let reached!: () => void;
  const atCall = new Promise<void>((r) => (reached = r));
  const original = e.hv[op].bind(e.hv) as (...args: unknown[]) => Promise<unknown>;
  (e.hv as unknown as Record<string, unknown>)[op] = (...args: unknown[]) => {
    reached();
    return original(...args);
  };
  e.hv.holdCall({
    op,
    until: atCall.then(() => {
      vi.advanceTimersByTime(maxFreezeMs);
      return thawed;
    }),
  });
}

/**
 * `ms` of the operation's clock (performance.now, faked: it moves only when told) pass while `op`
 * is under way, so that what the engine times over it is exactly known. Call useRealTimers afterwards.
 */
function clockMovesDuring(e: FakeEnv, op: 'startLiveBackup', ms: number): void {
  vi.useFakeTimers({ toFake: ['performance'] });
  const original = e.hv[op].bind(e.hv) as (...args: unknown[]) => Promise<unknown>;
  (e.hv as unknown as Record<string, unknown>)[op] = (...args: unknown[]) => {
    vi.advanceTimersByTime(ms);
    return original(...args);
  };
}

/** Resolves when thawFilesystems of the fake has answered (the wrapper leaves it a public call). */
function onThaw(e: FakeEnv): Promise<void> {
  return new Promise((resolve) => {
    const thaw = e.hv.thawFilesystems.bind(e.hv);
    e.hv.thawFilesystems = async (uuid, timeoutMs) => {
      try {
        return await thaw(uuid, timeoutMs);
      } finally {
        resolve();
      }
    };
  });
}

/** The InjectedFaults in an error: itself, its causes, and its undo errors, recursively. */
function faultsIn(err: unknown): InjectedFault[] {
  if (err instanceof InjectedFault) return [err];
  if (!(err instanceof Error)) return [];
  const undo = err instanceof SnapshotFailed ? err.undoErrors : [];
  return [err.cause, ...undo].flatMap(faultsIn);
}

const STOPS = /^(managedSave|resume|pause|unpause|stop|start)$/;

describe('live: quiesce', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('config: strategy live, quiesce modes, and positive limits', () => {
    const conf = loadConfigFromText('[snapshot]\nstrategy = live\nquiesce = required\nmax_freeze_seconds = 2.5\nguest_agent_timeout = 1\n', 'a.conf');
    expect(conf.snapshot).toMatchObject({ strategy: 'live', quiesce: 'required', max_freeze_seconds: 2.5, guest_agent_timeout: 1 });
    expect(() => loadConfigFromText('[snapshot]\nquiesce = maybe\n', 'a.conf')).toThrow(/quiesce.*one of off, auto, required/);
    expect(() => loadConfigFromText('[snapshot]\nmax_freeze_seconds = 0\n', 'a.conf')).toThrow(/max_freeze_seconds.*more than 0/);
    expect(() => loadConfigFromText('[snapshot]\nguest_agent_timeout = -1\n', 'a.conf')).toThrow(/guest_agent_timeout.*a number/);
  });

  it("the engine's default options are the config's defaults", () => {
    expect(quiesceOptions(defaultConfig().snapshot)).toEqual(DEFAULT_QUIESCE);
    expect(quiesceOptions({ quiesce: 'required', max_freeze_seconds: 0.5, guest_agent_timeout: 2 })).toEqual({
      mode: 'required',
      maxFreezeMs: 500,
      agentTimeoutMs: 2000,
    });
  });

  it('auto with an agent: freeze, start the job, thaw, wait; the image is the disk at the job start', async () => {
    const { e, uuid, ops } = await liveGuest('running', { present: true });
    // The freeze spans the job's start, and nothing else takes time: freeze_ms is exactly that.
    clockMovesDuring(e, 'startLiveBackup', 1234);
    const imageId = randomUUID();
    const progress: number[] = [];
    const result = await e.engine.take({
      requestId: 'r',
      instanceUuid: uuid,
      imageId,
      onProgress: (phase, f) => phase === 'export' && progress.push(f),
    });
    expect(result).toMatchObject({ status: 'active', strategy: 'live', quiesced: true, downtime_ms: 0, freeze_ms: 1234, internal_snapshots: 0 });
    expect(ops().filter((op) => /Filesystems|guestAgent|Backup|backup/.test(op))).toEqual([
      'guestAgentAvailable',
      'freezeFilesystems',
      'startLiveBackup',
      'thawFilesystems',
      'backupWait',
    ]);
    expect(ops().filter((op) => STOPS.test(op))).toEqual([]);
    await expectImageIsJobStart(e, uuid, imageId);
    // The guest wrote during the job: the disk moved on, the image did not.
    expect(e.hv.diskContent(uuid).equals(e.hv.liveBackups(uuid)[0]!.pointInTime)).toBe(false);
    expect(progress.at(-1)).toBe(1);
    expect(e.hv.frozen(uuid)).toBe(false);
    expect(e.hv.violations).toEqual([]);
  });

  it('auto without an agent: no freeze, the snapshot is taken unquiesced', async () => {
    const { e, uuid, ops } = await liveGuest('running', { present: false });
    const imageId = randomUUID();
    const result = await take(e, uuid, imageId);
    expect(result).toMatchObject({ status: 'active', quiesced: false, freeze_ms: 0 });
    expect(ops().filter((op) => /Filesystems|guestAgent/.test(op))).toEqual(['guestAgentAvailable']);
    await expectImageIsJobStart(e, uuid, imageId);
  });

  it('auto with an agent that does not answer: unquiesced after the agent timeout', async () => {
    const { e, uuid, ops } = await liveGuest('running', { present: true, hangs: true }, { quiesce: { agentTimeoutMs: 10 } });
    const result = await take(e, uuid);
    expect(result).toMatchObject({ status: 'active', quiesced: false, freeze_ms: 0 });
    expect(ops()).not.toContain('freezeFilesystems');
  });

  it.each([
    ['fails', { present: true, freezeFails: true }],
    ['freezes but its answer times out', { present: true, hangs: 'freeze' }],
  ] as const)('auto with a freeze that %s: thawed, then unquiesced', async (_name, agent) => {
    const { e, uuid, ops } = await liveGuest('running', agent, { quiesce: { agentTimeoutMs: 10 } });
    const imageId = randomUUID();
    const result = await take(e, uuid, imageId);
    expect(result).toMatchObject({ status: 'active', quiesced: false });
    expect(ops().filter((op) => /Filesystems/.test(op))).toEqual(['freezeFilesystems', 'thawFilesystems']);
    expect(e.hv.frozen(uuid)).toBe(false);
    await expectImageIsJobStart(e, uuid, imageId);
  });

  it('auto on a paused guest: its agent cannot answer and is not asked', async () => {
    const { e, uuid, ops } = await liveGuest('paused', { present: true });
    const imageId = randomUUID();
    const result = await take(e, uuid, imageId);
    expect(result).toMatchObject({ status: 'active', quiesced: false, downtime_ms: 0 });
    expect(ops().filter((op) => /Filesystems|guestAgent/.test(op))).toEqual([]);
    expect(e.hv.powerState(uuid)).toBe('paused');
    await expectImageIsJobStart(e, uuid, imageId);
  });

  it('off: the agent is never asked', async () => {
    const { e, uuid, ops } = await liveGuest('running', { present: true }, { quiesce: { mode: 'off' } });
    const result = await take(e, uuid);
    expect(result).toMatchObject({ status: 'active', quiesced: false, freeze_ms: 0 });
    expect(ops().filter((op) => /Filesystems|guestAgent/.test(op))).toEqual([]);
  });

  it.each([
    ['no agent', 'running', { present: false }],
    ['an agent that does not answer', 'running', { present: true, hangs: true }],
    ['an agent that cannot freeze', 'running', { present: true, freezeFails: true }],
    ['a paused guest', 'paused', { present: true }],
  ] as const)('required with %s: GuestAgentError before the guest is touched', async (_name, state, agent) => {
    const { e, uuid, ops } = await liveGuest(state, agent, { quiesce: { mode: 'required', agentTimeoutMs: 10 } });
    const imageId = randomUUID();
    const err = await snapshotFailure(take(e, uuid, imageId));
    expect(err.cause).toBeInstanceOf(GuestAgentError);
    expect(err.message).toMatch(/quiesce = required/);
    // Only look-ups and the agent: no stop, no save, no pause, no job, no export.
    expect(ops().filter((op) => !['info', 'diskInfo', 'guestAgentAvailable', 'freezeFilesystems', 'thawFilesystems'].includes(op))).toEqual([]);
    expect(e.hv.powerState(uuid)).toBe(state);
    expect(e.hv.frozen(uuid)).toBe(false);
    expect(e.hv.liveBackups(uuid)).toEqual([]);
    expect((await e.store.show(imageId)).status).toBe('killed');
    expect(await e.partialFiles()).toEqual([]);
    expect(e.hv.violations).toEqual([]);
  });

  it.each(['shutoff', 'saved'] as const)('required on a %s guest: no process, no freeze needed; the offline disk is exported', async (state) => {
    const { e, uuid, ops } = await liveGuest(state, { present: false }, { quiesce: { mode: 'required' } });
    const before = e.hv.diskContent(uuid);
    const imageId = randomUUID();
    const result = await take(e, uuid, imageId);
    expect(result).toMatchObject({ status: 'active', quiesced: false, freeze_ms: 0, downtime_ms: 0 });
    expect(ops()).toContain('exportDisk');
    expect(ops().filter((op) => STOPS.test(op) || /Backup|Filesystems|guestAgent/.test(op))).toEqual([]);
    expect((await fs.readFile(path.join(e.tmp, 'images', imageId))).equals(before)).toBe(true);
    expect(e.hv.powerState(uuid)).toBe(state);
  });
});

describe('monitor-snapshot: the freeze never outlasts max_freeze_seconds either', () => {
  afterEach(() => {
    vi.useRealTimers();
  });
  const opts = (mode: 'auto' | 'required'): FakeEnvOptions => ({ strategy: 'monitor-snapshot', quiesce: { mode, maxFreezeMs: 60_000 } });

  it('auto: a create slower than the limit is thawed by the timer; the image is unquiesced, its snapshot deleted', async () => {
    const { e, uuid, ops } = await liveGuest('running', { present: true }, opts('auto'));
    deadlineDuring(e, 'liveSnapshotCreate', 60_000);
    const result = await take(e, uuid);
    expect(result).toMatchObject({ status: 'active', quiesced: false, internal_snapshots: 0 });
    expect(ops().filter((op) => /Filesystems|Snapshot(Create|Delete)|exportDisk/.test(op))).toEqual([
      'freezeFilesystems',
      'liveSnapshotCreate',
      'thawFilesystems',
      'exportDisk',
      'liveSnapshotDelete',
    ]);
    expect(e.hv.frozen(uuid)).toBe(false);
  });

  it('required: the same run fails; the snapshot it made is deleted, the guest thawed and running', async () => {
    const { e, uuid } = await liveGuest('running', { present: true }, opts('required'));
    deadlineDuring(e, 'liveSnapshotCreate', 60_000);
    const imageId = randomUUID();
    const err = await snapshotFailure(take(e, uuid, imageId));
    expect(err.cause).toBeInstanceOf(GuestAgentError);
    expect(err.message).toMatch(/max_freeze_seconds/);
    expect(await e.ownSnapshots(uuid)).toEqual([]);
    expect(e.hv.frozen(uuid)).toBe(false);
    expect(e.hv.powerState(uuid)).toBe('running');
    expect(await e.partialFiles()).toEqual([]);
    expect((await e.store.show(imageId)).status).toBe('killed');
  });
});

describe('live: the freeze never outlasts max_freeze_seconds', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('auto: a job start slower than the limit is thawed by the timer; the image is unquiesced', async () => {
    const { e, uuid, ops } = await liveGuest('running', { present: true }, { quiesce: { maxFreezeMs: 60_000 } });
    deadlineDuring(e, 'startLiveBackup', 60_000);
    const imageId = randomUUID();
    const result = await take(e, uuid, imageId);
    expect(result).toMatchObject({ status: 'active', quiesced: false });
    // Frozen from before the held start until the timer's thaw: the limit exactly (a real clock's
    // sub-millisecond freeze rounded to 0 here now and then).
    expect(result.freeze_ms).toBe(60_000);
    // The thaw came while the job start was held (so from the timer), and only once.
    expect(ops().filter((op) => /Filesystems|Backup|backup/.test(op))).toEqual([
      'freezeFilesystems',
      'startLiveBackup',
      'thawFilesystems',
      'backupWait',
    ]);
    expect(e.hv.frozen(uuid)).toBe(false);
    await expectImageIsJobStart(e, uuid, imageId);
  });

  it('required: the same run fails, the job is cancelled, the guest is thawed', async () => {
    const { e, uuid } = await liveGuest('running', { present: true }, { quiesce: { mode: 'required', maxFreezeMs: 60_000 } });
    deadlineDuring(e, 'startLiveBackup', 60_000);
    const imageId = randomUUID();
    const err = await snapshotFailure(take(e, uuid, imageId));
    expect(err.cause).toBeInstanceOf(GuestAgentError);
    expect(err.message).toMatch(/max_freeze_seconds/);
    expect(e.hv.liveBackups(uuid).map((j) => j.status)).toEqual(['cancelled']);
    expect(e.hv.frozen(uuid)).toBe(false);
    expect(await e.partialFiles()).toEqual([]);
    expect((await e.store.show(imageId)).status).toBe('killed');
  });

  it('a freeze whose answer comes after the timer thawed is thawed again', async () => {
    const { e, uuid, ops } = await liveGuest('running', { present: true }, { quiesce: { maxFreezeMs: 60_000 } });
    deadlineDuring(e, 'freezeFilesystems', 60_000);
    const result = await take(e, uuid);
    expect(result).toMatchObject({ status: 'active', quiesced: false });
    expect(ops().filter((op) => /Filesystems/.test(op))).toEqual(['freezeFilesystems', 'thawFilesystems', 'thawFilesystems']);
    expect(e.hv.frozen(uuid)).toBe(false);
  });

  it('a thaw that fails once is retried by the undo; the snapshot fails', async () => {
    const { e, uuid, ops } = await liveGuest('running', { present: true, thawFails: 1 });
    const err = await snapshotFailure(take(e, uuid));
    expect(err.message).toMatch(/thaw/);
    expect(ops().filter((op) => /Filesystems/.test(op))).toEqual(['freezeFilesystems', 'thawFilesystems', 'thawFilesystems']);
    expect(e.hv.frozen(uuid)).toBe(false);
    expect(e.hv.liveBackups(uuid).map((j) => j.status)).toEqual(['cancelled']);
    expect(await e.partialFiles()).toEqual([]);
  });

  it('a thaw that fails in the step and in the undo is reported; the timer thaws at the limit', async () => {
    // The deadline's timer faked: the failure path takes no time on it, however slow the machine.
    const LIMIT = 10_000;
    const { e, uuid, ops } = await liveGuest('running', { present: true, thawFails: 2 }, { quiesce: { maxFreezeMs: LIMIT } });
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    const err = await snapshotFailure(take(e, uuid));
    expect(err.undoErrors.some((u) => u instanceof GuestAgentError)).toBe(true);
    const thawed = onThaw(e);
    vi.advanceTimersByTime(LIMIT - 1);
    expect(e.hv.frozen(uuid)).toBe(true);
    expect(ops().filter((op) => /Filesystems/.test(op))).toEqual(['freezeFilesystems', 'thawFilesystems', 'thawFilesystems']);
    vi.advanceTimersByTime(1);
    await thawed;
    expect(e.hv.frozen(uuid)).toBe(false);
    expect(ops().filter((op) => /Filesystems/.test(op))).toEqual(['freezeFilesystems', 'thawFilesystems', 'thawFilesystems', 'thawFilesystems']);
  });
});

describe('live: a failure anywhere thaws the guest', () => {
  const quiesce = { mode: 'required' as const, agentTimeoutMs: 10 };

  it('at every step', async () => {
    const steps = STRATEGY_STEPS.live;
    for (let at = 0; at < steps.length; at++) {
      const { e, uuid, ops } = await liveGuest('running', { present: true }, { quiesce });
      e.beforeStep = (_step, i) => {
        if (i === at) throw new Error(`injected before step ${i}`);
      };
      await expectSafeFailure(e, uuid, 'running', 'live', randomUUID());
      const agentOps = ops().filter((op) => /Filesystems/.test(op));
      if (agentOps.includes('freezeFilesystems')) expect(agentOps.at(-1)).toBe('thawFilesystems');
      expect(ops().filter((op) => STOPS.test(op))).toEqual([]);
    }
  });

  it('at every hypervisor call, before and after it acts', async () => {
    const probe = await liveGuest('running', { present: true }, { quiesce });
    await take(probe.e, probe.uuid);
    const clean = probe.ops();
    expect(clean).toEqual(expect.arrayContaining(['freezeFilesystems', 'startLiveBackup', 'thawFilesystems', 'backupWait']));

    const seen = new Map<string, number>();
    for (const op of clean) {
      const nth = (seen.get(op) ?? 0) + 1;
      seen.set(op, nth);
      for (const when of ['before', 'after'] as const) {
        const { e, uuid, ops } = await liveGuest('running', { present: true }, { quiesce });
        e.hv.injectFault({ op, nth: e.hv.callCount(op) + nth, when });
        const err = await expectSafeFailure(e, uuid, 'running', 'live', randomUUID());
        // It is the injected fault that failed the snapshot (as its cause, or an undo's).
        expect(faultsIn(err).map((f) => f.message)).toContainEqual(expect.stringMatching(new RegExp(`^injected fault: ${op} call #\\d+ \\(${when}\\)$`)));
        const agentOps = ops().filter((o) => /Filesystems/.test(o));
        if (agentOps.includes('freezeFilesystems')) expect(agentOps.at(-1)).toBe('thawFilesystems');
        expect(e.hv.liveBackups(uuid).filter((j) => j.status === 'running').length).toBeLessThanOrEqual(when === 'after' && op === 'startLiveBackup' ? 1 : 0);
      }
    }
  });
});

describe('live: downtime and the end log', () => {
  it("downtime_ms is the job start's I/O pause; freeze_ms and quiesced are logged at the end", async () => {
    const lines: Array<Record<string, unknown>> = [];
    const log = pino({ level: 'info' }, { write: (s: string) => void lines.push(JSON.parse(s) as Record<string, unknown>) });
    const { e, uuid } = await liveGuest('running', { present: true }, { hv: { backupStartPauseMs: 3 }, log });
    const result = await take(e, uuid);
    expect(result.downtime_ms).toBe(3);
    const end = lines.find((l) => l.msg === 'snapshot end');
    expect(end).toMatchObject({ downtime_ms: 3, quiesced: true, freeze_ms: result.freeze_ms, strategy: 'live', instance_uuid: uuid });
  });
});

describe('a backend without live backups', () => {
  it('refuses [snapshot] strategy = live at start, naming the option and the usable strategies', async () => {
    const e = await makeFakeEnv({ hv: { supportsLiveBackup: false }, strategy: 'cold' });
    try {
      const { hv, store, lifecycle, operations } = e;
      expect(
        () => new SnapshotEngine({ hv, store, lifecycle, operations, log: pino({ level: 'silent' }), namePrefix: 'snapdrv-', defaultStrategy: 'live' }),
      ).toThrow(ConfigError);
      expect(
        () => new SnapshotEngine({ hv, store, lifecycle, operations, log: pino({ level: 'silent' }), namePrefix: 'snapdrv-', defaultStrategy: 'live' }),
      ).toThrow(/\[snapshot\] strategy = live: the fake hypervisor backend cannot take live backups; choose one of cold, /);
    } finally {
      await e.cleanup();
    }
  });

  it('refuses a live snapshot request before touching anything', async () => {
    const e = await makeFakeEnv({ hv: { supportsLiveBackup: false }, strategy: 'cold' });
    const { hv } = e;
    try {
      const uuid = randomUUID();
      await guestIn(e, 'running', uuid);
      const calls = hv.calls.length;
      await expect(e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId: randomUUID(), strategy: 'live' })).rejects.toThrow(
        /strategy live: the fake hypervisor backend cannot take live backups/,
      );
      expect(hv.calls.length).toBe(calls);
      expect(await e.store.list()).toEqual([]);
    } finally {
      await e.cleanup();
    }
  });
});
