import { randomBytes, randomUUID } from 'node:crypto';
import { mkdir, open, readdir, readFile, stat, symlink, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ImageExists, ImageNotFound, InsufficientSpace, InvalidImageId, InvalidInstanceId } from '../../src/errors.js';
import {
  ImageInvalidState,
  ImageStore,
  ImageStoreCorrupt,
  type ImageMeta,
  type NewImage,
} from '../../src/image-store/image-store.js';
import { runProgram } from '../../src/util/exec.js';

const MiB = 1024 * 1024;
const INSTANCE = '3f1c2b9e-7a4d-4c1e-9b2a-5d6e7f8a9b0c';

let tmp: DirectoryResult;
let storePath: string;
let savedUmask: number;

beforeEach(async () => {
  tmp = await dir({ unsafeCleanup: true });
  storePath = path.join(tmp.path, 'images');
  // A strict umask: files come out 0640 only if the store chmods them explicitly.
  savedUmask = process.umask(0o077);
});

afterEach(async () => {
  process.umask(savedUmask);
  await tmp.cleanup();
});

function makeStore(overrides: Partial<ConstructorParameters<typeof ImageStore>[0]> = {}): ImageStore {
  return new ImageStore({ path: storePath, reservedSpaceMb: 0, osHashAlgo: 'sha512', ...overrides });
}

function newImage(id: string = randomUUID(), extra: Partial<NewImage> = {}): NewImage {
  return { id, name: `snap-${id.slice(0, 8)}`, instanceUuid: INSTANCE, imageType: 'snapshot', ...extra };
}

/** Every path under `root` (relative), sorted; [] when root does not exist. */
async function tree(root: string): Promise<string[]> {
  try {
    const entries = await readdir(root, { recursive: true });
    return entries.map(String).sort();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
}

/** Writes the partial data the way qemu-img would: a sparse 64 MiB file with 1 MiB of data at 20 MiB. */
async function writeSparsePartial(store: ImageStore, id: string): Promise<Buffer> {
  const data = randomBytes(MiB);
  const fh = await open(store.partialPath(id), 'w', 0o600);
  try {
    await fh.truncate(64 * MiB);
    await fh.write(data, 0, data.length, 20 * MiB);
  } finally {
    await fh.close();
  }
  return data;
}

/** Independent digest with coreutils (md5sum, sha512sum, ...). */
async function coreutilsDigest(tool: string, file: string): Promise<string> {
  const r = await runProgram(tool, [file]);
  expect(r.code, `${tool} failed: ${r.stderr}`).toBe(0);
  const hex = r.stdout.split(/\s+/)[0];
  expect(hex).toMatch(/^[0-9a-f]+$/);
  return hex!;
}

async function committedImage(store: ImageStore, id = randomUUID()): Promise<ImageMeta> {
  await store.create(newImage(id));
  await writeSparsePartial(store, id);
  await store.markSaving(id);
  return store.commit(id);
}

describe('ImageStore: image ids', () => {
  const uuid = '1b4e28ba-2fa1-11d2-883f-0016d3cca427';
  const badIds: unknown[] = ['../x', '../../etc/passwd', 'not-a-uuid', '', `${uuid}/`, `../${uuid}`, `${uuid}.json`, undefined, 42];

  it.each(badIds.map((id) => [JSON.stringify(id) ?? String(id), id]))('refuses %s everywhere and touches nothing', async (_label, id) => {
    const badImage: NewImage = { ...newImage(), id: id as string };
    // Store directory absent: nothing may create it.
    const fresh = makeStore();
    expect(() => ImageStore.validateId(id)).toThrow(InvalidImageId);
    expect(() => fresh.partialPath(id as string)).toThrow(InvalidImageId);
    await expect(fresh.create(badImage)).rejects.toBeInstanceOf(InvalidImageId);
    await expect(fresh.ensureSpace(id as string, 1)).rejects.toBeInstanceOf(InvalidImageId);
    expect(await tree(tmp.path)).toEqual([]);

    // Store with an image in it: the listing stays exactly the same.
    const store = makeStore();
    const good = randomUUID();
    await store.create(newImage(good));
    await writeSparsePartial(store, good);
    const before = await tree(tmp.path);
    const s = id as string;
    for (const op of [
      () => store.create(badImage),
      () => store.show(s),
      () => store.markSaving(s),
      () => store.commit(s),
      () => store.kill(s, 'x'),
      () => store.verify(s),
      () => store.delete(s),
      () => store.ensureSpace(s, 1),
    ]) {
      await expect(op()).rejects.toBeInstanceOf(InvalidImageId);
    }
    expect(await tree(tmp.path)).toEqual(before);
  });

  it('accepts an upper-case UUID and stores it under its lower-case form', async () => {
    const store = makeStore();
    const meta = await store.create(newImage(uuid.toUpperCase()));
    expect(meta.id).toBe(uuid);
    expect(store.partialPath(uuid.toUpperCase())).toBe(path.join(storePath, '.partial', uuid));
    expect((await store.show(uuid.toUpperCase())).id).toBe(uuid);
    expect(await tree(storePath)).toEqual(['.locks', '.partial', `${uuid}.json`]);
  });

  it('refuses an instance uuid that is not a UUID, before touching anything', async () => {
    const store = makeStore();
    await expect(store.create(newImage(randomUUID(), { instanceUuid: '../vm' }))).rejects.toBeInstanceOf(InvalidInstanceId);
    expect(await tree(tmp.path)).toEqual([]);
  });
});

describe('ImageStore: create → markSaving → commit', () => {
  it('commits a sparse raw image: checksums, sparseness, mode, nothing left in .partial', async () => {
    const store = makeStore();
    const id = randomUUID();
    const created = await store.create(
      newImage(id, { userId: 'u1', owner: 'p1', baseImageRef: 'b1', minDisk: 1, minRam: 512 }),
    );
    expect(created).toMatchObject({
      id,
      status: 'queued',
      disk_format: 'raw',
      container_format: 'bare',
      size: null,
      virtual_size: null,
      checksum: null,
      os_hash_algo: 'sha512',
      os_hash_value: null,
      owner: 'p1',
      min_disk: 1,
      min_ram: 512,
      visibility: 'private',
      properties: { image_type: 'snapshot', instance_uuid: INSTANCE, user_id: 'u1', base_image_ref: 'b1', image_location: 'snapshot' },
    });
    expect(created.created_at).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
    expect(created.properties).not.toHaveProperty('backup_type');
    expect(store.partialPath(id)).toBe(path.join(storePath, '.partial', id));

    await writeSparsePartial(store, id);
    expect((await store.markSaving(id)).status).toBe('saving');
    expect((await store.show(id)).status).toBe('saving');

    const fractions: number[] = [];
    const meta = await store.commit(id, { onProgress: (f) => fractions.push(f) });

    const dataFile = path.join(storePath, id);
    expect(meta.status).toBe('active');
    expect(meta.size).toBe(64 * MiB);
    expect(meta.virtual_size).toBe(64 * MiB);
    expect(meta.checksum).toBe(await coreutilsDigest('md5sum', dataFile));
    expect(meta.os_hash_value).toBe(await coreutilsDigest('sha512sum', dataFile));
    expect(await store.show(id)).toEqual(meta);
    expect(JSON.parse(await readFile(path.join(storePath, `${id}.json`), 'utf8'))).toEqual(meta);

    const st = await stat(dataFile);
    expect(st.size).toBe(64 * MiB);
    expect(st.blocks * 512).toBeLessThan(8 * MiB); // still sparse: ~1 MiB allocated of 64 MiB
    expect(st.mode & 0o777).toBe(0o640);
    expect((await stat(path.join(storePath, `${id}.json`))).mode & 0o777).toBe(0o640);
    expect(await readdir(path.join(storePath, '.partial'))).toEqual([]);
    expect(await tree(storePath)).toEqual(['.locks', '.partial', id, `${id}.json`]); // no temp files left

    expect(fractions.length).toBeGreaterThan(1);
    expect(fractions.at(-1)).toBe(1);
    expect([...fractions].sort((a, b) => a - b)).toEqual(fractions);

    const verified = await store.verify(id);
    expect(verified).toEqual({
      ok: true,
      checksum: meta.checksum,
      os_hash_value: meta.os_hash_value,
      expected_checksum: meta.checksum,
      expected_os_hash_value: meta.os_hash_value,
      size_ok: true,
    });
  });

  it('records the virtual size given to commit and backup properties', async () => {
    const store = makeStore();
    const id = randomUUID();
    const created = await store.create(newImage(id, { imageType: 'backup', backupType: 'daily' }));
    expect(created.properties).toMatchObject({ image_type: 'backup', backup_type: 'daily', user_id: null, base_image_ref: null });
    expect(created.owner).toBeNull();
    await writeSparsePartial(store, id);
    await store.markSaving(id);
    const meta = await store.commit(id, { virtualSize: 128 * MiB });
    expect(meta.size).toBe(64 * MiB);
    expect(meta.virtual_size).toBe(128 * MiB);
  });

  it('honours os_hash_algo sha256, and verifies with the algorithm recorded in the image', async () => {
    const store = makeStore({ osHashAlgo: 'sha256' });
    const meta = await committedImage(store);
    const dataFile = path.join(storePath, meta.id);
    expect(meta.os_hash_algo).toBe('sha256');
    expect(meta.os_hash_value).toBe(await coreutilsDigest('sha256sum', dataFile));
    expect(meta.checksum).toBe(await coreutilsDigest('md5sum', dataFile));
    // The config changes to sha512 later: the sha256 image still verifies.
    const later = makeStore({ osHashAlgo: 'sha512' });
    expect((await later.verify(meta.id)).ok).toBe(true);
  });

  it('verify reports a mismatch after one byte is changed, and a size mismatch after truncation', async () => {
    const store = makeStore();
    const meta = await committedImage(store);
    const dataFile = path.join(storePath, meta.id);
    const fh = await open(dataFile, 'r+');
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, 20 * MiB + 12345);
    b[0] = b[0]! ^ 0xff;
    await fh.write(b, 0, 1, 20 * MiB + 12345);
    await fh.close();

    const r = await store.verify(meta.id);
    expect(r.ok).toBe(false);
    expect(r.size_ok).toBe(true);
    expect(r.checksum).not.toBe(r.expected_checksum);
    expect(r.os_hash_value).not.toBe(r.expected_os_hash_value);
    expect(r.expected_checksum).toBe(meta.checksum);
    expect(r.checksum).toBe(await coreutilsDigest('md5sum', dataFile));

    const fh2 = await open(dataFile, 'r+');
    await fh2.truncate(32 * MiB);
    await fh2.close();
    const r2 = await store.verify(meta.id);
    expect(r2.ok).toBe(false);
    expect(r2.size_ok).toBe(false);
  });

  it('verify of an active image whose data is missing is a clear error', async () => {
    const store = makeStore();
    const meta = await committedImage(store);
    await unlink(path.join(storePath, meta.id));
    await expect(store.verify(meta.id)).rejects.toThrow(ImageStoreCorrupt);
    await expect(store.verify(meta.id)).rejects.toThrow(/data file .* is missing/);
  });

  it('commit without partial data fails clearly and leaves the status unchanged', async () => {
    const store = makeStore();
    const id = randomUUID();
    await store.create(newImage(id));
    await store.markSaving(id);
    await expect(store.commit(id)).rejects.toThrow(ImageInvalidState);
    expect((await store.show(id)).status).toBe('saving');
  });

  it('commit refuses a partial that is a symbolic link, and moves nothing', async () => {
    const store = makeStore();
    const id = randomUUID();
    const outside = path.join(tmp.path, 'outside');
    await writeFile(outside, 'secret');
    await store.create(newImage(id));
    await symlink(outside, store.partialPath(id));
    await expect(store.commit(id)).rejects.toThrow(/symbolic link/);
    expect(await tree(storePath)).toEqual(['.locks', '.partial', `.partial/${id}`, `${id}.json`]);
    expect((await store.show(id)).status).toBe('queued');
  });

  it('refuses verify and markSaving in the wrong status', async () => {
    const store = makeStore();
    const id = randomUUID();
    await store.create(newImage(id));
    await expect(store.verify(id)).rejects.toThrow(/cannot verify image .*: its status is queued/);
    const meta = await committedImage(store);
    await expect(store.markSaving(meta.id)).rejects.toBeInstanceOf(ImageInvalidState);
    await expect(store.commit(meta.id)).rejects.toBeInstanceOf(ImageInvalidState);
  });
});

describe('ImageStore: kill', () => {
  it('removes the partial data, marks the image killed and keeps its metadata', async () => {
    const store = makeStore();
    const id = randomUUID();
    await store.create(newImage(id));
    await writeSparsePartial(store, id);
    await store.markSaving(id);
    await store.kill(id, 'export failed');
    const meta = await store.show(id);
    expect(meta.status).toBe('killed');
    expect(meta.properties.kill_reason).toBe('export failed');
    expect(await tree(storePath)).toEqual(['.locks', '.partial', `${id}.json`]);
    await store.kill(id); // idempotent
    expect((await store.show(id)).status).toBe('killed');
    await expect(store.commit(id)).rejects.toBeInstanceOf(ImageInvalidState);
    await expect(store.markSaving(id)).rejects.toBeInstanceOf(ImageInvalidState);
  });

  it('also removes data a crashed commit renamed into place, but refuses to kill an active image', async () => {
    const store = makeStore();
    const id = randomUUID();
    await store.create(newImage(id));
    await store.markSaving(id);
    await writeFile(path.join(storePath, id), 'half-committed'); // renamed, metadata never updated
    await store.kill(id);
    expect(await tree(storePath)).toEqual(['.locks', '.partial', `${id}.json`]);

    const active = await committedImage(store);
    await expect(store.kill(active.id)).rejects.toBeInstanceOf(ImageInvalidState);
    expect((await store.verify(active.id)).ok).toBe(true);
  });

  it('of an unknown image is ImageNotFound', async () => {
    await expect(makeStore().kill(randomUUID())).rejects.toBeInstanceOf(ImageNotFound);
  });
});

describe('ImageStore: ensureSpace', () => {
  const GiB = 1024 * MiB;

  it('refuses when free space minus the reserve is too small, naming needed / free / reserved MiB, and writes nothing', async () => {
    const calls: string[] = [];
    const store = makeStore({
      reservedSpaceMb: 512,
      statfs: async (p) => {
        calls.push(p);
        return { bavail: (1000 * MiB) / 4096, bsize: 4096 }; // 1000 MiB free
      },
    });
    const id = randomUUID();
    await store.create(newImage(id));
    const before = await tree(tmp.path);
    const err = await store.ensureSpace(id, 600 * MiB).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InsufficientSpace);
    expect((err as Error).message).toMatch(/needs 600 MiB, 1000 MiB free, 512 MiB reserved/);
    expect((err as Error).message).toContain(id);
    expect(await tree(tmp.path)).toEqual(before);
    expect(calls).toEqual([storePath]);

    await expect(store.ensureSpace(id, 400 * MiB)).resolves.toBeUndefined();
    await expect(store.ensureSpace(id, 488 * MiB)).resolves.toBeUndefined(); // exactly what is left
    await expect(store.ensureSpace(id, 488 * MiB + 1)).rejects.toBeInstanceOf(InsufficientSpace);
  });

  it('checks the nearest existing folder when the store does not exist yet, without creating it', async () => {
    const calls: string[] = [];
    const store = makeStore({
      reservedSpaceMb: 0,
      statfs: async (p) => {
        calls.push(p);
        if (p === storePath) throw Object.assign(new Error('ENOENT'), { code: 'ENOENT' });
        return { bavail: 10, bsize: MiB };
      },
    });
    await expect(store.ensureSpace(randomUUID(), 11 * MiB)).rejects.toBeInstanceOf(InsufficientSpace);
    expect(calls).toEqual([storePath, tmp.path]);
    expect(await tree(tmp.path)).toEqual([]);
  });

  it('uses the real statfs by default', async () => {
    const store = makeStore({ reservedSpaceMb: 0 });
    await expect(store.ensureSpace(randomUUID(), 1)).resolves.toBeUndefined();
    await expect(store.ensureSpace(randomUUID(), 1024 * 1024 * GiB)).rejects.toBeInstanceOf(InsufficientSpace);
  });
});

describe('ImageStore: create conflicts, list, show, delete', () => {
  it('refuses a duplicate id, whether metadata or only data exists', async () => {
    const store = makeStore();
    const id = randomUUID();
    const first = await store.create(newImage(id));
    await expect(store.create(newImage(id))).rejects.toBeInstanceOf(ImageExists);
    expect(await store.show(id)).toEqual(first);

    const orphan = randomUUID();
    await writeFile(path.join(storePath, orphan), 'data without metadata');
    await expect(store.create(newImage(orphan))).rejects.toBeInstanceOf(ImageExists);
  });

  it('lets exactly one of two concurrent creates of one id win, also across store instances', async () => {
    const id = randomUUID();
    const a = makeStore();
    const b = makeStore();
    const results = await Promise.allSettled([a.create(newImage(id)), b.create(newImage(id)), a.create(newImage(id))]);
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    for (const r of results) if (r.status === 'rejected') expect(r.reason).toBeInstanceOf(ImageExists);
    expect(await tree(storePath)).toEqual(['.locks', '.partial', `${id}.json`]);
  });

  it('lists images oldest first, shows and deletes them', async () => {
    let t = Date.parse('2026-11-22T01:02:03Z');
    const store = makeStore({ now: () => new Date((t += 1000)) });
    expect(await store.list()).toEqual([]); // store not created yet
    const ids = [randomUUID(), randomUUID(), randomUUID()];
    for (const id of ids) await store.create(newImage(id));
    await writeSparsePartial(store, ids[1]!);
    await store.markSaving(ids[1]!);
    const committed = await store.commit(ids[1]!);

    const listed = await store.list();
    expect(listed.map((m) => m.id)).toEqual(ids);
    expect(listed[0]!.created_at).toBe('2026-11-22T01:02:04Z');
    expect(listed[1]).toEqual(committed);
    expect(committed.updated_at > committed.created_at).toBe(true);

    await expect(store.show(randomUUID())).rejects.toBeInstanceOf(ImageNotFound);

    await store.delete(ids[1]!);
    await expect(store.show(ids[1]!)).rejects.toBeInstanceOf(ImageNotFound);
    expect((await store.list()).map((m) => m.id)).toEqual([ids[0], ids[2]]);
    expect(await tree(storePath)).toEqual(['.locks', '.partial', `${ids[0]}.json`, `${ids[2]}.json`].sort());
    await expect(store.delete(ids[1]!)).rejects.toBeInstanceOf(ImageNotFound);

    // Deleting an image being written removes its partial data too.
    await writeSparsePartial(store, ids[2]!);
    await store.delete(ids[2]!);
    expect(await tree(storePath)).toEqual(['.locks', '.partial', `${ids[0]}.json`]);
  });

  it('names the file when metadata does not parse, and can still delete that image', async () => {
    const store = makeStore();
    const good = await store.create(newImage());
    const id = randomUUID();
    const file = path.join(storePath, `${id}.json`);
    await writeFile(file, '{"id": "truncated');
    await expect(store.show(id)).rejects.toThrow(ImageStoreCorrupt);
    await expect(store.show(id)).rejects.toThrow(file);
    await expect(store.list()).rejects.toThrow(file);

    await writeFile(file, JSON.stringify({ ...good, id: randomUUID() }));
    await expect(store.show(id)).rejects.toThrow(/"id" is .* expected/);

    await store.delete(id);
    expect((await store.list()).map((m) => m.id)).toEqual([good.id]);
  });

  it('ignores files in the store folder that are not image metadata', async () => {
    const store = makeStore();
    const meta = await store.create(newImage());
    await mkdir(path.join(storePath, 'lost+found'));
    await writeFile(path.join(storePath, 'notes.json'), 'not metadata');
    await writeFile(path.join(storePath, `.${meta.id}.json.tmp-1-abc`), 'crash debris');
    expect((await store.list()).map((m) => m.id)).toEqual([meta.id]);
  });
});
