import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { open, readdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { HashWorkerFailed } from '../../src/errors.js';
import { digestFile, INLINE_HASH_MAX_BYTES, ParallelDigest } from '../../src/image-store/hash.js';
import { ImageStore } from '../../src/image-store/image-store.js';

/**
 * md5 and the os_hash on two worker threads fed from one read pass (issue 13): the digests are
 * those of every byte (holes as zeros), whatever the file's size against the chunk and the ring; a
 * worker that dies fails the hashing with HashWorkerFailed, and a commit that meets it leaves the
 * image as it was (still `saving`, its partial data in place).
 */

const KiB = 1024;
let tmp: DirectoryResult;

beforeEach(async () => {
  tmp = await dir({ unsafeCleanup: true });
});
afterEach(async () => {
  await tmp.cleanup();
});

function reference(data: Buffer, algo: string): string {
  return createHash(algo).update(data).digest('hex');
}

async function digestOf(file: string, algo: 'sha512' | 'sha256', chunkBytes?: number) {
  const fh = await open(file, 'r');
  try {
    return await digestFile(fh, algo, { chunkBytes });
  } finally {
    await fh.close();
  }
}

describe('digestFile on worker threads', () => {
  // Sizes around the chunk (64 KiB here) and around the ring of 4 chunks, so that slots are reused.
  it.each([0, 1, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 4 * 64 * KiB, 17 * 64 * KiB + 123])('%i bytes: the digests of every byte', async (size) => {
    const data = randomBytes(size);
    const file = path.join(tmp.path, 'data');
    await writeFile(file, data);
    const d = await digestOf(file, 'sha512', 64 * KiB);
    expect(d).toEqual({ md5: reference(data, 'md5'), osHash: reference(data, 'sha512'), bytes: size });
  });

  it.each([
    [0, 0],
    [INLINE_HASH_MAX_BYTES, 0],
    [INLINE_HASH_MAX_BYTES + 1, 2],
  ])('%i bytes expected: hashed on %i threads, the digests of every byte (holes as zeros)', async (size, threads) => {
    const data = randomBytes(size);
    const file = path.join(tmp.path, 'data');
    await writeFile(file, data.subarray(0, Math.floor(size / 2)));
    const fh = await open(file, 'r+');
    let seen: number | undefined;
    try {
      await fh.truncate(size); // the second half a hole
      const whole = Buffer.concat([data.subarray(0, Math.floor(size / 2)), Buffer.alloc(size - Math.floor(size / 2))]);
      const d = await digestFile(fh, 'sha512', { expectedBytes: size, onStart: (digest) => (seen = digest.threads.length) });
      expect(d).toEqual({ md5: reference(whole, 'md5'), osHash: reference(whole, 'sha512'), bytes: size });
    } finally {
      await fh.close();
    }
    expect(seen).toBe(threads);
  });

  it('a sparse file: its holes are hashed as the zeros they read as', async () => {
    const file = path.join(tmp.path, 'sparse');
    const data = randomBytes(100 * KiB);
    const fh = await open(file, 'w');
    await fh.truncate(3 * 1024 * KiB);
    await fh.write(data, 0, data.length, 1024 * KiB + 7);
    await fh.close();
    const whole = Buffer.alloc(3 * 1024 * KiB);
    data.copy(whole, 1024 * KiB + 7);
    expect((await stat(file)).blocks * 512).toBeLessThan(whole.length);
    const d = await digestOf(file, 'sha256', 64 * KiB);
    expect(d).toEqual({ md5: reference(whole, 'md5'), osHash: reference(whole, 'sha256'), bytes: whole.length });
  });

  it('a worker that dies mid-way fails the hashing with HashWorkerFailed, naming the hash', async () => {
    const file = path.join(tmp.path, 'data');
    await writeFile(file, randomBytes(40 * 64 * KiB));
    const fh = await open(file, 'r');
    let chunks = 0;
    let stopped = false;
    const err = await digestFile(fh, 'sha512', {
      chunkBytes: 64 * KiB,
      onProgress: () => undefined,
      expectedBytes: 40 * 64 * KiB,
      onStart: (digest) => {
        // Stop the sha512 worker once a few chunks went to it.
        const w = digest.threads[1]!;
        w.on('message', () => {
          chunks += 1;
          if (chunks === 3 && !stopped) {
            stopped = true;
            void w.terminate();
          }
        });
      },
    })
      .catch((e: unknown) => e)
      .finally(() => fh.close());
    expect(stopped).toBe(true);
    expect(err).toBeInstanceOf(HashWorkerFailed);
    expect((err as Error).message).toMatch(/sha512 hash worker exited/);
  });

  it('end() gives the digests of nothing pushed', async () => {
    const d = new ParallelDigest(['md5', 'sha512']);
    expect(await d.end()).toEqual([reference(Buffer.alloc(0), 'md5'), reference(Buffer.alloc(0), 'sha512')]);
  });
});

describe('ImageStore.commit when hashing fails', () => {
  it('leaves the image saving and its partial data in place; a second commit makes it active', async () => {
    let kill = true;
    const store = new ImageStore({
      path: path.join(tmp.path, 'images'),
      reservedSpaceMb: 0,
      osHashAlgo: 'sha512',
      lockAcrossProcesses: false,
      hook: (point, _id, digest) => {
        if (point === 'commit:hashing' && kill) void digest!.threads[0]!.terminate();
      },
    });
    const id = randomUUID();
    await store.create({ id, name: 'x', instanceUuid: randomUUID(), imageType: 'snapshot' });
    const data = randomBytes(3 * 1024 * KiB);
    await writeFile(store.partialPath(id), data);
    await store.markSaving(id);
    await expect(store.commit(id)).rejects.toBeInstanceOf(HashWorkerFailed);
    expect((await store.show(id)).status).toBe('saving');
    expect(await readdir(path.dirname(store.partialPath(id)))).toContain(path.basename(store.partialPath(id)));
    kill = false;
    const meta = await store.commit(id);
    expect(meta).toMatchObject({ status: 'active', checksum: reference(data, 'md5'), os_hash_value: reference(data, 'sha512'), size: data.length });
  });
});
