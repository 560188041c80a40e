import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { ComputeManager, type ComputeManagerDeps, type SnapshotInfo, type SnapshotNotifier } from '../../src/compute/manager.js';
import type { StrategyName } from '../../src/config/schema.js';
import { ImageNotFound, InvalidArgument, NoSuchMethod } from '../../src/errors.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { silentLogger } from '../../src/log.js';
import type { RpcContext } from '../../src/messaging/rpc-types.js';
import type { SnapshotRequest, SnapshotResult } from '../../src/snapshot/engine.js';
import { guestIn, makeFakeEnv, type FakeEnv } from '../helpers/fake-env.js';

let envs: FakeEnv[] = [];
afterEach(async () => {
  await Promise.all(envs.map((e) => e.cleanup()));
  envs = [];
});

async function setup(opts: { strategy?: StrategyName; deps?: Partial<ComputeManagerDeps> } = {}) {
  const env = await makeFakeEnv({ strategy: opts.strategy });
  envs.push(env);
  const manager = new ComputeManager({
    engine: env.engine,
    lifecycle: env.lifecycle,
    store: env.store,
    hv: env.hv,
    log: silentLogger(),
    maxConcurrentSnapshots: 5,
    ...opts.deps,
  });
  return { env, manager };
}

const CTX: RpcContext = { requestId: 'req-3f1c', userId: 'ctx-user', projectId: 'ctx-project', raw: {} };
const BARE_CTX: RpcContext = { requestId: 'req-bare', raw: {} };

function novaInstance(uuid: string, data: Record<string, unknown> = {}) {
  return {
    'nova_object.name': 'Instance',
    'nova_object.namespace': 'nova',
    'nova_object.version': '2.8',
    'nova_object.data': {
      uuid,
      display_name: 'web-1',
      image_ref: 'c0ffee00-0000-4000-8000-000000000001',
      user_id: 'owner-user',
      project_id: 'owner-project',
      ...data,
    },
  };
}

/** Lets every ready callback run (no timers involved). */
async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await new Promise<void>((r) => setImmediate(r));
}

function gate() {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

/** An image made outside the manager, with a chosen creation time (older than anything made now). */
async function seedImage(
  env: FakeEnv,
  o: { instanceUuid: string; imageType: 'snapshot' | 'backup'; backupType?: string; createdAt: string; kill?: boolean },
): Promise<string> {
  const store = new ImageStore({ path: env.store.path, reservedSpaceMb: 0, osHashAlgo: 'sha512', now: () => new Date(o.createdAt) });
  const id = randomUUID();
  await store.create({ id, name: 'seeded', instanceUuid: o.instanceUuid, imageType: o.imageType, backupType: o.backupType });
  if (o.kill) {
    await store.kill(id, 'seeded failure');
  } else {
    await fs.writeFile(store.partialPath(id), `data of ${id}`);
    await store.commit(id);
  }
  return id;
}

async function exists(store: ImageStore, id: string): Promise<boolean> {
  try {
    await store.show(id);
    return true;
  } catch (err) {
    if (err instanceof ImageNotFound) return false;
    throw err;
  }
}

describe('ComputeManager: RPC surface', () => {
  it('serves version 6.2 of the five methods, without a namespace', async () => {
    const { manager } = await setup();
    expect(manager.version).toBe('6.2');
    expect(manager.namespace).toBeUndefined();
    expect([...manager.methods].sort()).toEqual(['backup_instance', 'reboot_instance', 'snapshot_instance', 'start_instance', 'stop_instance']);
  });
});

describe('ComputeManager: argument validation', () => {
  const U = '8d3f2a1e-6b7c-4d5e-9f01-23456789abcd';
  const IMG = '1b4e28ba-2fa1-41d2-883f-0016d3cca427';
  const cases: Array<[string, string, Record<string, unknown>, RegExp]> = [
    ['no instance', 'snapshot_instance', { image_id: IMG }, /missing argument instance: expected a nova Instance object primitive/],
    ['no image_id', 'snapshot_instance', { instance: { uuid: U } }, /missing argument image_id: expected an image id \(a UUID\)/],
    ['instance not an object', 'snapshot_instance', { instance: 'abc', image_id: IMG }, /argument instance is "abc": expected a nova Instance/],
    ['instance an array', 'start_instance', { instance: [U] }, /argument instance is an array/],
    ['instance without uuid', 'start_instance', { instance: { name: 'x' } }, /argument instance has no uuid/],
    ['instance uuid not a UUID', 'start_instance', { instance: { uuid: 'vm-1' } }, /argument instance\.uuid "vm-1" is not an instance uuid: expected a UUID/],
    ['primitive of another class', 'start_instance', { instance: { 'nova_object.name': 'Flavor', 'nova_object.data': { uuid: U } } }, /argument instance is a nova object primitive of "Flavor"/],
    ['primitive without data', 'start_instance', { instance: { 'nova_object.name': 'Instance' } }, /argument instance has nova_object.data missing/],
    ['primitive uuid not a UUID', 'start_instance', { instance: novaInstance('nope') }, /argument instance\["nova_object.data"\]\.uuid "nope" is not an instance uuid/],
    ['display_name not a string', 'start_instance', { instance: novaInstance(U, { display_name: 7 }) }, /argument instance\["nova_object.data"\]\.display_name is number 7: expected a string or null/],
    ['image_id not a UUID', 'snapshot_instance', { instance: { uuid: U }, image_id: '../etc' }, /argument image_id "..\/etc" is not an image id: expected a UUID/],
    ['image_id a number', 'snapshot_instance', { instance: { uuid: U }, image_id: 42 }, /argument image_id number 42 is not an image id/],
    ['unknown extra argument', 'snapshot_instance', { instance: { uuid: U }, image_id: IMG, force: true }, /unexpected argument "force": expected only instance, image_id/],
    ['backup_type empty', 'backup_instance', { instance: { uuid: U }, image_id: IMG, backup_type: ' ', rotation: 1 }, /argument backup_type is " ": expected a non-empty string/],
    ['backup_type not a string', 'backup_instance', { instance: { uuid: U }, image_id: IMG, backup_type: 3, rotation: 1 }, /argument backup_type is number 3/],
    ['rotation missing', 'backup_instance', { instance: { uuid: U }, image_id: IMG, backup_type: 'daily' }, /missing argument rotation: expected an integer >= 0/],
    ['rotation negative', 'backup_instance', { instance: { uuid: U }, image_id: IMG, backup_type: 'daily', rotation: -1 }, /argument rotation is number -1: expected an integer >= 0/],
    ['rotation fractional', 'backup_instance', { instance: { uuid: U }, image_id: IMG, backup_type: 'daily', rotation: 1.5 }, /argument rotation is number 1.5/],
    ['rotation a string', 'backup_instance', { instance: { uuid: U }, image_id: IMG, backup_type: 'daily', rotation: '2' }, /argument rotation is "2"/],
    ['reboot_type lower-case', 'reboot_instance', { instance: { uuid: U }, reboot_type: 'soft' }, /argument reboot_type is "soft": expected one of SOFT, HARD/],
    ['reboot_type missing', 'reboot_instance', { instance: { uuid: U } }, /missing argument reboot_type: expected one of SOFT, HARD/],
    ['block_device_info a string', 'reboot_instance', { instance: { uuid: U }, reboot_type: 'HARD', block_device_info: 'x' }, /argument block_device_info is "x": expected an object or null/],
    ['clean_shutdown not a boolean', 'stop_instance', { instance: { uuid: U }, clean_shutdown: 'yes' }, /argument clean_shutdown is "yes": expected true or false/],
    ['extra argument on start', 'start_instance', { instance: { uuid: U }, image_id: IMG }, /start_instance: unexpected argument "image_id": expected only instance$/],
  ];

  it.each(cases)('%s → InvalidArgument naming it, from validate() and call(), nothing touched', async (_name, method, args, message) => {
    const { env, manager } = await setup();
    expect(() => manager.validate(method, args)).toThrow(InvalidArgument);
    expect(() => manager.validate(method, args)).toThrow(message);
    await expect(manager.call(method, args, CTX)).rejects.toThrow(InvalidArgument);
    expect(env.hv.calls).toEqual([]);
    expect(await env.store.list()).toEqual([]);
  });

  it('refuses arguments that are not an object, and an unknown method', async () => {
    const { manager } = await setup();
    expect(() => manager.validate('snapshot_instance', [] as unknown as Record<string, unknown>)).toThrow(/arguments must be a JSON object, got an array/);
    expect(() => manager.validate('delete_instance', { instance: { uuid: U } })).toThrow(NoSuchMethod);
  });

  it('accepts every valid form', async () => {
    const { manager } = await setup();
    const ok: Array<[string, Record<string, unknown>]> = [
      ['snapshot_instance', { instance: novaInstance(U), image_id: IMG }],
      ['snapshot_instance', { instance: { uuid: U.toUpperCase() }, image_id: IMG.toUpperCase() }],
      ['snapshot_instance', { instance: novaInstance(U, { display_name: null, image_ref: null }), image_id: IMG }],
      ['backup_instance', { instance: { uuid: U }, image_id: IMG, backup_type: 'daily', rotation: 0 }],
      ['reboot_instance', { instance: { uuid: U }, reboot_type: 'SOFT' }],
      ['reboot_instance', { instance: { uuid: U }, reboot_type: 'HARD', block_device_info: null }],
      ['reboot_instance', { instance: { uuid: U }, reboot_type: 'HARD', block_device_info: { block_device_mapping: [] } }],
      ['start_instance', { instance: { uuid: U } }],
      ['stop_instance', { instance: { uuid: U } }],
      ['stop_instance', { instance: { uuid: U }, clean_shutdown: false }],
    ];
    for (const [method, args] of ok) expect(() => manager.validate(method, args)).not.toThrow();
  });
});

describe('ComputeManager: snapshots and backups', () => {
  it('snapshots an instance given as a nova object primitive', async () => {
    const { env, manager } = await setup();
    const uuid = randomUUID();
    await guestIn(env, 'running', uuid);
    const imageId = randomUUID();
    const instance = novaInstance(uuid.toUpperCase());
    const result = (await manager.call('snapshot_instance', { instance, image_id: imageId }, CTX)) as SnapshotResult;

    expect(result.image_id).toBe(imageId);
    expect(result.status).toBe('active');
    expect(result.strategy).toBe('suspend-create-resume-extract');
    const meta = await env.store.show(imageId);
    expect(meta.status).toBe('active');
    expect(meta.name).toBe('snapshot of web-1');
    expect(meta.owner).toBe('ctx-project');
    expect(meta.properties).toMatchObject({
      image_type: 'snapshot',
      instance_uuid: uuid,
      user_id: 'ctx-user',
      base_image_ref: 'c0ffee00-0000-4000-8000-000000000001',
    });
    expect(meta.properties.backup_type).toBeUndefined();
    expect((await env.store.verify(imageId)).ok).toBe(true);
    expect((await env.hv.info(uuid)).state).toBe('running');
    expect(env.hv.violations).toEqual([]);
  });

  it('snapshots an instance given as a plain {uuid}: name from the hypervisor, owner from the instance when the context has none', async () => {
    const { env, manager } = await setup();
    const uuid = randomUUID();
    await guestIn(env, 'shutoff', uuid);
    const imageId = randomUUID();
    const result = (await manager.call('snapshot_instance', { instance: { uuid }, image_id: imageId }, BARE_CTX)) as SnapshotResult;
    expect(result.status).toBe('active');
    const meta = await env.store.show(imageId);
    expect(meta.name).toBe('snapshot of guest-shutoff');
    expect(meta.owner).toBeNull();
    expect(meta.properties.user_id).toBeNull();
    expect(meta.properties.base_image_ref).toBeNull();

    const second = randomUUID();
    await manager.call('snapshot_instance', { instance: novaInstance(uuid, { image_ref: '' }), image_id: second }, BARE_CTX);
    const meta2 = await env.store.show(second);
    expect(meta2.owner).toBe('owner-project');
    expect(meta2.properties.user_id).toBe('owner-user');
    expect(meta2.properties.base_image_ref).toBeNull(); // volume-backed style empty image_ref
  });

  it('fails cleanly for an unknown instance', async () => {
    const { env, manager } = await setup();
    await expect(manager.call('snapshot_instance', { instance: novaInstance(randomUUID()), image_id: randomUUID() }, CTX)).rejects.toThrow(
      /not found/,
    );
    expect(env.hv.violations).toEqual([]);
  });

  it('backs up and rotates: the oldest active backups of the same instance and type beyond rotation go', async () => {
    const { env, manager } = await setup();
    const a = randomUUID();
    const b = randomUUID();
    await guestIn(env, 'running', a);
    const daily3 = await seedImage(env, { instanceUuid: a, imageType: 'backup', backupType: 'daily', createdAt: '2026-01-01T00:00:00Z' });
    const daily2 = await seedImage(env, { instanceUuid: a, imageType: 'backup', backupType: 'daily', createdAt: '2026-01-02T00:00:00Z' });
    const daily1 = await seedImage(env, { instanceUuid: a, imageType: 'backup', backupType: 'daily', createdAt: '2026-01-03T00:00:00Z' });
    const killed = await seedImage(env, { instanceUuid: a, imageType: 'backup', backupType: 'daily', createdAt: '2025-12-01T00:00:00Z', kill: true });
    const weekly = await seedImage(env, { instanceUuid: a, imageType: 'backup', backupType: 'weekly', createdAt: '2025-12-15T00:00:00Z' });
    const snap = await seedImage(env, { instanceUuid: a, imageType: 'snapshot', createdAt: '2025-11-01T00:00:00Z' });
    const otherVm = await seedImage(env, { instanceUuid: b, imageType: 'backup', backupType: 'daily', createdAt: '2025-10-01T00:00:00Z' });

    const imageId = randomUUID();
    const args = { instance: novaInstance(a), image_id: imageId, backup_type: 'daily', rotation: 2 };
    const result = (await manager.call('backup_instance', args, CTX)) as SnapshotResult;
    expect(result.status).toBe('active');
    const meta = await env.store.show(imageId);
    expect(meta.name).toBe('daily backup of web-1');
    expect(meta.properties).toMatchObject({ image_type: 'backup', backup_type: 'daily', instance_uuid: a });

    expect(await exists(env.store, imageId)).toBe(true);
    expect(await exists(env.store, daily1)).toBe(true);
    expect(await exists(env.store, daily2)).toBe(false);
    expect(await exists(env.store, daily3)).toBe(false);
    for (const untouched of [killed, weekly, snap, otherVm]) expect(await exists(env.store, untouched)).toBe(true);
  });

  it('keeps everything while there are no more backups than rotation', async () => {
    const { env, manager } = await setup();
    const a = randomUUID();
    await guestIn(env, 'paused', a);
    const old = await seedImage(env, { instanceUuid: a, imageType: 'backup', backupType: 'daily', createdAt: '2026-01-01T00:00:00Z' });
    const imageId = randomUUID();
    await manager.call('backup_instance', { instance: { uuid: a }, image_id: imageId, backup_type: 'daily', rotation: 5 }, CTX);
    expect(await exists(env.store, old)).toBe(true);
    expect(await exists(env.store, imageId)).toBe(true);
    expect((await env.hv.info(a)).state).toBe('paused');
  });

  it('rotation 0 keeps none, not even the new backup (nova semantics)', async () => {
    const { env, manager } = await setup();
    const a = randomUUID();
    await guestIn(env, 'running', a);
    const old = await seedImage(env, { instanceUuid: a, imageType: 'backup', backupType: 'weekly', createdAt: '2026-01-01T00:00:00Z' });
    const imageId = randomUUID();
    const result = (await manager.call('backup_instance', { instance: { uuid: a }, image_id: imageId, backup_type: 'weekly', rotation: 0 }, CTX)) as SnapshotResult;
    expect(result.status).toBe('active');
    expect(await exists(env.store, imageId)).toBe(false);
    expect(await exists(env.store, old)).toBe(false);
  });

  it('counts the new backup as the newest even within the same second', async () => {
    const { env, manager } = await setup();
    const a = randomUUID();
    await guestIn(env, 'running', a);
    const first = randomUUID();
    const second = randomUUID();
    const args = (id: string) => ({ instance: { uuid: a }, image_id: id, backup_type: 'hourly', rotation: 1 });
    await Promise.all([manager.call('backup_instance', args(first), CTX), manager.call('backup_instance', args(second), CTX)]);
    expect(await exists(env.store, second)).toBe(true);
    expect(await exists(env.store, first)).toBe(false);
  });

  it('a failed backup rotates nothing and leaves the old backups', async () => {
    const { env, manager } = await setup();
    const a = randomUUID();
    await guestIn(env, 'running', a);
    const old = await seedImage(env, { instanceUuid: a, imageType: 'backup', backupType: 'daily', createdAt: '2026-01-01T00:00:00Z' });
    env.hv.injectFault({ op: 'exportDisk' });
    const imageId = randomUUID();
    await expect(manager.call('backup_instance', { instance: { uuid: a }, image_id: imageId, backup_type: 'daily', rotation: 0 }, CTX)).rejects.toThrow(
      /injected fault/,
    );
    expect(await exists(env.store, old)).toBe(true);
    expect((await env.store.show(imageId)).status).toBe('killed');
    expect((await env.hv.info(a)).state).toBe('running');
  });
});

describe('ComputeManager: power operations', () => {
  it('SOFT reboot deletes nothing; HARD reboot restarts the process and runs deferred deletion', async () => {
    const { env, manager } = await setup({ strategy: 'deferred-delete' });
    const uuid = randomUUID();
    await guestIn(env, 'running', uuid);
    await manager.call('snapshot_instance', { instance: { uuid }, image_id: randomUUID() }, CTX);
    expect(await env.ownSnapshots(uuid)).toHaveLength(1);

    env.hv.calls.length = 0;
    expect(await manager.call('reboot_instance', { instance: { uuid }, reboot_type: 'SOFT', block_device_info: null }, CTX)).toBeNull();
    expect(env.hv.calls.map((c) => c.op)).toContain('softReboot');
    expect(env.hv.calls.map((c) => c.op)).not.toContain('start');
    expect(await env.ownSnapshots(uuid)).toHaveLength(1);
    expect((await env.hv.info(uuid)).state).toBe('running');

    expect(await manager.call('reboot_instance', { instance: novaInstance(uuid), reboot_type: 'HARD' }, CTX)).toBeNull();
    expect(await env.ownSnapshots(uuid)).toEqual([]);
    expect(await env.pending.list(uuid)).toEqual([]);
    expect((await env.hv.info(uuid)).state).toBe('running');
    expect(env.hv.violations).toEqual([]);
  });

  it('stops gracefully by default, forced with clean_shutdown false, and starts', async () => {
    const { env, manager } = await setup();
    const uuid = randomUUID();
    await guestIn(env, 'running', uuid);
    const stopCalls = () => env.hv.calls.filter((c) => c.op === 'stop').map((c) => c.args[1]);

    expect(await manager.call('stop_instance', { instance: { uuid } }, CTX)).toBeNull();
    expect((await env.hv.info(uuid)).state).toBe('shutoff');
    expect(await manager.call('start_instance', { instance: novaInstance(uuid) }, CTX)).toBeNull();
    expect((await env.hv.info(uuid)).state).toBe('running');
    await manager.call('stop_instance', { instance: { uuid }, clean_shutdown: false }, CTX);
    await manager.call('start_instance', { instance: { uuid } }, CTX);
    await manager.call('stop_instance', { instance: { uuid }, clean_shutdown: true }, CTX);
    expect(stopCalls()).toEqual([{ graceful: true }, { graceful: false }, { graceful: true }]);
  });

  it('passes the hypervisor error on for a state that does not allow the operation', async () => {
    const { env, manager } = await setup();
    const uuid = randomUUID();
    await guestIn(env, 'shutoff', uuid);
    await expect(manager.call('stop_instance', { instance: { uuid } }, CTX)).rejects.toThrow();
    // The failure does not block the instance's next operation.
    await expect(manager.call('start_instance', { instance: { uuid } }, CTX)).resolves.toBeNull();
  });
});

describe('ComputeManager: concurrency', () => {
  it("releases the instance once the data is exported: the instance's next operation runs while the image is hashed and committed", async () => {
    const held = gate();
    const reached = gate();
    const env = await makeFakeEnv({
      storeHook: async (point) => {
        if (point !== 'commit:renamed') return;
        reached.open();
        await held.promise;
      },
    });
    envs.push(env);
    const manager = new ComputeManager({ engine: env.engine, lifecycle: env.lifecycle, store: env.store, hv: env.hv, log: silentLogger(), maxConcurrentSnapshots: 5 });
    const uuid = randomUUID();
    await guestIn(env, 'running', uuid);
    const imageId = randomUUID();
    let snapshotDone = false;
    const snapshot = manager.call('snapshot_instance', { instance: { uuid }, image_id: imageId }, CTX).finally(() => (snapshotDone = true));
    await reached.promise;
    // The snapshot's commit is held: the same instance's stop runs and completes meanwhile.
    await expect(manager.call('stop_instance', { instance: { uuid } }, CTX)).resolves.toBeNull();
    expect(snapshotDone).toBe(false);
    expect((await env.store.show(imageId)).status).toBe('saving');
    expect((await env.hv.info(uuid)).state).toBe('shutoff');
    held.open();
    await expect(snapshot).resolves.toMatchObject({ image_id: imageId, status: 'active' });
    expect(env.hv.violations).toEqual([]);
  });

  it('keeps the per-instance order of 10 interleaved operations on 2 instances, one at a time per instance', async () => {
    const { env } = await setup({ strategy: 'deferred-delete' });
    const a = randomUUID();
    const b = randomUUID();
    await guestIn(env, 'running', a);
    await guestIn(env, 'running', b);
    const name = (uuid: string) => (uuid === a ? 'A' : 'B');
    const events: string[] = [];
    const traced = <A extends unknown[], R>(label: string, uuidOf: (...args: A) => string, fn: (...args: A) => Promise<R>) =>
      async (...args: A): Promise<R> => {
        const who = name(uuidOf(...args));
        events.push(`start ${who} ${label}`);
        await settle(); // give the other instance every chance to run meanwhile
        try {
          return await fn(...args);
        } finally {
          events.push(`end ${who} ${label}`);
        }
      };
    const lc = env.lifecycle;
    for (const m of ['start', 'stop', 'softReboot', 'hardReboot'] as const) {
      const orig = lc[m].bind(lc) as (uuid: string, ...rest: unknown[]) => Promise<void>;
      (lc as unknown as Record<string, unknown>)[m] = traced(m, (uuid: string) => uuid, orig);
    }
    const engine = { takeFromGuest: traced('take', (req: SnapshotRequest) => req.instanceUuid, (req: SnapshotRequest) => env.engine.takeFromGuest(req)) };
    const manager = new ComputeManager({ engine, lifecycle: lc, store: env.store, hv: env.hv, log: silentLogger(), maxConcurrentSnapshots: 5 });

    const ops: Array<[string, string, Record<string, unknown>]> = [
      [a, 'snapshot_instance', { image_id: randomUUID() }],
      [b, 'stop_instance', {}],
      [a, 'reboot_instance', { reboot_type: 'SOFT' }],
      [b, 'start_instance', {}],
      [a, 'stop_instance', { clean_shutdown: false }],
      [b, 'backup_instance', { image_id: randomUUID(), backup_type: 'daily', rotation: 1 }],
      [a, 'start_instance', {}],
      [b, 'reboot_instance', { reboot_type: 'HARD' }],
      [a, 'backup_instance', { image_id: randomUUID(), backup_type: 'daily', rotation: 3 }],
      [b, 'stop_instance', {}],
    ];
    const label: Record<string, string> = {
      snapshot_instance: 'take',
      backup_instance: 'take',
      stop_instance: 'stop',
      start_instance: 'start',
    };
    const results = await Promise.all(ops.map(([uuid, method, args]) => manager.call(method, { instance: { uuid }, ...args }, CTX)));
    expect(results.filter((r) => r === null)).toHaveLength(7);

    for (const who of ['A', 'B']) {
      const mine = events.filter((e) => e.split(' ')[1] === who);
      const expected = ops
        .filter(([uuid]) => name(uuid) === who)
        .flatMap(([, method, args]) => {
          const l = method === 'reboot_instance' ? (args.reboot_type === 'HARD' ? 'hardReboot' : 'softReboot') : label[method]!;
          return [`start ${who} ${l}`, `end ${who} ${l}`];
        });
      expect(mine).toEqual(expected); // in submission order, never two at once
    }
    // The two instances did run side by side.
    let inProgress = 0;
    let maxInProgress = 0;
    for (const e of events) {
      inProgress += e.startsWith('start') ? 1 : -1;
      maxInProgress = Math.max(maxInProgress, inProgress);
    }
    expect(maxInProgress).toBe(2);
    expect((await env.hv.info(a)).state).toBe('running');
    expect((await env.hv.info(b)).state).toBe('shutoff');
    expect(env.hv.violations).toEqual([]);
  });

  it('runs at most maxConcurrentSnapshots snapshots at once, in arrival order, without blocking other instances', async () => {
    const { env } = await setup();
    const uuids: string[] = Array.from({ length: 8 }, () => randomUUID());
    for (const u of uuids) await guestIn(env, 'running', u);
    const bystander = randomUUID();
    await guestIn(env, 'running', bystander);

    let running = 0;
    let maxRunning = 0;
    const started: string[] = [];
    const gates = new Map(uuids.map((u) => [u, gate()]));
    const engine = {
      // Running from the start of its guest part to the end of its finish (the slot covers both).
      takeFromGuest: async (req: SnapshotRequest) => {
        running += 1;
        maxRunning = Math.max(maxRunning, running);
        started.push(req.instanceUuid);
        try {
          await gates.get(req.instanceUuid)!.promise;
          const unfinished = await env.engine.takeFromGuest(req);
          return { finish: () => unfinished.finish().finally(() => (running -= 1)) };
        } catch (err) {
          running -= 1;
          throw err;
        }
      },
    };
    const manager = new ComputeManager({ engine, lifecycle: env.lifecycle, store: env.store, hv: env.hv, log: silentLogger(), maxConcurrentSnapshots: 3 });

    const snapshots = uuids.map((uuid) => manager.call('snapshot_instance', { instance: { uuid }, image_id: randomUUID() }, CTX));
    // Queued behind the waiting snapshot of its own instance.
    let rebootDone = false;
    const reboot = manager.call('reboot_instance', { instance: { uuid: uuids[6] }, reboot_type: 'SOFT' }, CTX).then(() => {
      rebootDone = true;
    });
    await settle();
    expect(started).toEqual(uuids.slice(0, 3));
    expect(manager.snapshotStats()).toEqual({ running: 3, waiting: 5, limit: 3 });

    // Another instance's power operation is not held up by the waiting snapshots.
    await manager.call('stop_instance', { instance: { uuid: bystander } }, CTX);
    expect((await env.hv.info(bystander)).state).toBe('shutoff');
    expect(started).toHaveLength(3);

    for (let i = 0; i < uuids.length; i++) {
      gates.get(uuids[i]!)!.open();
      await snapshots[i];
      await settle();
      expect(started).toEqual(uuids.slice(0, Math.min(i + 4, uuids.length)));
      expect(rebootDone).toBe(i >= 6);
    }
    await reboot;
    expect(maxRunning).toBe(3);
    expect(manager.snapshotStats()).toEqual({ running: 0, waiting: 0, limit: 3 });
    for (const s of snapshots) expect(((await s) as SnapshotResult).status).toBe('active');
    expect(env.hv.violations).toEqual([]);
  });
});

describe('ComputeManager: notifier', () => {
  function recorder() {
    const events: Array<{ kind: string; info: SnapshotInfo; extra?: unknown }> = [];
    const notifier: SnapshotNotifier = {
      snapshotStart: (info) => void events.push({ kind: 'start', info }),
      snapshotEnd: (info, result) => void events.push({ kind: 'end', info, extra: result }),
      snapshotError: (info, err) => void events.push({ kind: 'error', info, extra: err }),
    };
    return { events, notifier };
  }

  it('is told start then end, with the request details and the result', async () => {
    const { events, notifier } = recorder();
    const { env, manager } = await setup({ strategy: 'cold', deps: { notifier, defaultStrategy: 'cold' } });
    const uuid = randomUUID();
    await guestIn(env, 'running', uuid);
    const imageId = randomUUID();
    const instance = novaInstance(uuid);
    const result = await manager.call('backup_instance', { instance, image_id: imageId, backup_type: 'daily', rotation: 2 }, CTX);
    expect(events.map((e) => e.kind)).toEqual(['start', 'end']);
    expect(events[0]!.info).toEqual({
      instanceUuid: uuid,
      imageId,
      imageType: 'backup',
      backupType: 'daily',
      strategy: 'cold',
      requestId: 'req-3f1c',
      userId: 'ctx-user',
      projectId: 'ctx-project',
      instance,
    });
    expect(events[1]!.info).toEqual({ ...events[0]!.info, strategy: (result as SnapshotResult).strategy });
    expect(events[1]!.extra).toEqual(result);
  });

  it('is told start then error when the snapshot fails, and the error reaches the caller', async () => {
    const { events, notifier } = recorder();
    const { env, manager } = await setup({ deps: { notifier } });
    const uuid = randomUUID();
    await guestIn(env, 'running', uuid);
    env.hv.injectFault({ op: 'managedSave' });
    const call = manager.call('snapshot_instance', { instance: { uuid }, image_id: randomUUID() }, BARE_CTX);
    await expect(call).rejects.toThrow(/injected fault/);
    expect(events.map((e) => e.kind)).toEqual(['start', 'error']);
    expect(events[1]!.extra).toBe(await call.catch((e: unknown) => e));
    expect(events[1]!.info).toMatchObject({ instanceUuid: uuid, imageType: 'snapshot', requestId: 'req-bare', instance: { uuid } });
    expect(events[1]!.info.userId).toBeUndefined();
    expect((await env.hv.info(uuid)).state).toBe('running');
  });

  it('is not called for power operations, and a failing notifier does not fail the snapshot', async () => {
    const calls: string[] = [];
    const notifier: SnapshotNotifier = {
      snapshotStart: () => {
        calls.push('start');
        throw new Error('broker down');
      },
      snapshotEnd: async () => {
        calls.push('end');
        throw new Error('broker down');
      },
      snapshotError: () => void calls.push('error'),
    };
    const { env, manager } = await setup({ deps: { notifier } });
    const uuid = randomUUID();
    await guestIn(env, 'running', uuid);
    await manager.call('reboot_instance', { instance: { uuid }, reboot_type: 'SOFT' }, CTX);
    expect(calls).toEqual([]);
    const result = (await manager.call('snapshot_instance', { instance: { uuid }, image_id: randomUUID() }, CTX)) as SnapshotResult;
    expect(result.status).toBe('active');
    expect(calls).toEqual(['start', 'end']);
  });
});
