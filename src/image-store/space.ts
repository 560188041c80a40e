import { statfs as fsStatfs } from 'node:fs/promises';
import path from 'node:path';
import { InsufficientSpace } from '../errors.js';
import { isErrno } from '../util/durable-fs.js';

export type StatfsFn = (p: string) => Promise<{ bavail: number; bsize: number }>;

const MiB = 1024 * 1024;

export const defaultStatfs: StatfsFn = (p) => fsStatfs(p);

/** statfs of `dir`, or of its nearest existing ancestor when the store does not exist yet. */
async function statfsNearest(statfs: StatfsFn, dir: string): Promise<{ bavail: number; bsize: number }> {
  let p = dir;
  for (;;) {
    try {
      return await statfs(p);
    } catch (err) {
      const parent = path.dirname(p);
      if (!isErrno(err, 'ENOENT') || parent === p) throw err;
      p = parent;
    }
  }
}

/** Bytes free for unprivileged users on the filesystem of `dir` (or of its nearest existing ancestor). */
export async function freeBytes(statfs: StatfsFn, dir: string): Promise<number> {
  const { bavail, bsize } = await statfsNearest(statfs, dir);
  return bavail * bsize;
}

/**
 * Throws InsufficientSpace unless the filesystem of `dir` has `bytesNeeded` free for unprivileged
 * users after keeping `reservedSpaceMb` MiB in reserve. Reads only; writes nothing.
 */
export async function checkFreeSpace(opts: {
  statfs: StatfsFn;
  dir: string;
  reservedSpaceMb: number;
  bytesNeeded: number;
  what: string;
}): Promise<void> {
  const free = await freeBytes(opts.statfs, opts.dir);
  const reserved = opts.reservedSpaceMb * MiB;
  if (opts.bytesNeeded > free - reserved) {
    throw new InsufficientSpace(
      `not enough free space in image store ${opts.dir} for ${opts.what}: needs ${Math.ceil(opts.bytesNeeded / MiB)} MiB, ` +
        `${Math.floor(free / MiB)} MiB free, ${opts.reservedSpaceMb} MiB reserved (reserved_space_mb)`,
    );
  }
}
