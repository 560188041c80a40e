/**
 * Issue 12 item 7: the image store's changes are serialised across processes. A commit stopped (by
 * a hook, not by timing) between renaming the data into place and writing its `active` metadata,
 * and a delete of the same image from another process: the delete waits for the commit, and no
 * `active` record without data is left.
 */
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';
import { dir } from 'tmp-promise';
import { afterEach, describe, expect, it } from 'vitest';
import { ImageNotFound } from '../../src/errors.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { readImageMeta } from '../../src/image-store/metadata.js';

const ROOT = path.resolve(import.meta.dirname, '../..');
const STORE_TS = pathToFileURL(path.join(ROOT, 'src/image-store/image-store.ts')).href;

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/**
 * A child process running one store operation on its own ImageStore object. It prints each hook
 * point it reaches as a line; at `stopAt` it waits for a line on its stdin before going on. Its last
 * line is `done` or `error <name>`.
 */
function storeChild(storePath: string, op: 'commit' | 'delete', id: string, stopAt?: string) {
  const script = `
    const { ImageStore } = await import(${JSON.stringify(STORE_TS)});
    const { createInterface } = await import('node:readline');
    const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
    const store = new ImageStore({
      path: ${JSON.stringify(storePath)}, reservedSpaceMb: 0, osHashAlgo: 'sha512',
      hook: async (point) => {
        if (point === 'commit:hashing') return; // not a point these tests stop at
        process.stdout.write(point + '\\n');
        if (point === ${JSON.stringify(stopAt ?? '')}) await lines.next();
      },
    });
    try {
      await store.${op}(${JSON.stringify(id)});
      process.stdout.write('done\\n');
    } catch (err) {
      process.stdout.write('error ' + err.name + ' ' + err.message + '\\n');
    }
    process.exit(0);
  `;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
  cleanups.push(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  const exited = once(child, 'exit');
  return {
    child,
    exited,
    /** The next line it prints. */
    async line(): Promise<string> {
      const r = await lines.next();
      if (r.done) throw new Error(`store child (${op}) ended without a line: ${stderr}`);
      return r.value;
    },
  };
}

async function storeWithSavingImage(): Promise<{ store: ImageStore; id: string; data: Buffer }> {
  const tmp = await dir({ unsafeCleanup: true });
  cleanups.push(() => tmp.cleanup());
  const store = new ImageStore({ path: path.join(tmp.path, 'images'), reservedSpaceMb: 0, osHashAlgo: 'sha512' });
  const id = randomUUID();
  await store.create({ id, name: 'x', instanceUuid: randomUUID(), imageType: 'snapshot' });
  await store.markSaving(id);
  const data = Buffer.alloc(64 * 1024, 7);
  await fs.writeFile(store.partialPath(id), data);
  return { store, id, data };
}

describe('image store across processes', () => {
  it('a delete from another process landing between a commit’s rename and its metadata write waits for the commit: no active image without data', async () => {
    const { store, id } = await storeWithSavingImage();
    const committer = storeChild(store.path, 'commit', id, 'commit:renamed');
    expect(await committer.line()).toBe('commit:renamed'); // stopped: data in place, metadata still `saving`
    expect(await readImageMeta(store.metadataPath(id), id)).toMatchObject({ status: 'saving' });

    const deleter = storeChild(store.path, 'delete', id);
    // It reaches the image while the commit is stopped: it must wait for it (or, unfixed, it deletes at once).
    const first = await deleter.line();
    committer.child.stdin!.write('go\n');
    expect(await committer.line()).toBe('done');
    const last = first === 'lock-wait' ? await deleter.line() : first;
    await Promise.all([committer.exited, deleter.exited]);

    // Whatever the order, the store is consistent: here the delete came last, so nothing is left.
    expect(last).toBe('done');
    expect(await readImageMeta(store.metadataPath(id), id)).toBeNull();
    await expect(fs.access(store.dataPath(id))).rejects.toThrow();
    await expect(store.show(id)).rejects.toBeInstanceOf(ImageNotFound);
    expect(await store.list()).toEqual([]);
    // And it did so by waiting for the commit, not by luck.
    expect(first).toBe('lock-wait');
  });
});
