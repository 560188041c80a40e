import { randomBytes } from 'node:crypto';
import { constants, link, lstat, open, rename, unlink } from 'node:fs/promises';
import path from 'node:path';

/** fsync a directory so that entries created, renamed or removed in it survive a crash. */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** True when `err` is a Node system error with this errno code (ENOENT, EEXIST, ...). */
export function isErrno(err: unknown, code: string): boolean {
  return typeof err === 'object' && err !== null && (err as NodeJS.ErrnoException).code === code;
}

/** unlink that ignores a missing file; true when something was removed. */
export async function unlinkIfExists(file: string): Promise<boolean> {
  try {
    await unlink(file);
    return true;
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return false;
    throw err;
  }
}

/**
 * Writes `data` to `file` atomically and durably: a temp file in the same directory (named with a
 * leading dot so listings skip it), fsync, chmod, then rename over `file` (or, with `exclusive`,
 * hard-link into place, which fails with EEXIST if `file` exists), then fsync the directory.
 */
export async function writeFileAtomic(
  file: string,
  data: string,
  opts: { mode: number; exclusive?: boolean },
): Promise<void> {
  const dir = path.dirname(file);
  const tmp = path.join(dir, `.${path.basename(file)}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
  const fh = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, opts.mode);
  try {
    try {
      await fh.writeFile(data, 'utf8');
      await fh.chmod(opts.mode); // the create mode is filtered by the umask
      await fh.sync();
    } finally {
      await fh.close();
    }
    if (opts.exclusive) {
      await link(tmp, file);
      await unlink(tmp);
    } else {
      await rename(tmp, file);
    }
  } catch (err) {
    await unlinkIfExists(tmp).catch(() => undefined);
    throw err;
  }
  await fsyncDir(dir);
}

/** True if something (file, folder, link) is at `p`; false only when nothing is. */
export async function pathExists(p: string): Promise<boolean> {
  try {
    await lstat(p);
    return true;
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return false;
    throw err;
  }
}
