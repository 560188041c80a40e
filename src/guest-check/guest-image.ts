import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { runProgram } from '../util/exec.js';

/**
 * The test guest that `scripts/guest-image.sh` builds from Debian packages into a cache folder: a
 * cloud kernel, an initramfs, and an ext4 root disk (qcow2) whose init starts the QEMU guest agent,
 * a writer of checksummed records and a pause probe (src/guest-check/console.ts has what they say).
 */

export interface GuestImage {
  dir: string;
  kernel: string;
  initrd: string;
  /** The root filesystem (qcow2): instances are created on top of it (`--base-image`). */
  rootDisk: string;
  rootDiskFormat: 'qcow2';
  cmdline: string;
  kernelVersion: string;
}

/** `$SNAPSHOT_DRIVER_GUEST_DIR`, else `${XDG_CACHE_HOME:-~/.cache}/snapshot-driver/guest` (as the script). */
export function defaultGuestDir(): string {
  if (process.env.SNAPSHOT_DRIVER_GUEST_DIR) return process.env.SNAPSHOT_DRIVER_GUEST_DIR;
  const cache = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(cache, 'snapshot-driver', 'guest');
}

/** Reads the built guest's manifest; a clear error says how to build it when it is missing. */
export async function readGuestImage(dir = defaultGuestDir()): Promise<GuestImage> {
  const file = path.join(dir, 'manifest.json');
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    throw new Error(`no test guest in ${dir} (${(err as NodeJS.ErrnoException).code ?? 'unreadable'}): build it with scripts/guest-image.sh`);
  }
  const m = JSON.parse(text) as Record<string, unknown>;
  const str = (k: string): string => {
    if (typeof m[k] !== 'string' || m[k] === '') throw new Error(`${file}: "${k}" is missing; rebuild with scripts/guest-image.sh`);
    return m[k] as string;
  };
  if (str('root_disk_format') !== 'qcow2') throw new Error(`${file}: root_disk_format must be qcow2`);
  return {
    dir,
    kernel: str('kernel'),
    initrd: str('initrd'),
    rootDisk: str('root_disk'),
    rootDiskFormat: 'qcow2',
    cmdline: str('cmdline'),
    kernelVersion: str('kernel_version'),
  };
}

/** A fresh build takes well under a minute; a cached one under a second. */
const BUILD_TIMEOUT_MS = 10 * 60_000;

/** Runs `scripts/guest-image.sh` (idempotent, cached) and reads what it built. */
export async function buildGuestImage(script: string): Promise<GuestImage> {
  const res = await runProgram('bash', [script], { timeoutMs: BUILD_TIMEOUT_MS });
  if (res.code !== 0) throw new Error(`${script} failed (exit ${res.code}):\n${res.stderr.trim().split('\n').slice(-20).join('\n')}`);
  const dir = res.stdout.trim().split('\n').at(-1) ?? '';
  if (!path.isAbsolute(dir)) throw new Error(`${script} printed ${JSON.stringify(dir)}, expected the guest folder`);
  return readGuestImage(dir);
}
