import { createHash, randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { rotateBackups } from '../../src/compute/backup-rotation.js';
import { ImageExists, ImageNotFound } from '../../src/errors.js';
import { GlanceAuthMissing, GlanceError, GlanceUnavailable, GlanceUploadMismatch } from '../../src/image-store/errors.js';
import { GlanceClient } from '../../src/image-store/glance/client.js';
import { GlanceImageStore } from '../../src/image-store/glance/store.js';
import type { StoreRequestAuth } from '../../src/image-store/image-store.js';
import { Secret } from '../../src/util/secret.js';
import { FakeGlance } from '../helpers/fake-glance.js';
import { captureLogger, type CapturedLine } from '../helpers/log-capture.js';

const TOKEN = 'gAAAAA-secret-token-0123456789abcdef';
const INSTANCE = '6f1c2ad4-97b1-4c39-9d2e-8d1f6c1b3a55';

let glance: FakeGlance;
let tmp: DirectoryResult;
let lines: CapturedLine[];
let log: ReturnType<typeof captureLogger>['log'];

beforeEach(async () => {
  glance = await FakeGlance.start();
  tmp = await dir({ unsafeCleanup: true });
  ({ log, lines } = captureLogger('debug'));
});

afterEach(async () => {
  await glance.stop();
  await tmp.cleanup();
});

function storeFor(o: { servers?: string[]; timeoutMs?: number; retries?: number; authStrategy?: 'keystone' | 'noauth' } = {}): GlanceImageStore {
  const client = new GlanceClient({
    apiServers: o.servers ?? [glance.url],
    timeoutMs: o.timeoutMs ?? 5000,
    retries: o.retries ?? 2,
    authStrategy: o.authStrategy ?? 'keystone',
    log,
    backoffMs: () => 0,
  });
  return new GlanceImageStore({ client, stagingPath: path.join(tmp.path, 'images'), reservedSpaceMb: 0, osHashAlgo: 'sha512', log });
}

const auth: StoreRequestAuth = { requestId: 'req-7d3c0b2e-5a86-4a43-9f7c-111111111111', authToken: new Secret(TOKEN), projectId: 'project-a', userId: 'user-a', roles: ['member'] };

/** Creates (adopts) the image, receives `data` into staging as an export would, returns the store view. */
async function staged(store: GlanceImageStore, id: string, data: Buffer) {
  const s = store.forRequest({ ...auth, log });
  await s.create({ id, name: 'snap', instanceUuid: INSTANCE, imageType: 'snapshot', userId: 'user-a', owner: 'project-a' });
  await s.markSaving(id);
  const incoming = await s.receive(id, data.length, log);
  await incoming.put(0, data);
  await incoming.finish();
  return { s, digests: incoming.digests() };
}

function sha512(b: Buffer): string {
  return createHash('sha512').update(b).digest('hex');
}

function noTokenAnywhere(err?: unknown): void {
  expect(JSON.stringify(lines)).not.toContain(TOKEN);
  if (err !== undefined) expect(String((err as Error).message)).not.toContain(TOKEN);
}

describe('Glance store on a fake Glance', () => {
  it("adopts nova-api's queued record, patches formats and properties, uploads and verifies", async () => {
    const id = randomUUID();
    glance.addQueued(id);
    const data = randomBytes(3 * 1024 * 1024 + 17);
    const store = storeFor();
    const { s, digests } = await staged(store, id, data);
    const image = await s.commit(id, { digests });
    expect(image).toMatchObject({ id, status: 'active', size: data.length, os_hash_algo: 'sha512', os_hash_value: sha512(data) });
    expect(glance.data.get(id)?.equals(data)).toBe(true);
    expect(glance.images.get(id)).toMatchObject({
      disk_format: 'raw',
      container_format: 'bare',
      image_type: 'snapshot',
      instance_uuid: INSTANCE,
      image_location: 'snapshot',
      image_state: 'available',
      owner_id: 'project-a',
      user_id: 'user-a',
    });
    const patch = glance.requests.find((r) => r.method === 'PATCH');
    expect(patch?.headers['content-type']).toBe('application/openstack-images-v2.1-json-patch');
    const put = glance.requests.find((r) => r.method === 'PUT');
    expect(put?.headers).toMatchObject({
      'content-type': 'application/octet-stream',
      'transfer-encoding': 'chunked',
      'x-auth-token': TOKEN,
      'x-openstack-request-id': auth.requestId,
      'x-project-id': 'project-a',
    });
    expect(glance.requests.every((r) => r.headers['x-auth-token'] === TOKEN && r.headers['x-openstack-request-id'] === auth.requestId)).toBe(true);
    expect(glance.requests.some((r) => r.method === 'POST')).toBe(false);
    await expect(fs.readdir(store.partialDir)).resolves.toEqual([]);
    noTokenAnywhere();
  });

  it('creates the record when none exists (the command line), then adopts it', async () => {
    const id = randomUUID();
    const store = storeFor({ authStrategy: 'noauth' });
    const meta = await store.forRequest({ requestId: 'req-1' }).create({ id, name: 'cli snap', instanceUuid: INSTANCE, imageType: 'backup', backupType: 'daily' });
    expect(meta).toMatchObject({ id, status: 'queued', name: 'cli snap' });
    expect(glance.images.get(id)).toMatchObject({ disk_format: 'raw', container_format: 'bare', image_type: 'backup', backup_type: 'daily' });
    expect(glance.requests.map((r) => r.method)).toEqual(['GET', 'POST', 'PATCH']);
    expect(glance.requests.every((r) => r.headers['x-auth-token'] === undefined)).toBe(true);
  });

  it('keystone without a token (a replay, a command) fails with GlanceAuthMissing before any request', async () => {
    const store = storeFor();
    const err = await store.show(randomUUID()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GlanceAuthMissing);
    expect((err as Error).message).toMatch(/auth_strategy = keystone and this operation has no token/);
    expect(glance.requests).toEqual([]);
  });

  it('refuses an image that is not queued; an active one is ImageExists and is never deleted by the failure', async () => {
    const id = randomUUID();
    glance.addQueued(id, { status: 'active', disk_format: 'raw', container_format: 'bare' });
    const s = storeFor().forRequest(auth);
    await expect(s.create({ id, name: 'x', instanceUuid: INSTANCE, imageType: 'snapshot' })).rejects.toBeInstanceOf(ImageExists);
    await s.kill(id, 'failed');
    expect(glance.images.get(id)?.status).toBe('active');
  });

  it('an early 413 ends the upload with its message, is not retried, and the failure deletes the image', async () => {
    const id = randomUUID();
    glance.addQueued(id);
    const data = randomBytes(4 * 1024 * 1024);
    const store = storeFor({ retries: 3 });
    const { s, digests } = await staged(store, id, data);
    glance.earlyAnswer = { status: 413, message: 'Image exceeds the storage quota: 1048576 bytes', times: 5 };
    const err = await s.commit(id, { digests }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GlanceError);
    expect((err as GlanceError).status).toBe(413);
    expect((err as Error).message).toMatch(/Glance answered HTTP 413: Image exceeds the storage quota/);
    expect(glance.requests.filter((r) => r.method === 'PUT')).toHaveLength(1);
    await fs.writeFile(s.partialPath(id), 'left over'); // what kill must remove too
    await s.kill(id, (err as Error).message);
    expect(glance.images.has(id)).toBe(false);
    await expect(fs.readdir(store.partialDir)).resolves.toEqual([]);
    noTokenAnywhere(err);
  });

  // Glance answers 409 to an upload that finds the image saving already, and 410 to one that read it
  // queued but lost the race to mark it saving (its update "from queued" matched no row).
  it.each([
    [409, 'Image status transition from saving to saving is not allowed'],
    [410, 'Image 1 could not be found after upload. The image may have been deleted during the upload, cleaning up the chunks uploaded.'],
  ])('a %i on the upload (another agent got there first) fails without deleting the image', async (status, message) => {
    const id = randomUUID();
    glance.addQueued(id);
    const store = storeFor();
    const { s, digests } = await staged(store, id, randomBytes(100_000));
    glance.earlyAnswer = { status, message, times: 1 };
    const err = await s.commit(id, { digests }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GlanceError);
    expect((err as Error).message).toContain(`HTTP ${status}: ${message} (another upload has the image, or it was deleted: it is left to that)`);
    expect(glance.requests.filter((r) => r.method === 'PUT')).toHaveLength(1);
    await s.kill(id, 'lost the race');
    expect(glance.images.has(id)).toBe(true);
    expect(glance.requests.filter((r) => r.method === 'DELETE')).toHaveLength(0);
  });

  it('a server that stops reading ends the upload within [glance] timeout, nothing staged left', async () => {
    const id = randomUUID();
    glance.addQueued(id);
    const data = randomBytes(32 * 1024 * 1024);
    const store = storeFor({ timeoutMs: 400, retries: 0 });
    const { s, digests } = await staged(store, id, data);
    glance.stopReadingAfter = 64 * 1024;
    const err = await s.commit(id, { digests }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GlanceUnavailable);
    expect((err as Error).message).toMatch(/Glance took no data for 0\.4 s after \d+ of 33554432 bytes/);
    await expect(fs.readdir(store.partialDir)).resolves.toEqual([]);
  });

  it('an upload cut half-way is tried again once the image is back in queued, and ends active', async () => {
    const id = randomUUID();
    glance.addQueued(id);
    const data = randomBytes(8 * 1024 * 1024);
    const store = storeFor({ retries: 2 });
    const { s, digests } = await staged(store, id, data);
    glance.cutAfter = 2 * 1024 * 1024;
    const image = await s.commit(id, { digests });
    expect(image).toMatchObject({ status: 'active', size: data.length, os_hash_value: sha512(data) });
    expect(glance.requests.filter((r) => r.method === 'PUT')).toHaveLength(2);
    expect(lines.some((l) => /upload failed .*back in queued/.test(String(l.msg)))).toBe(true);
  });

  it('a Glance whose hash is not that of the data exported fails the commit (GlanceUploadMismatch)', async () => {
    const id = randomUUID();
    glance.addQueued(id);
    const store = storeFor();
    const { s, digests } = await staged(store, id, randomBytes(50_000));
    glance.lieAboutHash = true;
    const err = await s.commit(id, { digests }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GlanceUploadMismatch);
    expect((err as Error).message).toMatch(/os_hash_value f{128} \(the data exported hashes to [0-9a-f]{128}\)/);
  });

  it('tries api_servers in order: an unreachable first one is passed over', async () => {
    const closed = await new Promise<number>((resolve) => {
      const srv = net.createServer();
      srv.listen(0, '127.0.0.1', () => {
        const { port } = srv.address() as net.AddressInfo;
        srv.close(() => resolve(port));
      });
    });
    const id = randomUUID();
    glance.addQueued(id);
    const data = randomBytes(10_000);
    const store = storeFor({ servers: [`http://127.0.0.1:${closed}`, glance.url], retries: 0 });
    const { s, digests } = await staged(store, id, data);
    await expect(s.commit(id, { digests })).resolves.toMatchObject({ status: 'active' });
  });

  it('no server at all: GlanceUnavailable after the bounded retries, naming the last failure', async () => {
    const url = glance.url;
    await glance.stop();
    const err = await storeFor({ servers: [url], retries: 1 }).forRequest(auth).show(randomUUID()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GlanceUnavailable);
    expect((err as Error).message).toMatch(/no Glance API server answered after 2 attempts \(last: http:\/\/127\.0\.0\.1:\d+: cannot connect \(ECONNREFUSED\)\)/);
    glance = await FakeGlance.start(); // for afterEach
  });

  it('verify downloads the data and re-hashes it; delete of a missing image is ImageNotFound', async () => {
    const id = randomUUID();
    glance.addQueued(id);
    const data = randomBytes(200_000);
    const store = storeFor();
    const { s, digests } = await staged(store, id, data);
    await s.commit(id, { digests });
    await expect(s.verify(id)).resolves.toMatchObject({ ok: true, size_ok: true, os_hash_value: sha512(data) });
    glance.data.set(id, Buffer.concat([data.subarray(1), Buffer.from([0])]));
    await expect(s.verify(id)).resolves.toMatchObject({ ok: false, size_ok: true });
    await s.delete(id);
    await expect(s.delete(id)).rejects.toBeInstanceOf(ImageNotFound);
  });

  it("backup rotation lists the instance's backups from Glance with property filters and deletes the oldest", async () => {
    const ids = [randomUUID(), randomUUID(), randomUUID()];
    ids.forEach((id, i) =>
      glance.addQueued(id, { status: 'active', image_type: 'backup', backup_type: 'daily', instance_uuid: INSTANCE, created_at: `2026-11-30T10:0${i}:00Z` }),
    );
    const other = randomUUID();
    glance.addQueued(other, { status: 'active', image_type: 'backup', backup_type: 'weekly', instance_uuid: INSTANCE, created_at: '2026-11-30T09:00:00Z' });
    const deleted = await rotateBackups(storeFor().forRequest(auth), { instanceUuid: INSTANCE, backupType: 'daily', rotation: 2, newImageId: ids[2] }, log);
    expect(deleted).toEqual([ids[0]]);
    expect([...glance.images.keys()].sort()).toEqual([ids[1], ids[2], other].sort());
    const list = glance.requests.find((r) => r.method === 'GET' && r.path.startsWith('/v2/images?'));
    const q = new URL(list!.path, 'http://x').searchParams;
    expect(Object.fromEntries(q)).toMatchObject({ instance_uuid: INSTANCE, image_type: 'backup', backup_type: 'daily', sort_key: 'created_at' });
  });
});
