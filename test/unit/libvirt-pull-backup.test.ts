import path from 'node:path';
import { dir } from 'tmp-promise';
import { describe, expect, it } from 'vitest';
import { startPullBackup } from '../../src/hypervisor/libvirt/backup.js';
import type { Virsh } from '../../src/hypervisor/libvirt/virsh.js';
import { silentLogger } from '../../src/log.js';
import type { QemuImg } from '../../src/qemu-img/qemu-img.js';

/**
 * libvirt's `live` copy: the pull job's NBD export read by `qemu-img convert`, at the rate limit
 * `[hypervisor] running_export_rate_mb` gives (real runs: libvirt-live-store.test.ts and the strategy
 * matrix; here only what reaches qemu-img, on fakes).
 */

type ConvertOptions = Parameters<QemuImg['convertNbdToRaw']>[2];

async function copyOptions(speed: number | undefined): Promise<{ uri: string; opts: ConvertOptions; virsh: string[][] }> {
  const tmp = await dir({ unsafeCleanup: true, prefix: 'sdl-pull-' });
  try {
    const calls: string[][] = [];
    const virsh = {
      runTimed: async (args: readonly string[]) => {
        calls.push([...args]);
        return { stdout: '', commandMs: 3 };
      },
      run: async (args: readonly string[]) => {
        calls.push([...args]);
        return '';
      },
    } as unknown as Virsh;
    let seen: { uri: string; opts: ConvertOptions } | undefined;
    const qemuImg = {
      convertNbdToRaw: async (uri: string, _dest: unknown, opts: ConvertOptions) => {
        seen = { uri, opts };
      },
    } as unknown as QemuImg;
    const domain = { name: 'd', uuid: '6a1b0c52-50a4-4a42-9d6c-0fd0d11c1d2f', rootDisk: { path: '/var/lib/d/disk.qcow2', target: 'vda' }, otherDisks: [] };
    const job = await startPullBackup({ virsh, qemuImg, log: silentLogger(), speed }, domain, 4 * 2 ** 30, path.join(tmp.path, 'img.raw'));
    await job.wait();
    if (seen === undefined) throw new Error('the job never started its copy');
    return { ...seen, virsh: calls };
  } finally {
    await tmp.cleanup();
  }
}

describe('libvirt pull backup: the copy', () => {
  it("is rate limited when a speed is set, bounded for the disk's size, at the background priority, and the job is ended after it", async () => {
    const { uri, opts, virsh } = await copyOptions(100 * 2 ** 20);
    expect(uri).toMatch(/^nbd\+unix:\/\/\/vda\?socket=.*img\.raw\.nbd$/);
    // With the disk's size: the copy's bound is at least what the limit needs (rateLimitedBoundMs).
    expect(opts).toMatchObject({ rateLimit: 100 * 2 ** 20, sizeBytes: 4 * 2 ** 30, background: true });
    expect(virsh.map((a) => a[0])).toEqual(['backup-begin', 'domjobabort']);
  });

  it('is unlimited with speed 0 or none', async () => {
    expect((await copyOptions(0)).opts?.rateLimit).toBeUndefined();
    expect((await copyOptions(undefined)).opts?.rateLimit).toBeUndefined();
  });
});
