/**
 * SPEC §9's metrics, each moved by exactly what happened: the RPC server on the in-memory bus, the
 * compute manager, the snapshot engine and the image store over the fake hypervisor, recording into
 * one AgentMetrics, read back as Prometheus text (parsed strictly) before and after each event.
 */
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { dir } from 'tmp-promise';
import { afterEach, describe, expect, it } from 'vitest';
import { FileJournal } from '../../src/compute/journal.js';
import { ComputeManager } from '../../src/compute/manager.js';
import { SERVED_METHODS } from '../../src/compute/rpc-args.js';
import { STRATEGIES, type StrategyName } from '../../src/config/schema.js';
import { FakeHypervisor } from '../../src/hypervisor/fake/fake-hypervisor.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { silentLogger } from '../../src/log.js';
import { encodeEnvelope } from '../../src/messaging/envelope.js';
import { AgentMetrics, METRIC_NAMES, SECONDS_BUCKETS } from '../../src/metrics/agent-metrics.js';
import { SnapshotEngine } from '../../src/snapshot/engine.js';
import { Lifecycle } from '../../src/snapshot/lifecycle.js';
import { OperationJournal } from '../../src/snapshot/operation-journal.js';
import { PendingSnapshots } from '../../src/snapshot/pending.js';
import { recoverOperations } from '../../src/snapshot/recovery.js';
import { STRATEGY_STEPS } from '../../src/snapshot/strategies.js';
import { PREFIX } from '../helpers/fake-env.js';
import { diffSamples, parseExposition, seriesKey } from '../helpers/prom-text.js';
import { RemoteFailure } from '../helpers/rpc-client.js';
import { serveOnMemoryBus } from '../helpers/memory-rpc.js';

const HOST = 'metrics-host';
/** What the fake reports as the I/O hold of a snapshot created through the monitor: the downtime. */
const IO_HELD_MS = 7;
const DISK_BYTES = 64 * 1024;
/** The store's filesystem, as its (injected) statfs says. */
const STATFS = { bavail: 250_000, bsize: 4096 };

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});

async function setup(o: { strategy?: StrategyName; maxConcurrent?: number } = {}) {
  const strategy = o.strategy ?? 'monitor-snapshot';
  const tmp = await dir({ unsafeCleanup: true });
  cleanups.push(() => tmp.cleanup());
  const log = silentLogger();
  const hv = new FakeHypervisor({ liveSnapshotIoHeldMs: IO_HELD_MS });
  const store = new ImageStore({
    path: path.join(tmp.path, 'images'),
    reservedSpaceMb: 0,
    osHashAlgo: 'sha512',
    lockAcrossProcesses: false,
    statfs: async () => STATFS,
  });
  const pending = new PendingSnapshots(path.join(tmp.path, 'state', 'pending'));
  const lifecycle = new Lifecycle(hv, pending, log);
  const operations = new OperationJournal(path.join(tmp.path, 'state', 'operations'), log);
  const metrics = new AgentMetrics({
    strategies: STRATEGIES,
    rpcMethods: SERVED_METHODS,
    imageStoreFreeBytes: () => store.freeBytes(),
    pendingInternalSnapshots: () => pending.count(),
  });
  const engine = new SnapshotEngine({ hv, store, lifecycle, operations, log, namePrefix: PREFIX, defaultStrategy: strategy });
  const manager = new ComputeManager({ engine, lifecycle, store, hv, log, maxConcurrentSnapshots: o.maxConcurrent ?? 5, defaultStrategy: strategy, metrics });
  const journal = await new FileJournal({ dir: path.join(tmp.path, 'state', 'journal'), log }).open();
  const { server, client } = await serveOnMemoryBus({ target: manager, journal, host: HOST, log, metrics }, cleanups);
  const guest = async (): Promise<string> => {
    const uuid = randomUUID();
    await hv.createInstance({ uuid, name: `g-${uuid.slice(0, 4)}`, memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: DISK_BYTES });
    await hv.start(uuid);
    return uuid;
  };
  /** Every series of the exposition, parsed strictly. */
  const scrape = async () => parseExposition(await metrics.text()).samples;
  return { tmp: tmp.path, hv, store, pending, operations, lifecycle, metrics, server, client, guest, scrape, log };
}

const ours = (key: string) => key.startsWith('snapshot_driver_');

/** Nothing in progress and nothing waiting for its turn. */
function expectIdle(samples: Map<string, number>): void {
  expect(samples.get(seriesKey(METRIC_NAMES.inProgress))).toBe(0);
  expect(samples.get(seriesKey(METRIC_NAMES.waiting))).toBe(0);
}
const key = seriesKey;
const n = METRIC_NAMES;

/** A histogram's series after one observation of `seconds` (cumulative buckets). */
function oneObservation(name: string, strategy: string, seconds: number): Record<string, number> {
  const out: Record<string, number> = {};
  for (const le of [...SECONDS_BUCKETS.map(String), '+Inf']) {
    if (le === '+Inf' || Number(le) >= seconds) out[key(`${name}_bucket`, { le, strategy })] = 1;
  }
  if (seconds !== 0) out[key(`${name}_sum`, { strategy })] = seconds; // a sum that did not move is no change
  out[key(`${name}_count`, { strategy })] = 1;
  return out;
}

/** The duration histogram's buckets and sum depend on the machine's speed: left out of exact diffs. */
const notDurationTiming = (k: string) => ours(k) && !k.startsWith(`${n.duration}_bucket`) && !k.startsWith(`${n.duration}_sum`);

/** Polls `test` (no timed assertion: a generous bound against a hang). */
async function until(what: string, test: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (!(await test())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await sleep(2);
  }
}

function gate() {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

describe('metrics: snapshots, RPC requests and operations', () => {
  it('a successful snapshot: one success, its downtime and duration observed, its bytes, one RPC success; gauges back to 0', async () => {
    const s = await setup();
    const uuid = await s.guest();
    const before = await s.scrape();
    const imageId = randomUUID();
    const result = (await s.client.call('snapshot_instance', { instance: { uuid }, image_id: imageId })) as { downtime_ms: number; duration_ms: number; size: number };
    expect(result).toMatchObject({ downtime_ms: IO_HELD_MS, size: DISK_BYTES });
    const after = await s.scrape();

    expect(diffSamples(before, after, notDurationTiming)).toEqual({
      [key(n.snapshots, { strategy: 'monitor-snapshot', result: 'success' })]: 1,
      ...oneObservation(n.downtime, 'monitor-snapshot', IO_HELD_MS / 1000),
      [key(`${n.duration}_count`, { strategy: 'monitor-snapshot' })]: 1,
      [key(n.exportedBytes)]: DISK_BYTES,
      [key(n.rpcRequests, { method: 'snapshot_instance', result: 'success' })]: 1,
    });
    // The duration as the result reports it, in the bucket that holds it.
    const durationS = result.duration_ms / 1000;
    expect(diffSamples(before, after, (k) => k.startsWith(`${n.duration}_`))).toEqual(oneObservation(n.duration, 'monitor-snapshot', durationS));
    expectIdle(after);
    expect(after.get(key(n.storeFreeBytes))).toBe(STATFS.bavail * STATFS.bsize);
    expect(after.get(key(n.pending))).toBe(0);
  });

  it('a snapshot of a guest that does not exist: one failure of the configured strategy, one RPC failure, nothing else', async () => {
    const s = await setup();
    const before = await s.scrape();
    const missing = randomUUID();
    await expect(s.client.call('snapshot_instance', { instance: { uuid: missing }, image_id: randomUUID() })).rejects.toMatchObject({
      failure: { class: 'InstanceNotFound' },
    });
    // The same through a nova primitive (its display name spares the manager its own lookup: the engine's fails).
    const primitive = { 'nova_object.name': 'Instance', 'nova_object.data': { uuid: missing, display_name: 'gone' } };
    await expect(s.client.call('snapshot_instance', { instance: primitive, image_id: randomUUID() })).rejects.toBeInstanceOf(RemoteFailure);
    const after = await s.scrape();
    expect(diffSamples(before, after, ours)).toEqual({
      [key(n.snapshots, { strategy: 'monitor-snapshot', result: 'failure' })]: 2,
      [key(n.rpcRequests, { method: 'snapshot_instance', result: 'failure' })]: 2,
    });
    expectIdle(after);
  });

  it('malformed, unknown, incompatible, invalid and duplicate requests count as refused; a made-up method adds no series', async () => {
    const s = await setup();
    const uuid = await s.guest();
    const before = await s.scrape();
    await s.client.sendRaw(Buffer.from('{"method": "snapshot_instance", '));
    await s.client.sendRaw(encodeEnvelope({ method: ['not', 'a', 'string'], args: {} }));
    await expect(s.client.call('resize_instance', { instance: { uuid } })).rejects.toMatchObject({ failure: { class: 'NoSuchMethod' } });
    await expect(s.client.call(`resize_${'x'.repeat(300)}`, { instance: { uuid } })).rejects.toBeInstanceOf(RemoteFailure);
    await expect(s.client.call('_private', { instance: { uuid } })).rejects.toMatchObject({ failure: { class: 'NoSuchMethod' } });
    await expect(s.client.call('start_instance', { instance: { uuid } }, { version: '7.0' })).rejects.toMatchObject({ failure: { class: 'UnsupportedVersion' } });
    await expect(s.client.call('snapshot_instance', { instance: { uuid }, image_id: '../etc' })).rejects.toMatchObject({ failure: { class: 'InvalidArgument' } });
    // A cast sent twice: carried out once, the second dropped as a duplicate.
    const uniqueId = await s.client.cast('stop_instance', { instance: { uuid } });
    await s.client.cast('stop_instance', { instance: { uuid } }, { uniqueId });
    // Intake is in order, and one instance's operations run in order: once this call is answered,
    // everything before it has been taken in, and the cast has run.
    await expect(s.client.call('start_instance', { instance: { uuid } })).resolves.toBeNull();
    const after = await s.scrape();
    expect(diffSamples(before, after, ours)).toEqual({
      [key(n.rpcRequests, { method: 'unknown', result: 'refused' })]: 5,
      [key(n.rpcRequests, { method: 'start_instance', result: 'refused' })]: 1,
      [key(n.rpcRequests, { method: 'stop_instance', result: 'refused' })]: 1,
      [key(n.rpcRequests, { method: 'snapshot_instance', result: 'refused' })]: 1,
      [key(n.rpcRequests, { method: 'stop_instance', result: 'success' })]: 1,
      [key(n.rpcRequests, { method: 'start_instance', result: 'success' })]: 1,
    });
    expectIdle(after);
  });

  it('two snapshots of one instance: one in progress and one waiting in its line, then both done and the gauges at 0', async () => {
    const s = await setup();
    const uuid = await s.guest();
    const hold = gate();
    s.hv.holdCall({ op: 'liveSnapshotCreate', uuid, until: hold.promise });
    const before = await s.scrape();
    const first = s.client.call('snapshot_instance', { instance: { uuid }, image_id: randomUUID() });
    const second = s.client.call('snapshot_instance', { instance: { uuid }, image_id: randomUUID() });
    await until('the second waits behind the first', async () => {
      const now = await s.scrape();
      return now.get(key(n.waiting)) === 1 && s.hv.callCount('liveSnapshotCreate', uuid) === 1;
    });
    const held = await s.scrape();
    expect(held.get(key(n.inProgress))).toBe(1);
    expect(held.get(key(n.waiting))).toBe(1);
    hold.open();
    await Promise.all([first, second]);
    const after = await s.scrape();
    expectIdle(after);
    expect(diffSamples(before, after, (k) => k.startsWith(n.snapshots) || k.startsWith(n.rpcRequests))).toEqual({
      [key(n.snapshots, { strategy: 'monitor-snapshot', result: 'success' })]: 2,
      [key(n.rpcRequests, { method: 'snapshot_instance', result: 'success' })]: 2,
    });
  });

  it('a snapshot waiting for a slot (max_concurrent_snapshots = 1) counts as waiting, not in progress', async () => {
    const s = await setup({ maxConcurrent: 1 });
    const [a, b] = [await s.guest(), await s.guest()];
    const hold = gate();
    s.hv.holdCall({ op: 'liveSnapshotCreate', uuid: a, until: hold.promise });
    const first = s.client.call('snapshot_instance', { instance: { uuid: a }, image_id: randomUUID() });
    await until("the first holds the slot", async () => s.hv.callCount('liveSnapshotCreate', a) === 1);
    const second = s.client.call('snapshot_instance', { instance: { uuid: b }, image_id: randomUUID() });
    await until('the second waits for the slot', async () => (await s.scrape()).get(key(n.waiting)) === 1);
    const held = await s.scrape();
    expect(held.get(key(n.inProgress))).toBe(1);
    expect(held.get(key(n.waiting))).toBe(1);
    hold.open();
    await Promise.all([first, second]);
    const after = await s.scrape();
    expectIdle(after);
  });

  it('deferred-delete: the pending internal snapshot is counted, and no more once a hard reboot deleted it', async () => {
    const s = await setup({ strategy: 'deferred-delete' });
    const uuid = await s.guest();
    const before = await s.scrape();
    await s.client.call('snapshot_instance', { instance: { uuid }, image_id: randomUUID() });
    const kept = await s.scrape();
    expect(diffSamples(before, kept, (k) => k === key(n.pending))).toEqual({ [key(n.pending)]: 1 });
    expect(await s.pending.list(uuid)).toHaveLength(1);
    await s.client.call('reboot_instance', { instance: { uuid }, reboot_type: 'HARD' });
    expect((await s.scrape()).get(key(n.pending))).toBe(0);
  });

  it('a gauge that cannot be read at a scrape is NaN, and the scrape still answers', async () => {
    const failing = new AgentMetrics({ imageStoreFreeBytes: async () => Promise.reject(new Error('EIO')), pendingInternalSnapshots: async () => 3 });
    const samples = parseExposition(await failing.text()).samples;
    expect(samples.get(key(n.storeFreeBytes))).toBeNaN();
    expect(samples.get(key(n.pending))).toBe(3);
  });
});

describe('metrics: recovered operations', () => {
  it('counts each recovered operation by its outcome: discarded, killed, failed', async () => {
    const s = await setup({ strategy: 'suspend-create-resume-extract' });
    const strategy = 'suspend-create-resume-extract';
    const steps = STRATEGY_STEPS[strategy].map((x) => x.name);
    const record = async (uuid: string, begun: boolean) => {
      const imageId = randomUUID();
      const op = await s.operations.begin({ image_id: imageId, instance_uuid: uuid, request_id: `req-${imageId}`, strategy, snapshot_name: `${PREFIX}${imageId}`, prior_state: 'running', steps });
      await s.store.create({ id: imageId, name: 'interrupted', instanceUuid: uuid, imageType: 'snapshot' });
      if (begun) await op.step(0, 'run');
    };
    const [a, b, c] = [await s.guest(), await s.guest(), await s.guest()];
    await record(a, false); // no step begun: forgotten, so that its request is carried out again
    await record(b, true); // a step begun: its image killed
    await record(c, true);
    s.hv.injectFault({ op: 'endInterruptedWork', uuid: c }); // cannot be put right now: failed, kept
    const before = await s.scrape();
    const recovered = await recoverOperations({
      hv: s.hv,
      store: s.store,
      lifecycle: s.lifecycle,
      pending: s.pending,
      operations: s.operations,
      log: s.log,
      namePrefix: PREFIX,
      strategy,
      agentTimeoutMs: 1000,
      ownerRunning: async () => false,
      metrics: s.metrics,
    });
    expect(recovered.map((r) => r.error === undefined ? r.image : 'failed').sort()).toEqual(['discarded', 'failed', 'killed']);
    expect(diffSamples(before, await s.scrape(), ours)).toEqual({
      [key(n.recovered, { outcome: 'discarded' })]: 1,
      [key(n.recovered, { outcome: 'killed' })]: 1,
      [key(n.recovered, { outcome: 'failed' })]: 1,
    });
  });
});
