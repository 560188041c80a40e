import { createHash, randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { cliJson, runCli } from '../helpers/cli.js';
import { FakeGlance } from '../helpers/fake-glance.js';

/** `images list|show|verify|delete` of the built CLI against a (fake) Glance: [image_store] backend = glance. */

let glance: FakeGlance;
let tmp: DirectoryResult;

beforeEach(async () => {
  glance = await FakeGlance.start();
  tmp = await dir({ unsafeCleanup: true });
});

afterEach(async () => {
  await glance.stop();
  await tmp.cleanup();
});

async function config(authStrategy: 'noauth' | 'keystone'): Promise<string> {
  const file = path.join(tmp.path, `${authStrategy}.conf`);
  await fs.writeFile(
    file,
    ['[DEFAULT]', 'state_path = state', 'instances_path = instances', '[image_store]', 'path = staging', 'backend = glance', '[glance]', `api_servers = ${glance.url}`, `auth_strategy = ${authStrategy}`, 'retries = 0', '[metrics]', 'listen =', ''].join('\n'),
  );
  return file;
}

function activeImage(data: Buffer): string {
  const id = randomUUID();
  glance.addQueued(id, {
    status: 'active',
    disk_format: 'raw',
    container_format: 'bare',
    size: data.length,
    checksum: createHash('md5').update(data).digest('hex'),
    os_hash_algo: 'sha512',
    os_hash_value: createHash('sha512').update(data).digest('hex'),
    image_type: 'snapshot',
    instance_uuid: randomUUID(),
  });
  glance.data.set(id, data);
  return id;
}

describe('images commands on Glance', () => {
  it('list, show, verify (downloads and re-hashes) and delete', async () => {
    const conf = await config('noauth');
    const data = randomBytes(300_000);
    const id = activeImage(data);
    const list = (await cliJson(conf, ['images', 'list'])) as { id: string; status: string }[];
    expect(list.map((i) => [i.id, i.status])).toEqual([[id, 'active']]);
    expect(await cliJson(conf, ['images', 'show', id])).toMatchObject({ id, status: 'active', size: data.length, properties: { image_type: 'snapshot' } });
    expect(await cliJson(conf, ['images', 'verify', id])).toMatchObject({ id, ok: true, size_ok: true });
    expect(glance.requests.some((r) => r.method === 'GET' && r.path === `/v2/images/${id}/file`)).toBe(true);
    // Data that no longer matches Glance's record: verify says so, exit 1.
    glance.data.set(id, Buffer.concat([data.subarray(0, -1), Buffer.from([data.at(-1)! ^ 1])]));
    const bad = await runCli(['--config-file', conf, 'images', 'verify', id, '--json']);
    expect(bad.code).toBe(1);
    expect(JSON.parse(bad.stdout)).toMatchObject({ ok: false });
    const del = await runCli(['--config-file', conf, 'images', 'delete', id]);
    expect(del.code).toBe(0);
    expect(glance.images.has(id)).toBe(false);
    const gone = await runCli(['--config-file', conf, 'images', 'show', id]);
    expect(gone.code).toBe(1);
    expect(gone.stderr).toContain(`image ${id} not found`);
  });

  it('keystone: a command has no token, so it fails with GlanceAuthMissing before asking Glance', async () => {
    const conf = await config('keystone');
    const res = await runCli(['--config-file', conf, 'images', 'list']);
    expect(res.code).toBe(1);
    expect(res.stderr).toMatch(/GlanceAuthMissing|auth_strategy = keystone and this operation has no token/);
    expect(glance.requests).toEqual([]);
  });
});
