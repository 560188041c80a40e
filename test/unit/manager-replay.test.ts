import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { ComputeManager, RESULT_PROPERTY, type SnapshotInfo, type SnapshotNotifier } from '../../src/compute/manager.js';
import type { StrategyName } from '../../src/config/schema.js';
import { ImageExists, ImageNotFound, SnapshotInterrupted } from '../../src/errors.js';
import type { FakeHypervisorOptions } from '../../src/hypervisor/fake/fake-hypervisor.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { silentLogger } from '../../src/log.js';
import type { RpcContext } from '../../src/messaging/rpc-types.js';
import type { SnapshotRequest, SnapshotResult } from '../../src/snapshot/engine.js';
import { recoverOperations } from '../../src/snapshot/recovery.js';
import { guestIn, makeFakeEnv, PREFIX, type FakeEnv } from '../helpers/fake-env.js';

/**
 * A request carried out again from the request journal after a crash (ctx.replayed): the manager
 * settles it from its image, if the operation had got that far, instead of running it twice.
 */

let envs: FakeEnv[] = [];
afterEach(async () => {
  await Promise.all(envs.map((e) => e.cleanup()));
  envs = [];
});

const CTX: RpcContext = { requestId: 'req-first', userId: 'u', projectId: 'p', raw: {} };
const REPLAYED: RpcContext = { requestId: 'req-first', userId: 'u', projectId: 'p', raw: {}, replayed: true };

interface Event {
  kind: 'start' | 'end' | 'error';
  info: SnapshotInfo;
  extra?: unknown;
}

/**
 * A manager over the env with the real engine (every call to it recorded) and a recording notifier.
 * Its configured default strategy is suspend-create-resume-extract whatever the engine runs (as after
 * a restart with another [snapshot] strategy): a reply naming it was not necessarily what ran.
 */
function managerOver(env: FakeEnv, store: ImageStore = env.store, onEnd?: () => Promise<void>) {
  const takes: SnapshotRequest[] = [];
  const events: Event[] = [];
  const notifier: SnapshotNotifier = {
    snapshotStart: (info) => void events.push({ kind: 'start', info }),
    snapshotEnd: async (info, result) => {
      await onEnd?.();
      events.push({ kind: 'end', info, extra: result });
    },
    snapshotError: (info, err) => void events.push({ kind: 'error', info, extra: err }),
  };
  const manager = new ComputeManager({
    engine: {
      takeFromGuest: (req) => {
        takes.push(req);
        return env.engine.takeFromGuest(req);
      },
    },
    lifecycle: env.lifecycle,
    store,
    hv: env.hv,
    log: silentLogger(),
    maxConcurrentSnapshots: 2,
    notifier,
    defaultStrategy: 'suspend-create-resume-extract',
  });
  return { manager, takes, events };
}

async function setup(opts: { strategy?: StrategyName; hv?: FakeHypervisorOptions } = {}) {
  const env = await makeFakeEnv({ strategy: opts.strategy ?? 'suspend-create-resume-extract', hv: opts.hv });
  envs.push(env);
  const uuid = randomUUID();
  await guestIn(env, 'running', uuid);
  return { env, uuid, ...managerOver(env) };
}

/** Start-up recovery as a new agent runs it (the crashed operation's owner is gone). */
function recover(env: FakeEnv) {
  return recoverOperations({
    hv: env.hv,
    store: env.store,
    lifecycle: env.lifecycle,
    pending: env.pending,
    operations: env.operations,
    log: silentLogger(),
    namePrefix: PREFIX,
    strategy: 'suspend-create-resume-extract',
    agentTimeoutMs: 50,
    ownerRunning: async () => false,
  });
}

/** Runs a snapshot that hangs forever before step `index` (the agent "dies" there); resolves when it has. */
async function crashAtStep(s: Setup, imageId: string, index: number): Promise<void> {
  let reached!: () => void;
  const hung = new Promise<void>((r) => (reached = r));
  s.env.beforeStep = (_step, i) => {
    if (i !== index) return;
    reached();
    return new Promise<never>(() => undefined);
  };
  snapshot(s, imageId, CTX).catch(() => undefined);
  await hung;
  s.env.beforeStep = undefined;
}

type Setup = Awaited<ReturnType<typeof setup>>;

function snapshot(s: Setup, imageId: string, ctx: RpcContext, uuid: string = s.uuid): Promise<unknown> {
  return s.manager.call('snapshot_instance', { instance: { uuid }, image_id: imageId }, ctx);
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    (v) => {
      throw new Error(`expected a rejection, got ${JSON.stringify(v)}`);
    },
    (err: unknown) => err,
  );
}

/** Clears what the test's setup produced, so that only the replayed call is looked at. */
function mark(s: Setup): void {
  s.takes.length = 0;
  s.events.length = 0;
  s.env.hv.calls.length = 0;
}

describe('ComputeManager: a replayed snapshot request', () => {
  it('whose image is active returns the result its first run returned, exactly, and notifies end once; the engine is not called', async () => {
    const s = await setup();
    const imageId = randomUUID();
    const first = (await snapshot(s, imageId, CTX)) as SnapshotResult;
    mark(s);
    const result = (await snapshot(s, imageId, REPLAYED)) as SnapshotResult;
    expect(result).toEqual(first);
    const meta = await s.env.store.show(imageId);
    expect(result).toMatchObject({ image_id: imageId, status: 'active', size: meta.size, checksum: meta.checksum, os_hash_value: meta.os_hash_value });
    expect(s.takes).toEqual([]);
    expect(s.events.map((e) => e.kind)).toEqual(['end']);
    expect(s.events[0]!.info).toMatchObject({ instanceUuid: s.uuid, imageId, requestId: 'req-first', imageType: 'snapshot', strategy: first.strategy });
    expect(s.events[0]!.extra).toEqual(result);
    expect(s.env.hv.calls.map((c) => c.op)).toEqual([]); // the guest is not touched
    expect((await s.env.store.verify(imageId)).ok).toBe(true);
  });

  /** A fake clock that moves 25 ms at every look: a managed save's vCPU stop → resume is some ticks. */
  function ticking(): () => number {
    let t = Date.parse('2026-01-01T00:00:00Z');
    return () => (t += 25);
  }

  it.each([
    { strategy: 'monitor-snapshot', hv: { liveSnapshotIoHeldMs: 37 }, expected: { downtime_ms: 37, quiesced: true, internal_snapshots: 0 } },
    { strategy: 'live', hv: { backupStartPauseMs: 23 }, expected: { downtime_ms: 23, quiesced: true, internal_snapshots: 0 } },
    { strategy: 'deferred-delete', hv: { now: ticking() }, expected: { quiesced: true, internal_snapshots: 1 } },
  ] as const)(
    'after a restart (new manager, new store object, configured default suspend-create-resume-extract): answers with what $strategy really did, not the default and zeros',
    async ({ strategy, hv, expected }) => {
      const s = await setup({ strategy, hv });
      const imageId = randomUUID();
      const first = (await snapshot(s, imageId, CTX)) as SnapshotResult;
      expect(first).toMatchObject({ strategy, status: 'active', ...expected });
      expect(first.downtime_ms).toBeGreaterThan(0);
      // What a restarted agent has: nothing in memory, only the store's files.
      const again = managerOver(s.env, new ImageStore({ path: s.env.store.path, reservedSpaceMb: 0, osHashAlgo: 'sha512' }));
      s.env.hv.calls.length = 0;
      const result = await again.manager.call('snapshot_instance', { instance: { uuid: s.uuid }, image_id: imageId }, REPLAYED);
      expect(result).toEqual(first);
      expect(again.takes).toEqual([]);
      expect(again.events.map((e) => [e.kind, e.info.strategy])).toEqual([['end', strategy]]);
      expect(again.events[0]!.extra).toEqual(first);
      expect(s.env.hv.calls).toEqual([]);
    },
  );

  it('has its result kept in the image metadata file (written before the end is notified), which is what a replay answers with', async () => {
    const s = await setup({ strategy: 'monitor-snapshot', hv: { liveSnapshotIoHeldMs: 12 } });
    const imageId = randomUUID();
    const metaFile = s.env.store.metadataPath(imageId);
    let onDiskAtEnd: unknown;
    const seen = managerOver(s.env, s.env.store, async () => {
      onDiskAtEnd = JSON.parse(await fs.readFile(metaFile, 'utf8')).properties[RESULT_PROPERTY];
    });
    const first = (await seen.manager.call('snapshot_instance', { instance: { uuid: s.uuid }, image_id: imageId }, CTX)) as SnapshotResult;
    // A JSON string, as Glance's image properties are strings.
    expect(typeof onDiskAtEnd).toBe('string');
    expect(JSON.parse(onDiskAtEnd as string)).toEqual(first);
    const meta = JSON.parse(await fs.readFile(metaFile, 'utf8'));
    expect(meta).toMatchObject({ status: 'active', properties: { instance_uuid: s.uuid, [RESULT_PROPERTY]: JSON.stringify(first) } });
    expect((await s.env.store.verify(imageId)).ok).toBe(true);
  });

  const noRecord = [
    ['no recorded result (the agent stopped between the commit and the record)', undefined],
    ['a recorded result of other data', (r: SnapshotResult) => JSON.stringify({ ...r, checksum: '0'.repeat(32) })],
    ['a malformed recorded result', (r: SnapshotResult) => JSON.stringify({ ...r, downtime_ms: 'soon' })],
    ['a recorded result that is not JSON', (r: SnapshotResult) => `${JSON.stringify(r)}}`],
    ['a recorded result that is an object, not a JSON string', (r: SnapshotResult) => ({ ...r })],
  ] as const;
  it.each(noRecord)(
    "whose image is active with %s: answers with the image's own facts only (no strategy or timings made up), end notified without a strategy",
    async (_what, record) => {
      const s = await setup({ strategy: 'monitor-snapshot', hv: { liveSnapshotIoHeldMs: 12 } });
      const imageId = randomUUID();
      // The engine alone: the image is committed, the manager never recorded the result.
      const ran = await s.env.engine.take({ requestId: 'req-first', instanceUuid: s.uuid, imageId });
      if (record) await s.env.store.setProperties(imageId, { [RESULT_PROPERTY]: record(ran) });
      mark(s);
      const result = await snapshot(s, imageId, REPLAYED);
      const meta = await s.env.store.show(imageId);
      expect(result).toStrictEqual({
        image_id: imageId,
        status: 'active',
        size: meta.size,
        checksum: meta.checksum,
        os_hash_algo: 'sha512',
        os_hash_value: meta.os_hash_value,
      });
      expect(result).toMatchObject({ size: ran.size, checksum: ran.checksum, os_hash_value: ran.os_hash_value });
      expect(s.takes).toEqual([]);
      expect(s.events.map((e) => e.kind)).toEqual(['end']);
      expect(s.events[0]!.info.strategy).toBeUndefined();
      expect(s.events[0]!.extra).toStrictEqual(result);
      expect(s.env.hv.calls).toEqual([]);
    },
  );

  it('a snapshot whose result cannot be recorded still succeeds (the image is made); a replay then answers with the image', async () => {
    const s = await setup();
    const failing = new (class extends ImageStore {
      override setProperties(): Promise<never> {
        return Promise.reject(Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' }));
      }
    })({ path: s.env.store.path, reservedSpaceMb: 0, osHashAlgo: 'sha512' });
    const full = managerOver(s.env, failing);
    const imageId = randomUUID();
    const first = (await full.manager.call('snapshot_instance', { instance: { uuid: s.uuid }, image_id: imageId }, CTX)) as SnapshotResult;
    expect(first).toMatchObject({ image_id: imageId, status: 'active', strategy: 'suspend-create-resume-extract' });
    expect(full.events.map((e) => e.kind)).toEqual(['start', 'end']);
    expect((await s.env.store.show(imageId)).properties[RESULT_PROPERTY]).toBeUndefined();
    const result = await snapshot(s, imageId, REPLAYED);
    expect(result).not.toHaveProperty('strategy');
    expect(result).not.toHaveProperty('downtime_ms');
    expect(result).toMatchObject({ image_id: imageId, status: 'active', checksum: first.checksum });
  });

  it('whose first run failed (image killed with its error) before the journal recorded the end: SnapshotInterrupted naming that error, no result', async () => {
    const s = await setup();
    const imageId = randomUUID();
    s.env.beforeStep = (_step, i) => {
      if (i === 2) throw new Error('qcow2 header unreadable');
    };
    const firstErr = await rejection(snapshot(s, imageId, CTX));
    s.env.beforeStep = undefined;
    expect((firstErr as Error).message).toContain('qcow2 header unreadable');
    mark(s);
    const err = await rejection(snapshot(s, imageId, REPLAYED));
    expect(err).toBeInstanceOf(SnapshotInterrupted);
    expect((err as Error).message).toContain('qcow2 header unreadable');
    expect((err as Error).message).toContain(`image ${imageId} is killed`);
    expect(s.takes).toEqual([]);
    expect(s.events.map((e) => e.kind)).toEqual(['error']);
    expect(s.events[0]!.extra).toBe(err);
  });

  it('matches the image to the instance whatever the case of the uuid', async () => {
    const s = await setup();
    const imageId = randomUUID();
    await snapshot(s, imageId, CTX);
    mark(s);
    const result = (await snapshot(s, imageId.toUpperCase(), REPLAYED, s.uuid.toUpperCase())) as SnapshotResult;
    expect(result.status).toBe('active');
    expect(s.takes).toEqual([]);
    expect(s.events.map((e) => e.kind)).toEqual(['end']);
  });

  it('whose image is killed ends with SnapshotInterrupted naming the kill reason, error notified; the engine is not called', async () => {
    const s = await setup();
    const imageId = randomUUID();
    await s.env.store.create({ id: imageId, name: 'x', instanceUuid: s.uuid, imageType: 'snapshot' });
    const reason = 'interrupted: the agent stopped at step 4 (resume) of suspend-create-resume-extract';
    await s.env.store.kill(imageId, reason);
    mark(s);
    const err = await rejection(snapshot(s, imageId, REPLAYED));
    expect(err).toBeInstanceOf(SnapshotInterrupted);
    expect((err as Error).message).toContain(reason);
    expect((err as Error).message).toContain(`image ${imageId} is killed`);
    expect(s.takes).toEqual([]);
    expect(s.events.map((e) => e.kind)).toEqual(['error']);
    expect(s.events[0]!.extra).toBe(err);
    expect(s.events[0]!.info).toMatchObject({ instanceUuid: s.uuid, imageId });
    expect((await s.env.store.show(imageId)).status).toBe('killed');
    expect(s.env.hv.calls).toEqual([]);
  });

  it('whose image is killed without a reason names its status', async () => {
    const s = await setup();
    const imageId = randomUUID();
    await s.env.store.create({ id: imageId, name: 'x', instanceUuid: s.uuid, imageType: 'snapshot' });
    await s.env.store.kill(imageId);
    mark(s);
    const err = await rejection(snapshot(s, imageId, REPLAYED));
    expect(err).toBeInstanceOf(SnapshotInterrupted);
    expect((err as Error).message).toMatch(/did not complete \(image killed\)/);
    expect(s.takes).toEqual([]);
    expect(s.events.map((e) => e.kind)).toEqual(['error']);
  });

  it.each(['queued', 'saving'] as const)('whose image is %s: the image is killed, then SnapshotInterrupted and error; the engine is not called', async (status) => {
    const s = await setup();
    const imageId = randomUUID();
    await s.env.store.create({ id: imageId, name: 'x', instanceUuid: s.uuid, imageType: 'snapshot' });
    if (status === 'saving') {
      await s.env.store.markSaving(imageId);
      await fs.writeFile(s.env.store.partialPath(imageId), 'half an image');
    }
    expect((await s.env.store.show(imageId)).status).toBe(status);
    mark(s);
    const err = await rejection(snapshot(s, imageId, REPLAYED));
    expect(err).toBeInstanceOf(SnapshotInterrupted);
    const meta = await s.env.store.show(imageId);
    expect(meta.status).toBe('killed');
    expect(meta.properties.kill_reason).toMatch(/interrupted: found unfinished when the request was carried out again/);
    expect((err as Error).message).toContain(String(meta.properties.kill_reason));
    await expect(fs.stat(s.env.store.partialPath(imageId))).rejects.toThrow();
    expect(s.takes).toEqual([]);
    expect(s.events.map((e) => e.kind)).toEqual(['error']);
    expect(s.events[0]!.extra).toBe(err);
  });

  it('with no image is carried out: the engine runs, start and end notified', async () => {
    const s = await setup();
    const imageId = randomUUID();
    mark(s);
    const result = (await snapshot(s, imageId, REPLAYED)) as SnapshotResult;
    expect(result.status).toBe('active');
    expect(s.takes.map((t) => t.imageId)).toEqual([imageId]);
    expect(s.events.map((e) => e.kind)).toEqual(['start', 'end']);
    expect((await s.env.store.verify(imageId)).ok).toBe(true);
    expect(s.env.hv.violations).toEqual([]);
  });

  it.each(['active', 'queued', 'killed'] as const)(
    'whose image id belongs to ANOTHER instance (%s) is not settled from it: ImageExists from the normal path, that image untouched',
    async (status) => {
      const s = await setup();
      const other = randomUUID();
      await guestIn(s.env, 'running', other);
      const imageId = randomUUID();
      if (status === 'active') {
        await snapshot(s, imageId, CTX, other);
      } else {
        await s.env.store.create({ id: imageId, name: 'x', instanceUuid: other, imageType: 'snapshot' });
        if (status === 'killed') await s.env.store.kill(imageId, 'earlier failure');
      }
      const before = await s.env.store.show(imageId);
      mark(s);
      const err = await rejection(snapshot(s, imageId, REPLAYED));
      expect(err).toBeInstanceOf(ImageExists);
      expect(s.takes.map((t) => [t.imageId, t.instanceUuid])).toEqual([[imageId, s.uuid]]);
      expect(s.events.map((e) => e.kind)).toEqual(['start', 'error']);
      expect(s.events[1]!.extra).toBe(err);
      expect(await s.env.store.show(imageId)).toEqual(before);
      expect(s.env.hv.powerState(s.uuid)).toBe('running');
      expect(await s.env.ownSnapshots(s.uuid)).toEqual([]);
      expect(await s.env.operations.list()).toEqual([]);
    },
  );

  it.each(['active', 'killed'] as const)('not replayed, with an existing %s image: ImageExists as before, image untouched', async (status) => {
    const s = await setup();
    const imageId = randomUUID();
    if (status === 'active') await snapshot(s, imageId, CTX);
    else {
      await s.env.store.create({ id: imageId, name: 'x', instanceUuid: s.uuid, imageType: 'snapshot' });
      await s.env.store.kill(imageId, 'earlier failure');
    }
    const before = await s.env.store.show(imageId);
    mark(s);
    const err = await rejection(snapshot(s, imageId, CTX));
    expect(err).toBeInstanceOf(ImageExists);
    expect(s.takes).toHaveLength(1);
    expect(s.events.map((e) => e.kind)).toEqual(['start', 'error']);
    expect(await s.env.store.show(imageId)).toEqual(before);
    expect(await s.env.operations.list()).toEqual([]);
  });

  it('after a crash and start-up recovery: the replayed request ends with SnapshotInterrupted naming where it stopped', async () => {
    const s = await setup();
    const imageId = randomUUID();
    await crashAtStep(s, imageId, 3); // before resuming the guest
    expect(s.env.hv.powerState(s.uuid)).toBe('saved');
    // A new agent: recovery first, then the journaled request is carried out again, by a new manager.
    const [rec] = await recover(s.env);
    expect(rec).toMatchObject({ image: 'killed', guest_now: 'running' });
    const again = managerOver(s.env);
    const err = await rejection(again.manager.call('snapshot_instance', { instance: { uuid: s.uuid }, image_id: imageId }, REPLAYED));
    expect(err).toBeInstanceOf(SnapshotInterrupted);
    expect((err as Error).message).toContain('stopped at step 4 (resume) of suspend-create-resume-extract');
    expect(again.takes).toEqual([]);
    expect(again.events.map((e) => e.kind)).toEqual(['error']);
    expect(s.env.hv.powerState(s.uuid)).toBe('running');
    expect(s.env.hv.violations).toEqual([]);
  });

  it('after a crash before any step (image discarded by recovery): the replayed request is carried out', async () => {
    const s = await setup();
    const imageId = randomUUID();
    await crashAtStep(s, imageId, 0);
    // Make the record say `setup` (no step begun), as a crash at `operation-recorded` leaves it.
    const [record] = await s.env.operations.list();
    await s.env.operations.write({ ...record!, phase: 'setup', step_index: -1 });
    const [rec] = await recover(s.env);
    expect(rec!.image).toBe('discarded');
    await expect(s.env.store.show(imageId)).rejects.toBeInstanceOf(ImageNotFound);
    const again = managerOver(s.env);
    const result = (await again.manager.call('snapshot_instance', { instance: { uuid: s.uuid }, image_id: imageId }, REPLAYED)) as SnapshotResult;
    expect(result.status).toBe('active');
    expect(again.takes.map((t) => t.imageId)).toEqual([imageId]);
    expect(again.events.map((e) => e.kind)).toEqual(['start', 'end']);
    expect((await s.env.store.verify(imageId)).ok).toBe(true);
    expect(s.env.hv.violations).toEqual([]);
  });
});
