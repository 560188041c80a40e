import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { STRATEGIES } from '../../src/config/schema.js';
import { HashWorkerFailed, SnapshotFailed } from '../../src/errors.js';
import { INLINE_HASH_MAX_BYTES } from '../../src/image-store/hash.js';
import { ImageReceiver } from '../../src/image-store/image-receiver.js';
import { PacedReceiver } from '../../src/image-store/paced-receiver.js';
import { expectSafeFailure, guestIn, makeFakeEnv, type FakeEnv } from '../helpers/fake-env.js';

/**
 * The store receiving an export (issue 13): pieces in increasing offset order go into the file (what
 * is skipped stays a hole) and are hashed, holes as zeros; the digests are those of every byte. Both
 * receivers: ImageReceiver (written ahead at once, hashed behind from the file) and PacedReceiver
 * (hashed as it comes, written from the hashes' memory with O_DIRECT). Out-of-order data is refused; a hash worker that dies fails the export,
 * and the snapshot then fails as any failed export does (image killed, nothing partial, guest as before).
 */

const KiB = 1024;
const MiB = 1024 * KiB;
let tmp: DirectoryResult;
const envs: FakeEnv[] = [];

beforeEach(async () => {
  tmp = await dir({ unsafeCleanup: true });
});
afterEach(async () => {
  for (const e of envs.splice(0)) await e.cleanup();
  await tmp.cleanup();
});

const hex = (algo: string, b: Buffer) => createHash(algo).update(b).digest('hex');

describe.each([
  ['ImageReceiver', ImageReceiver],
  ['PacedReceiver', PacedReceiver],
] as const)('%s', (_name, Receiver) => {
  it('writes pieces where they go, leaves what was skipped a hole, and hashes every byte', async () => {
    const size = 24 * MiB + 123;
    const file = path.join(tmp.path, 'img');
    const rx = await Receiver.create(file, size, 'sha512');
    const whole = Buffer.alloc(size);
    // Contiguous pieces (one extent), a gap, a piece spanning several hash chunks, and one at the end.
    const pieces: [number, Buffer][] = [
      [0, randomBytes(100 * KiB)],
      [100 * KiB, randomBytes(3 * MiB)],
      [9 * MiB + 7, randomBytes(9 * MiB)],
      [size - 1000, randomBytes(1000)],
    ];
    for (const [at, data] of pieces) {
      data.copy(whole, at);
      await rx.put(at, data);
    }
    await rx.close();
    const d = await rx.digests();
    expect(d).toEqual({ md5: hex('md5', whole), osHash: hex('sha512', whole), bytes: size });
    expect(Buffer.compare(await readFile(file), whole)).toBe(0);
    // Sparse: about the data, not the size.
    expect((await stat(file)).blocks * 512).toBeLessThan(14 * MiB);
  });

  it('nothing put: all zeros, all hole', async () => {
    const rx = await Receiver.create(path.join(tmp.path, 'zero'), 5 * MiB, 'sha256');
    await rx.close();
    const zeros = Buffer.alloc(5 * MiB);
    expect(await rx.digests()).toEqual({ md5: hex('md5', zeros), osHash: hex('sha256', zeros), bytes: 5 * MiB });
  });

  it('refuses data before what it already has, and data beyond its size; the image is then failed', async () => {
    const rx = await Receiver.create(path.join(tmp.path, 'img'), 4 * MiB, 'sha512');
    await rx.put(MiB, randomBytes(KiB));
    await expect(rx.put(0, randomBytes(KiB))).rejects.toThrow(/out of order: 1024 bytes at 0, before 1049600/);
    await expect(rx.digests()).rejects.toThrow(/out of order/);
    const beyond = await Receiver.create(path.join(tmp.path, 'img2'), 4 * MiB, 'sha512');
    await expect(beyond.put(4 * MiB - 10, randomBytes(11))).rejects.toThrow(/beyond its size/);
  });

  it('a hash worker that dies: the next piece is refused and the digests reject with HashWorkerFailed', async () => {
    let killed = false;
    const rx = await Receiver.create(path.join(tmp.path, 'img'), 64 * MiB, 'sha512', (digest) => {
      void digest.threads[1]!.terminate().then(() => (killed = true));
    });
    await expect(rx.digests()).rejects.toBeInstanceOf(HashWorkerFailed);
    expect(killed).toBe(true);
    await expect(rx.put(0, randomBytes(KiB))).rejects.toBeInstanceOf(HashWorkerFailed);
  });
});

describe('ImageReceiver', () => {
  it('data far beyond what is hashed after a long hole, and more than the bound ahead of the hashes: it goes on', async () => {
    // The writer waits when it is more than `aheadBytes` ahead of the hashes: a hole before it must
    // count as known (zeros), or writer and hashes would wait for each other.
    const size = 40 * MiB;
    const rx = await ImageReceiver.create(path.join(tmp.path, 'far'), size, 'sha512', undefined, { aheadBytes: MiB });
    const whole = Buffer.alloc(size);
    for (const at of [0, 20 * MiB, 21 * MiB, 38 * MiB]) {
      const data = randomBytes(MiB);
      data.copy(whole, at);
      await rx.put(at, data);
    }
    await rx.close();
    expect(await rx.digests()).toEqual({ md5: hex('md5', whole), osHash: hex('sha512', whole), bytes: size });
  });

});

describe('PacedReceiver', () => {
  it('pieces at any alignment, many at once, in one image: exact, and the digests those of the file', async () => {
    // Sector-aligned pieces go to the disk with O_DIRECT from the ring; a piece at an odd offset or
    // of an odd length, and the slot it shares, through the page cache: the file is one whole either way.
    const size = 40 * MiB + 512;
    const file = path.join(tmp.path, 'mixed');
    const rx = await PacedReceiver.create(file, size, 'sha384');
    const whole = Buffer.alloc(size);
    const pieces: [number, Buffer][] = [
      [0, randomBytes(2 * MiB)],
      [2 * MiB, randomBytes(2 * MiB)],
      [6 * MiB + 3, randomBytes(MiB + 5)],
      [8 * MiB, randomBytes(64 * KiB)],
      [12 * MiB, randomBytes(9 * MiB)],
      [size - 512, randomBytes(512)],
    ];
    const puts = pieces.map(([at, data]) => {
      data.copy(whole, at);
      return rx.put(at, data);
    });
    await Promise.all(puts);
    await rx.close();
    expect(await rx.digests()).toEqual({ md5: hex('md5', whole), osHash: hex('sha384', whole), bytes: size });
    expect(Buffer.compare(await readFile(file), whole)).toBe(0);
    expect((await stat(file)).blocks * 512).toBeLessThan(20 * MiB);
    // The aligned slots (all but the one from 6 MiB + 3 to 7 MiB + 8) went to the disk directly.
    expect(rx.writtenDirect).toBe(4 * MiB + 64 * KiB + 9 * MiB + 512);
  });

  it('data after its end, or put after a failure: refused with the cause', async () => {
    const rx = await PacedReceiver.create(path.join(tmp.path, 'closed'), 2 * MiB, 'sha512');
    await rx.put(0, randomBytes(MiB));
    await rx.close();
    await expect(rx.put(MiB, randomBytes(KiB))).rejects.toThrow(/after its end/);
    const failed = await PacedReceiver.create(path.join(tmp.path, 'failed'), 2 * MiB, 'sha512');
    await failed.abort(new Error('export undone'));
    await expect(failed.put(0, randomBytes(KiB))).rejects.toThrow(/export undone/);
    await expect(failed.digests()).rejects.toThrow(/export undone/);
  });
});

describe('PacedReceiver: the first failure', () => {
  it('is what every later or waiting put rejects with, never the hashing stopped for it (the NBD client is told ENOSPC, not EIO)', async () => {
    // Puts beyond the ring's slots wait for one; the failure stops the hash threads meanwhile.
    const rx = await PacedReceiver.create(path.join(tmp.path, 'full'), 64 * MiB, 'sha512');
    const full = Object.assign(new Error('no space left on the store'), { code: 'ENOSPC' });
    const puts = Array.from({ length: 12 }, (_, i) => rx.put(i * 4 * MiB, randomBytes(4 * MiB)).then(() => 'ok', (e: unknown) => e));
    await new Promise((r) => setImmediate(r));
    await rx.abort(full);
    const settled = await Promise.all(puts);
    const failures = settled.filter((x) => x !== 'ok');
    expect(failures.length).toBeGreaterThan(0);
    for (const e of failures) expect(e).toBe(full);
    await expect(rx.put(60 * MiB, randomBytes(KiB))).rejects.toBe(full);
  });
});

describe('a snapshot whose received data cannot be hashed', () => {
  it.each(STRATEGIES.filter((s) => s !== 'live'))('%s: fails as a failed export does, nothing left behind', async (strategy) => {
    const e = await makeFakeEnv({
      strategy,
      storeHook: (point, _id, digest) => {
        if (point === 'receive:hashing') void digest!.threads[0]!.terminate();
      },
    });
    envs.push(e);
    const uuid = randomUUID();
    // Larger than what is hashed inline, so that the hashes run on threads.
    await guestIn(e, 'running', uuid, { present: true }, 2 * INLINE_HASH_MAX_BYTES);
    const imageId = randomUUID();
    const err = await expectSafeFailure(e, uuid, 'running', strategy, imageId);
    expect(err).toBeInstanceOf(SnapshotFailed);
    expect(String((err as Error).message)).toMatch(/md5 hash worker exited/);
  });
});
