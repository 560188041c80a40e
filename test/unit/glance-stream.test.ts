/**
 * Exports streamed straight into Glance (issue 15: no staging when the export can be run again):
 * the engine with the fake hypervisor and the fake Glance. monitor-snapshot's export-snapshot (and
 * the export-disk of a shut-off guest) stream; cold's export of a guest it stopped, and live's backup
 * job, stay staged.
 */
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { readdirSync, watch, type FSWatcher } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { StrategyName } from '../../src/config/schema.js';
import { InsufficientSpace } from '../../src/errors.js';
import { GlanceError, GlanceUnavailable, GlanceUploadMismatch } from '../../src/image-store/errors.js';
import { GlanceClient } from '../../src/image-store/glance/client.js';
import { GlanceImageStore } from '../../src/image-store/glance/store.js';
import type { StatfsFn } from '../../src/image-store/space.js';
import { SnapshotEngine, type SnapshotEngineDeps } from '../../src/snapshot/engine.js';
import { GuestWaits } from '../../src/util/guest-waits.js';
import { FakeGlance } from '../helpers/fake-glance.js';
import { guestIn, makeFakeEnv, PREFIX, snapshotFailure, type FakeEnv } from '../helpers/fake-env.js';
import { captureLogger, type CapturedLine } from '../helpers/log-capture.js';
import { holdAtStep } from '../helpers/hold-at-step.js';

const MiB = 1024 * 1024;

let glance: FakeGlance;
let e: FakeEnv;
let lines: CapturedLine[];
let log: ReturnType<typeof captureLogger>['log'];
let staging: string;
/** Every name that appeared in the staging folder (or its .partial) while a test ran. */
let appeared: string[];
let watchers: FSWatcher[];
/** What the fake Glance's PUT handler saw in the partial folder while it received data. */
let seenWhileUploading: string[][];

beforeEach(async () => {
  glance = await FakeGlance.start();
  e = await makeFakeEnv();
  ({ log, lines } = captureLogger('debug'));
  staging = path.join(e.tmp, 'staging');
  await fs.mkdir(staging, { recursive: true });
  appeared = [];
  watchers = [watch(staging, (_event, name) => appeared.push(String(name)))];
  seenWhileUploading = [];
  glance.onPutData = () => seenWhileUploading.push(partialNow());
});

afterEach(async () => {
  for (const w of watchers) w.close();
  await glance.stop();
  await e.cleanup();
});

function partialNow(): string[] {
  try {
    return readdirSync(path.join(staging, '.partial'));
  } catch {
    return []; // never made: nothing staged
  }
}

function engineFor(
  strategy: StrategyName,
  retries = 2,
  timeoutMs = 5000,
  statfs?: StatfsFn,
  more: Pick<SnapshotEngineDeps, 'guestWaits' | 'beforeStep'> = {},
): { engine: SnapshotEngine; store: GlanceImageStore } {
  const client = new GlanceClient({ apiServers: [glance.url], timeoutMs, retries, authStrategy: 'noauth', log, backoffMs: () => 0 });
  const store = new GlanceImageStore({ client, stagingPath: staging, reservedSpaceMb: 0, osHashAlgo: 'sha512', log, statfs });
  const engine = new SnapshotEngine({ hv: e.hv, store, lifecycle: e.lifecycle, operations: e.operations, log, namePrefix: PREFIX, defaultStrategy: strategy, ...more });
  return { engine, store };
}

/** A guest whose disk has random data in its first and third quarters and zeros elsewhere. */
async function guest(state: 'running' | 'shutoff', size = 8 * MiB): Promise<string> {
  const uuid = randomUUID();
  await guestIn(e, 'running', uuid, { present: false }, size);
  e.hv.guestWrite(uuid, 4096, randomBytes(MiB));
  e.hv.guestWrite(uuid, size / 2 + 512, randomBytes(MiB));
  if (state === 'shutoff') await e.hv.stop(uuid, { graceful: false });
  return uuid;
}

function digests(b: Buffer): { md5: string; sha512: string } {
  return { md5: createHash('md5').update(b).digest('hex'), sha512: createHash('sha512').update(b).digest('hex') };
}

function puts(): number {
  return glance.requests.filter((r) => r.method === 'PUT').length;
}


describe('exports streamed into Glance', () => {
  it('monitor-snapshot: the export goes straight into the PUT, lands active with its hashes (zero gaps included), nothing ever staged', async () => {
    const uuid = await guest('running');
    const imageId = randomUUID();
    glance.addQueued(imageId);
    const { engine } = engineFor('monitor-snapshot');
    const result = await engine.take({ requestId: `req-${imageId}`, instanceUuid: uuid, imageId });
    const data = glance.data.get(imageId)!;
    // The image is the snapshot as it was taken (the guest wrote on since); the gaps qemu-img skips were sent as zeros.
    expect(data.length).toBe(8 * MiB);
    expect(data.subarray(2 * MiB, 4 * MiB).every((b) => b === 0)).toBe(true);
    expect(e.hv.wasDiskState(uuid, data)).toBe(true);
    const { md5, sha512 } = digests(data);
    expect(result).toMatchObject({ status: 'active', size: 8 * MiB, checksum: md5, os_hash_value: sha512 });
    expect(glance.images.get(imageId)).toMatchObject({ status: 'active', checksum: md5, os_hash_value: sha512 });
    expect(puts()).toBe(1);
    expect(seenWhileUploading.length).toBeGreaterThan(0);
    expect(seenWhileUploading.flat()).toEqual([]);
    expect(appeared).toEqual([]);
    expect(lines.some((l) => l.msg === 'streaming the export into Glance (nothing staged)')).toBe(true);
    expect(lines.some((l) => l.msg === 'streamed image verified in Glance')).toBe(true);
    expect(e.hv.violations).toEqual([]);
  });

  it('a streamed export sends nothing while another guest of the host is down in its managed save, and goes on once it runs', async () => {
    const [a, b] = [await guest('running'), await guest('running')];
    const [aImage, bImage] = [randomUUID(), randomUUID()];
    glance.addQueued(aImage);
    glance.addQueued(bImage);
    const bHeld = holdAtStep('create-snapshot');
    const { engine } = engineFor('monitor-snapshot', 2, 5000, undefined, { guestWaits: new GuestWaits(3_600_000), beforeStep: bHeld.hook });
    const bDone = engine.take({ requestId: 'req-b', instanceUuid: b, imageId: bImage, strategy: 'suspend-create-resume-extract' });
    await bHeld.reached;
    let aSettled = false;
    const aDone = engine.take({ requestId: 'req-a', instanceUuid: a, imageId: aImage }).finally(() => (aSettled = true));
    await new Promise((r) => setTimeout(r, 300));
    expect(aSettled).toBe(false);
    expect(seenWhileUploading).toEqual([]); // no PUT has had any data (B's export has not begun)
    bHeld.release();
    await expect(bDone).resolves.toMatchObject({ status: 'active' });
    const result = await aDone;
    const data = glance.data.get(aImage)!;
    expect(result).toMatchObject({ status: 'active', os_hash_value: digests(data).sha512 });
    expect(e.hv.wasDiskState(a, data)).toBe(true);
    expect(lines.filter((l) => l.msg === 'the export held back while other guests of this host waited on their snapshots' && l.request_id === 'req-a')).toHaveLength(1);
    expect(appeared).toEqual([]);
  });

  it("a shut-off guest's export-disk (cold, no guest waits) streams too", async () => {
    const uuid = await guest('shutoff', 4 * MiB);
    const imageId = randomUUID();
    glance.addQueued(imageId);
    const result = await engineFor('cold').engine.take({ requestId: 'req-cold-off', instanceUuid: uuid, imageId });
    expect(result.os_hash_value).toBe(digests(e.hv.diskContent(uuid)).sha512);
    expect(seenWhileUploading.flat()).toEqual([]);
    expect(appeared).toEqual([]);
  });

  it('a host with no room to stage: the streamed export goes ahead, a staged one (cold of a running guest) is refused before anything is touched', async () => {
    const full: StatfsFn = async () => ({ bavail: 0, bsize: 4096 });
    const uuid = await guest('running', 4 * MiB);
    const streamedId = randomUUID();
    glance.addQueued(streamedId);
    await expect(engineFor('monitor-snapshot', 2, 5000, full).engine.take({ requestId: 'req-full-1', instanceUuid: uuid, imageId: streamedId })).resolves.toMatchObject({ status: 'active' });
    const stagedId = randomUUID();
    glance.addQueued(stagedId);
    const before = e.hv.calls.length;
    const err = await engineFor('cold', 2, 5000, full).engine.take({ requestId: 'req-full-2', instanceUuid: uuid, imageId: stagedId }).catch((x: unknown) => x);
    expect(err).toBeInstanceOf(InsufficientSpace);
    expect((err as Error).message).toMatch(/staged before its upload to Glance/);
    expect(e.hv.calls.slice(before).map((c) => c.op)).not.toContain('managedSave');
    expect(glance.images.get(stagedId)?.status).toBe('queued');
    expect((await e.hv.info(uuid)).state).toBe('running');
  });

  it('an early 413 fails the snapshot naming Glance, deletes the image, not retried; the guest runs on', async () => {
    const uuid = await guest('running');
    const imageId = randomUUID();
    glance.addQueued(imageId);
    glance.earlyAnswer = { status: 413, message: 'Image exceeds the storage quota: 1048576 bytes', times: 5 };
    const err = await snapshotFailure(engineFor('monitor-snapshot', 3).engine.take({ requestId: 'req-413', instanceUuid: uuid, imageId }));
    expect(err.message).toMatch(/step 4 \(export-snapshot\) failed: cannot upload image .* to Glance: Glance answered HTTP 413: Image exceeds the storage quota/);
    expect(err.cause).toBeInstanceOf(GlanceError);
    expect(puts()).toBe(1);
    expect(e.hv.callCount('exportDisk', uuid)).toBe(1);
    expect(glance.images.has(imageId)).toBe(false);
    expect((await e.hv.info(uuid)).state).toBe('running');
    expect(await e.ownSnapshots(uuid)).toEqual([]);
    expect(appeared).toEqual([]);
  });

  it('a cut mid-stream with the image back in queued runs the export again into a new PUT, and ends active', async () => {
    const uuid = await guest('running');
    const imageId = randomUUID();
    glance.addQueued(imageId);
    glance.cutAfter = MiB;
    const result = await engineFor('monitor-snapshot', 2).engine.take({ requestId: 'req-cut', instanceUuid: uuid, imageId });
    const data = glance.data.get(imageId)!;
    expect(result).toMatchObject({ status: 'active', os_hash_value: digests(data).sha512 });
    expect(puts()).toBe(2);
    expect(e.hv.callCount('exportDisk', uuid)).toBe(2);
    const retry = lines.filter((l) => /streamed upload failed .*back in queued: the export is run again/.test(String(l.msg)));
    expect(retry).toHaveLength(1);
    expect(retry[0]).toMatchObject({ request_id: 'req-cut', instance_uuid: uuid, attempt: 1 });
    expect(lines.some((l) => l.msg === 'streamed upload cut: running the export again into a new upload')).toBe(true);
    expect(appeared).toEqual([]);
    expect(await e.ownSnapshots(uuid)).toEqual([]);
  });

  it('a 503 on the streamed PUT (the image still queued) runs the export again, and ends active', async () => {
    const uuid = await guest('running', 4 * MiB);
    const imageId = randomUUID();
    glance.addQueued(imageId);
    glance.earlyAnswer = { status: 503, message: 'Service Unavailable', times: 1 };
    const result = await engineFor('monitor-snapshot', 2).engine.take({ requestId: 'req-503', instanceUuid: uuid, imageId });
    expect(result).toMatchObject({ status: 'active', os_hash_value: digests(glance.data.get(imageId)!).sha512 });
    expect(puts()).toBe(2);
    expect(e.hv.callCount('exportDisk', uuid)).toBe(2);
    expect(lines.some((l) => /streamed upload failed \(Glance answered HTTP 503: Service Unavailable\)/.test(String(l.msg)))).toBe(true);
  });

  it('an export that fails on its own (its data all sent, the PUT not ended): not run again, the upload dropped, the image deleted', async () => {
    const uuid = await guest('running');
    const imageId = randomUUID();
    glance.addQueued(imageId);
    e.hv.injectFault({ op: 'exportDisk', uuid, when: 'after', error: new Error('qemu-img convert failed: Input/output error') });
    const err = await snapshotFailure(engineFor('monitor-snapshot', 3).engine.take({ requestId: 'req-own', instanceUuid: uuid, imageId }));
    expect(err.message).toMatch(/step 4 \(export-snapshot\) failed: qemu-img convert failed: Input\/output error/);
    expect(e.hv.callCount('exportDisk', uuid)).toBe(1);
    expect(puts()).toBe(1);
    // Glance saw the upload cut (never completed) before the failed snapshot deleted the image.
    expect(glance.statusAtDelete.get(imageId)).not.toBe('active');
    expect(glance.images.has(imageId)).toBe(false);
    expect(await e.ownSnapshots(uuid)).toEqual([]);
  });

  it('cut every time: a clear error once [glance] retries are spent, the image deleted', async () => {
    const uuid = await guest('running');
    const imageId = randomUUID();
    glance.addQueued(imageId);
    glance.cutAfter = MiB;
    glance.cutTimes = 5;
    const err = await snapshotFailure(engineFor('monitor-snapshot', 1).engine.take({ requestId: 'req-cut2', instanceUuid: uuid, imageId }));
    expect(err.cause).toBeInstanceOf(GlanceUnavailable);
    expect(err.message).toMatch(/step 4 \(export-snapshot\) failed: cannot upload image .* to Glance: .* \(2 attempts\)/);
    expect(puts()).toBe(2);
    expect(e.hv.callCount('exportDisk', uuid)).toBe(2);
    expect(glance.images.has(imageId)).toBe(false);
    expect((await e.hv.info(uuid)).state).toBe('running');
  });

  it.each([409, 410])('a %i (another upload has the image) is not retried and the image is not deleted', async (status) => {
    const uuid = await guest('running');
    const imageId = randomUUID();
    glance.addQueued(imageId);
    glance.earlyAnswer = { status, message: 'Image status transition from saving to saving is not allowed', times: 5 };
    const err = await snapshotFailure(engineFor('monitor-snapshot', 3).engine.take({ requestId: `req-${status}`, instanceUuid: uuid, imageId }));
    expect(err.message).toContain(`HTTP ${status}`);
    expect(err.message).toContain('another upload has the image');
    expect(puts()).toBe(1);
    expect(e.hv.callCount('exportDisk', uuid)).toBe(1);
    expect(glance.images.has(imageId)).toBe(true);
    expect(glance.requests.filter((r) => r.method === 'DELETE')).toHaveLength(0);
  });

  it('Glance made it active, then a later step fails: the image is deleted (the snapshot failed), not left behind', async () => {
    const uuid = await guest('running');
    const imageId = randomUUID();
    glance.addQueued(imageId);
    e.hv.injectFault({ op: 'liveSnapshotDelete', uuid });
    const err = await snapshotFailure(engineFor('monitor-snapshot').engine.take({ requestId: 'req-late', instanceUuid: uuid, imageId }));
    expect(err.message).toMatch(/step 5 \(delete-snapshot\) failed/);
    expect(glance.statusAtDelete.get(imageId)).toBe('active');
    expect(puts()).toBe(1);
    expect(glance.requests.filter((r) => r.method === 'DELETE')).toHaveLength(1);
    expect(glance.images.has(imageId)).toBe(false);
    expect((await e.hv.info(uuid)).state).toBe('running');
  });

  it("Glance's hash not the export's: the commit fails (GlanceUploadMismatch) and the image is deleted", async () => {
    const uuid = await guest('running', 4 * MiB);
    const imageId = randomUUID();
    glance.addQueued(imageId);
    glance.lieAboutHash = true;
    const err = await snapshotFailure(engineFor('monitor-snapshot').engine.take({ requestId: 'req-lie', instanceUuid: uuid, imageId }));
    expect(err.cause).toBeInstanceOf(GlanceUploadMismatch);
    expect(err.message).toMatch(/os_hash_value f{128} \(the data exported hashes to [0-9a-f]{128}\)/);
    expect(glance.images.has(imageId)).toBe(false);
  });

  it('backpressure: a Glance that stops reading holds the export back (its write waits) until [glance] timeout ends it', async () => {
    const imageId = randomUUID();
    glance.addQueued(imageId);
    const { store } = engineFor('monitor-snapshot', 0, 400);
    const s = store.forRequest({ requestId: 'req-bp', log });
    await s.create({ id: imageId, name: 'bp', instanceUuid: randomUUID(), imageType: 'snapshot' });
    glance.stopReadingAfter = 64 * 1024;
    const sink = await s.receive(imageId, 32 * MiB, log, { streamable: true });
    expect(sink.streamed).toBe(true);
    // One write of the whole image: it resolves only once the body has taken it, which a stalled Glance never does.
    const err = await sink.put(0, randomBytes(32 * MiB)).catch((x: unknown) => x);
    expect(err).toBeInstanceOf(GlanceUnavailable);
    expect((err as Error).message).toMatch(/Glance took no data for 0\.4 s after \d+ of 33554432 bytes/);
    expect(await sink.abort(new Error('qemu-img failed'))).toBe(err);
    expect(appeared).toEqual([]);
  });
});

describe('exports a guest waits for, and backup jobs, stay staged', () => {
  it.each(['cold', 'live'] as const)('%s on a running guest: the data is staged, then uploaded by the commit', async (strategy) => {
    const uuid = await guest('running', 4 * MiB);
    const imageId = randomUUID();
    glance.addQueued(imageId);
    const result = await engineFor(strategy).engine.take({ requestId: `req-${strategy}`, instanceUuid: uuid, imageId });
    expect(result).toMatchObject({ status: 'active', os_hash_value: digests(glance.data.get(imageId)!).sha512 });
    // The staged file was there while Glance received it, and is gone now.
    expect(seenWhileUploading.length).toBeGreaterThan(0);
    expect(seenWhileUploading.every((names) => names.length === 1 && names[0] === imageId)).toBe(true);
    expect(appeared).toContain('.partial');
    expect(partialNow()).toEqual([]);
    expect(lines.some((l) => l.msg === 'image uploaded to Glance and verified')).toBe(true);
    expect((await e.hv.info(uuid)).state).toBe('running');
  });
});
