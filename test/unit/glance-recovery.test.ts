import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GlanceClient } from '../../src/image-store/glance/client.js';
import { GlanceImageStore } from '../../src/image-store/glance/store.js';
import { silentLogger } from '../../src/log.js';
import { SnapshotEngine } from '../../src/snapshot/engine.js';
import { recoverOperations, sweepStore, type RecoveryDeps } from '../../src/snapshot/recovery.js';
import { FakeGlance } from '../helpers/fake-glance.js';
import { fakeRecoveryDeps, guestIn, makeFakeEnv, PREFIX, type FakeEnv } from '../helpers/fake-env.js';

/**
 * Crash recovery of a snapshot that died while uploading to Glance: the operation hangs in its
 * upload (a Glance that stopped reading; monitor-snapshot streams the export, so that is inside its
 * export step), or after it (Glance has the image active, a later step never ends), and recovery
 * runs as a new agent would (a new store, no token: tokens are never journaled).
 */

let glance: FakeGlance;
let e: FakeEnv;
/** The hung snapshot: it ends (fails) once the fake Glance is stopped, before the env is removed. */
let hung: Promise<unknown> | undefined;

beforeEach(async () => {
  glance = await FakeGlance.start();
  e = await makeFakeEnv({ strategy: 'monitor-snapshot' });
});

afterEach(async () => {
  await glance.stop();
  await hung;
  hung = undefined;
  await e.cleanup();
});

function glanceStore(authStrategy: 'keystone' | 'noauth'): GlanceImageStore {
  const log = silentLogger();
  const client = new GlanceClient({ apiServers: [glance.url], timeoutMs: 3_600_000, retries: 0, authStrategy, log, backoffMs: () => 0 });
  return new GlanceImageStore({ client, stagingPath: path.join(e.tmp, 'staging'), reservedSpaceMb: 0, osHashAlgo: 'sha512', log });
}

/** A snapshot whose upload has begun and will never end (as if its agent had died mid-upload). */
async function hungUpload(): Promise<{ uuid: string; imageId: string }> {
  const uuid = randomUUID();
  const imageId = randomUUID();
  await guestIn(e, 'running', uuid, { present: false }, 8 * 1024 * 1024);
  glance.addQueued(imageId);
  glance.stopReadingAfter = 1;
  const engine = new SnapshotEngine({ hv: e.hv, store: glanceStore('noauth'), lifecycle: e.lifecycle, operations: e.operations, log: silentLogger(), namePrefix: PREFIX, defaultStrategy: 'monitor-snapshot' });
  hung = engine.take({ requestId: `req-${imageId}`, instanceUuid: uuid, imageId }).catch(() => undefined);
  const deadline = Date.now() + 30_000;
  while (glance.images.get(imageId)?.status !== 'saving') {
    if (Date.now() > deadline) throw new Error('the upload did not begin');
    await new Promise((r) => setTimeout(r, 10));
  }
  return { uuid, imageId };
}

function deps(store: GlanceImageStore): RecoveryDeps {
  return fakeRecoveryDeps(e, { store, strategy: 'monitor-snapshot', agentTimeoutMs: 50, ownerRunning: async () => false });
}

describe('recovery of an interrupted upload to Glance', () => {
  it('noauth: the image is deleted in Glance (never left saving), nothing staged, the guest running', async () => {
    const { uuid, imageId } = await hungUpload();
    const store = glanceStore('noauth');
    const [rec] = await recoverOperations(deps(store));
    expect(rec).toMatchObject({ image_id: imageId, stopped_at: 'step 4 (export-snapshot)', image: 'killed', guest_now: 'running' });
    expect(rec!.error).toBeUndefined();
    expect(glance.images.has(imageId)).toBe(false);
    expect(await e.operations.list()).toEqual([]);
    // Streamed: nothing was ever staged (the folder was not even made).
    await expect(fs.readdir(store.partialDir)).rejects.toMatchObject({ code: 'ENOENT' });
    expect(await e.ownSnapshots(uuid)).toEqual([]);
    const recovery = glance.requests.filter((r) => r.method === 'DELETE');
    expect(recovery).toHaveLength(1);
    expect(recovery[0]!.headers['x-openstack-request-id']).toBe(`req-${imageId}`);
  });

  it('keystone: no token to send, so the record is kept with GlanceAuthMissing named; the guest is put right all the same', async () => {
    const { uuid, imageId } = await hungUpload();
    const [rec] = await recoverOperations(deps(glanceStore('keystone')));
    expect(rec).toMatchObject({ image_id: imageId, guest_now: 'running' });
    expect(rec!.error).toMatch(/auth_strategy = keystone and this operation has no token/);
    expect((await e.operations.list()).map((r) => r.image_id)).toEqual([imageId]);
    expect(glance.images.get(imageId)?.status).toBe('saving');
    expect(await e.ownSnapshots(uuid)).toEqual([]);
  });

  it('a streamed image Glance made active before a later step was cut short is deleted (the snapshot failed), never kept', async () => {
    const uuid = randomUUID();
    const imageId = randomUUID();
    await guestIn(e, 'running', uuid, { present: false }, 4 * 1024 * 1024);
    glance.addQueued(imageId);
    let release!: (err: Error) => void;
    const stuck = new Promise<never>((_, reject) => (release = reject));
    stuck.catch(() => undefined);
    let reached!: () => void;
    const atDelete = new Promise<void>((resolve) => (reached = resolve));
    const engine = new SnapshotEngine({
      hv: e.hv,
      store: glanceStore('noauth'),
      lifecycle: e.lifecycle,
      operations: e.operations,
      log: silentLogger(),
      namePrefix: PREFIX,
      defaultStrategy: 'monitor-snapshot',
      // The agent "dies" right before delete-snapshot: the export step (and its upload) is done.
      beforeStep: (step) => {
        if (step.name !== 'delete-snapshot') return;
        reached();
        return stuck;
      },
    });
    hung = engine.take({ requestId: `req-${imageId}`, instanceUuid: uuid, imageId }).catch(() => undefined);
    await atDelete;
    expect(glance.images.get(imageId)?.status).toBe('active');
    const store = glanceStore('noauth');
    const [rec] = await recoverOperations(deps(store));
    expect(rec).toMatchObject({ image_id: imageId, stopped_at: 'step 5 (delete-snapshot)', image: 'killed', guest_now: 'running' });
    expect(glance.images.has(imageId)).toBe(false);
    expect(await e.ownSnapshots(uuid)).toEqual([]);
    expect(await e.operations.list()).toEqual([]);
    await expect(fs.readdir(store.partialDir)).rejects.toMatchObject({ code: 'ENOENT' });
    release(new Error('the agent that ran it is gone'));
  });

  it("the start-up sweep never kills Glance's queued images (nova-api's, for any host)", async () => {
    const queued = randomUUID();
    glance.addQueued(queued);
    const swept = await sweepStore(deps(glanceStore('noauth')));
    expect(swept.imagesKilled).toEqual([]);
    expect(glance.images.get(queued)?.status).toBe('queued');
  });
});
