/**
 * Issue 13 against real qemu-img: an export goes into the image store through its NBD receiver
 * (`qemu-img convert -n --target-is-zero` into a unix socket), the data written as it comes and hashed
 * behind the writing. The image equals what qemu-img writes into a file, byte for byte; holes stay
 * holes; the digests equal md5sum's and sha512sum's; an internal snapshot read with -l and -U (a
 * disk held open by another process) goes the same way. A store that fills during the export fails it
 * with ENOSPC named, and once the export is given up nothing of it is left.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageStore } from '../../src/image-store/image-store.js';
import { silentLogger } from '../../src/log.js';
import { QemuImg } from '../../src/qemu-img/qemu-img.js';
import { runProgram } from '../../src/util/exec.js';
import { QEMU_IMG } from '../helpers/qemu-guest.js';
import { mountSmallFs, type SmallFs } from '../helpers/small-fs.js';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;
let tmp: DirectoryResult;
let disk: string;
let small: SmallFs | undefined;
const qemuImg = new QemuImg(QEMU_IMG);

async function run(program: string, args: string[]): Promise<string> {
  const r = await runProgram(program, args, { timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`${program} ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return r.stdout;
}

async function coreutils(tool: string, file: string): Promise<string> {
  return (await run(tool, [file])).split(/\s+/)[0]!;
}

/** A store with a `saving` image ready to receive. */
async function savingImage(root: string): Promise<{ store: ImageStore; id: string }> {
  const store = new ImageStore({ path: root, reservedSpaceMb: 0, osHashAlgo: 'sha512' });
  const id = randomUUID();
  await store.create({ id, name: 'x', instanceUuid: randomUUID(), imageType: 'snapshot' });
  await store.markSaving(id);
  return { store, id };
}

beforeAll(async () => {
  tmp = await dir({ unsafeCleanup: true });
  disk = path.join(tmp.path, 'disk.qcow2');
  await run(QEMU_IMG, ['create', '-q', '-f', 'qcow2', disk, String(SIZE)]);
  // Random data in runs (one across a 2 MiB boundary), a run written as zeros, an explicit zero
  // cluster range, data in the last cluster; the rest never written.
  const random = path.join(tmp.path, 'random');
  await run('dd', ['if=/dev/urandom', `of=${random}`, 'bs=1M', 'count=8', 'status=none']);
  await run('qemu-io', ['-f', 'qcow2', '-c', `write -s ${random} 1M 8M`, '-c', 'write -P 0 40M 2M', '-c', 'write -z 60M 4M', '-c', `write -s ${random} 100M 3M`, '-c', 'write -P 0x5a 255M 1M', disk]);
  await run(QEMU_IMG, ['snapshot', '-c', 'snap1', disk]);
  // Changed after the snapshot: the snapshot's export must not see this.
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 1M 1M', disk]);
});

afterAll(async () => {
  await small?.cleanup();
  await tmp?.cleanup();
});

describe('exports received by the image store over NBD (real qemu-img)', () => {
  it.each([
    ['the active layer', undefined],
    ['an internal snapshot (-l, -U)', 'snap1'],
  ])('%s: bit-exact, sparse, digests equal md5sum and sha512sum', async (_what, snapshotName) => {
    const { store, id } = await savingImage(path.join(tmp.path, `store-${snapshotName ?? 'active'}`));
    const incoming = await store.receive(id, SIZE, silentLogger());
    await qemuImg.convertToRaw(disk, incoming, { snapshotName, forceShare: snapshotName !== undefined });
    await incoming.finish();
    const image = await store.commit(id, { digests: incoming.digests() });

    const reference = path.join(tmp.path, `reference-${snapshotName ?? 'active'}.raw`);
    await qemuImg.convertToRaw(disk, reference, { snapshotName, forceShare: true });
    const data = store.dataPath(id);
    expect(Buffer.compare(await fs.readFile(data), await fs.readFile(reference))).toBe(0);
    expect(image).toMatchObject({ status: 'active', size: SIZE, checksum: await coreutils('md5sum', reference), os_hash_value: await coreutils('sha512sum', reference) });
    // Only the data is allocated: 8 + 3 + 1 MiB (the zero runs are holes too), plus rounding.
    expect((await fs.stat(data)).blocks * 512).toBeLessThanOrEqual(13 * MiB);
    expect((await store.verify(id)).ok).toBe(true);
    await expect(fs.readdir(path.join(store.path, '.partial'))).resolves.toEqual([]);
  });

  it('a store that fills during the export: qemu-img fails naming ENOSPC; given up, nothing of it is left', async () => {
    small = await mountSmallFs(path.join(tmp.path, 'small'), 6);
    const { store, id } = await savingImage(path.join(small.path, 'images'));
    const incoming = await store.receive(id, SIZE, silentLogger());
    const err = await qemuImg.convertToRaw(disk, incoming).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toMatch(/No space left on device/);
    await incoming.abort(err);
    await expect(incoming.digests()).rejects.toThrow();
    await fs.rm(store.partialPath(id), { force: true });
    await store.kill(id, 'store full');
    expect(await fs.readdir(path.join(store.path, '.partial'))).toEqual([]);
    expect((await store.show(id)).status).toBe('killed');
    // The socket's private folder is gone too.
    expect(incoming.nbdUri).toMatch(/^nbd\+unix:\/\/\/\?socket=\//);
    await expect(fs.access(path.dirname(incoming.nbdUri.split('socket=')[1]!))).rejects.toThrow();
  });
});
