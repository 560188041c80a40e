import fs from 'node:fs/promises';
import { runProgram } from '../../src/util/exec.js';

/**
 * A small filesystem of its own for tests that need a store to run out of space for real: a tmpfs
 * of `sizeMb` MiB mounted on a folder. Mounting needs root (the tests run as root, CI too); when it
 * fails the test fails, loudly, saying why: a disk-full test must never pass without a full disk.
 */

const MiB = 1024 * 1024;

export interface SmallFs {
  /** The mount point (the root of the small filesystem). */
  readonly path: string;
  readonly sizeBytes: number;
  /** Bytes an unprivileged writer may still allocate (statfs bavail × bsize). */
  freeBytes(): Promise<number>;
  /** Unmounts (lazily when busy) and removes the mount point. Safe to call twice. */
  cleanup(): Promise<void>;
}

/** Mounts a tmpfs of `sizeMb` MiB on `dir` (created if needed). */
export async function mountSmallFs(dir: string, sizeMb: number): Promise<SmallFs> {
  if (!Number.isInteger(sizeMb) || sizeMb < 1 || sizeMb > 1024) throw new TypeError(`sizeMb ${sizeMb}: expected 1..1024`);
  await fs.mkdir(dir, { recursive: true });
  const args = ['-t', 'tmpfs', '-o', `size=${sizeMb}m,mode=0755`, 'tmpfs', dir];
  const res = await runProgram('mount', args, { timeoutMs: 30_000 }).catch((err: Error) => ({ code: -1, stdout: '', stderr: err.message }));
  if (res.code !== 0) {
    throw new Error(
      `a small filesystem of its own is required by the disk-full tests (the image store must run out of space for real), ` +
        `and mounting one failed: mount ${args.join(' ')} exited ${res.code}: ${(res.stderr + res.stdout).trim() || '(no output)'}. ` +
        'These tests must run as root (or with CAP_SYS_ADMIN) on a host that allows tmpfs mounts.',
    );
  }
  // Make sure it is our tmpfs (and not the folder of the filesystem underneath) before anything is written.
  const st = await fs.statfs(dir);
  const TMPFS_MAGIC = 0x01021994;
  if (st.type !== TMPFS_MAGIC || st.blocks * st.bsize > sizeMb * MiB) {
    await unmount(dir);
    throw new Error(`mount reported success, but ${dir} is not a tmpfs of ${sizeMb} MiB (statfs type 0x${st.type.toString(16)}, ${st.blocks * st.bsize} bytes)`);
  }
  let cleaned = false;
  return {
    path: dir,
    sizeBytes: sizeMb * MiB,
    async freeBytes() {
      const s = await fs.statfs(dir);
      return s.bavail * s.bsize;
    },
    async cleanup() {
      if (cleaned) return;
      cleaned = true;
      await unmount(dir);
      await fs.rmdir(dir).catch(() => undefined);
    },
  };
}

/** umount; retried while busy, then lazily (-l) so that a leftover open file never leaks the mount. */
async function unmount(dir: string): Promise<void> {
  let last = '';
  for (let attempt = 0; attempt < 5; attempt++) {
    const res = await runProgram('umount', [dir], { timeoutMs: 30_000 });
    if (res.code === 0) return;
    last = (res.stderr + res.stdout).trim();
    if (/not mounted|no mount point/i.test(last)) return;
    await new Promise((r) => setTimeout(r, 200));
  }
  const lazy = await runProgram('umount', ['-l', dir], { timeoutMs: 30_000 });
  if (lazy.code !== 0) throw new Error(`cannot unmount the small filesystem ${dir}: ${last}; umount -l: ${(lazy.stderr + lazy.stdout).trim()}`);
}

/**
 * Fills the filesystem of `file` until only `leaveBytes` (rounded down to whole blocks) are free,
 * with non-zero bytes (so nothing is sparse), appended to `file` (a new file, or one that ends on a block
 * boundary). Resolves with the bytes written.
 */
export async function fillUntilFree(file: string, fsPath: string, leaveBytes: number): Promise<number> {
  const st = await fs.statfs(fsPath);
  const free = st.bavail * st.bsize;
  const want = Math.max(0, free - Math.floor(leaveBytes / st.bsize) * st.bsize);
  const fh = await fs.open(file, 'a');
  try {
    const chunk = Buffer.alloc(MiB, 0xee);
    let written = 0;
    while (written < want) {
      const n = Math.min(chunk.length, want - written);
      await fh.write(chunk, 0, n);
      written += n;
    }
    await fh.sync();
    return written;
  } finally {
    await fh.close();
  }
}
