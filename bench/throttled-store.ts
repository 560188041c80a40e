/**
 * A slow image store for the benchmark: an ext4 filesystem on a loop device whose backing file is a
 * qemu-storage-daemon FUSE export of a raw image behind a throttle filter. This machine has neither a
 * cgroup io controller nor device-mapper, so this is how a store gets a bandwidth cap here: writes
 * land in the page cache at memory speed and are written back at the cap, as on a slow NAS.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { runProgram } from '../src/util/exec.js';

const WRITEBACK_CACHE_BYTES = 64 * 2 ** 20;

export interface ThrottledStore {
  /** Where the filesystem is mounted. */
  mountpoint: string;
  close(): Promise<void>;
}

async function run(program: string, args: string[]): Promise<string> {
  const res = await runProgram(program, args, { timeoutMs: 120_000 });
  if (res.code !== 0) throw new Error(`${program} ${args.join(' ')} failed: ${res.stderr.trim() || `exit code ${res.code}`}`);
  return res.stdout.trim();
}

export async function throttledStore(dir: string, opts: { bytesPerSecond: number; sizeBytes: number }): Promise<ThrottledStore> {
  await fs.mkdir(dir, { recursive: true });
  const image = path.join(dir, 'store.raw');
  const exported = path.join(dir, 'export.raw');
  const mountpoint = path.join(dir, 'mnt');
  const pidfile = path.join(dir, 'qsd.pid');
  await fs.writeFile(image, '');
  await fs.truncate(image, opts.sizeBytes);
  await run('mkfs.ext4', ['-q', '-F', image]);
  await fs.writeFile(exported, '');
  await fs.mkdir(mountpoint);
  await run('qemu-storage-daemon', [
    '--blockdev', `file,node-name=store-file,filename=${image}`,
    '--object', `throttle-group,id=store-throttle,x-bps-total=${Math.round(opts.bytesPerSecond)}`,
    '--blockdev', 'throttle,node-name=store,throttle-group=store-throttle,file=store-file',
    '--export', `fuse,id=store-export,node-name=store,mountpoint=${exported},writable=on`,
    '--pidfile', pidfile,
    '--daemonize',
  ]);
  const loop = await run('losetup', ['--find', '--show', exported]);
  const bdi = path.join('/sys/class/bdi', (await fs.readFile(path.join('/sys/block', path.basename(loop), 'dev'), 'utf8')).trim());
  const maxBytesBefore = (await fs.readFile(path.join(bdi, 'max_bytes'), 'utf8')).trim();
  await fs.writeFile(path.join(bdi, 'strict_limit'), '1');
  await fs.writeFile(path.join(bdi, 'max_bytes'), String(WRITEBACK_CACHE_BYTES));
  await run('mount', [loop, mountpoint]);
  return {
    mountpoint,
    async close() {
      await run('umount', [mountpoint]).catch(() => undefined);
      await fs.writeFile(path.join(bdi, 'strict_limit'), '0').catch(() => undefined);
      await fs.writeFile(path.join(bdi, 'max_bytes'), maxBytesBefore).catch(() => undefined);
      await run('losetup', ['--detach', loop]).catch(() => undefined);
      const pid = Number((await fs.readFile(pidfile, 'utf8').catch(() => '')).trim());
      if (pid > 0) {
        try {
          process.kill(pid, 'SIGTERM');
        } catch {
          // gone already
        }
      }
      // A killed daemon can leave its FUSE mount behind.
      for (let i = 0; i < 50; i++) {
        const mounts = await fs.readFile('/proc/self/mounts', 'utf8');
        if (!mounts.includes(` ${exported} `)) break;
        await run('umount', [exported]).catch(() => undefined);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    },
  };
}
