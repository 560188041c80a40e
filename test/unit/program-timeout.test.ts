import fs from 'node:fs/promises';
import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ProgramTimeout } from '../../src/errors.js';
import { QemuImg, rateLimitedBoundMs } from '../../src/qemu-img/qemu-img.js';
import { runProgram } from '../../src/util/exec.js';

/**
 * Issue 12 item 4: every external program is bounded, the bound fires on a program that never ends
 * (no race: these programs wait forever), kills it with everything it started, and the error names
 * the program, the bound and the option.
 */

let tmp: DirectoryResult;

beforeEach(async () => {
  tmp = await dir({ unsafeCleanup: true });
});

afterEach(async () => {
  await tmp.cleanup();
});

/** An executable shell script in the temp dir. */
async function script(name: string, body: string): Promise<string> {
  const file = path.join(tmp.path, name);
  await fs.writeFile(file, `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return file;
}

/** Pids recorded by a script in `file`, one a line. */
async function pidsIn(file: string): Promise<number[]> {
  const text = await fs.readFile(file, 'utf8').catch(() => '');
  return text
    .split('\n')
    .filter((l) => l !== '')
    .map(Number);
}

/** True while the process exists and is not a zombie. */
async function alive(pid: number): Promise<boolean> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  if (stat === '') return false;
  const state = stat.charAt(stat.lastIndexOf(')') + 2);
  return state !== 'Z' && state !== 'X';
}

/** Waits until the script has written `n` pids (it has started its children). */
async function waitForPids(file: string, n: number): Promise<number[]> {
  for (;;) {
    const pids = await pidsIn(file);
    if (pids.length >= n) return pids;
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('runProgram bound', () => {
  it('stops a program that ignores SIGTERM, and the child it started, with SIGKILL after the grace; rejects with ProgramTimeout', async () => {
    const pidFile = path.join(tmp.path, 'pids');
    // Ignores SIGTERM (and so does its child, which inherits the ignored disposition), holds our
    // stdout pipe through the child, and never ends by itself.
    const hang = await script('hang', `trap '' TERM\necho $$ >> ${pidFile}\nsleep 100000 &\necho $! >> ${pidFile}\nwait`);
    const started = Date.now();
    const run = runProgram(hang, ['convert', 'a', 'b'], { timeoutMs: 100, killGraceMs: 100, timeoutOption: '[hypervisor] export_timeout' });
    const err = await run.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ProgramTimeout);
    const t = err as ProgramTimeout;
    expect(t.message).toBe(`${hang} convert did not finish within 100 ms ([hypervisor] export_timeout): killed`);
    expect(t.timeoutMs).toBe(100);
    expect(t.option).toBe('[hypervisor] export_timeout');
    expect(Date.now() - started).toBeGreaterThanOrEqual(200); // the bound, then the grace
    const pids = await waitForPids(pidFile, 2);
    for (const pid of pids) expect(await alive(pid), `process ${pid} of the program`).toBe(false);
  });

  it('a program that obeys SIGTERM is gone without waiting for the grace', async () => {
    const pidFile = path.join(tmp.path, 'pids');
    const hang = await script('hang', `echo $$ >> ${pidFile}\nexec sleep 100000`);
    const started = Date.now();
    await expect(runProgram(hang, [], { timeoutMs: 100, killGraceMs: 60_000 })).rejects.toThrow(
      `${hang} did not finish within 100 ms: killed`,
    );
    expect(Date.now() - started).toBeLessThan(30_000);
    for (const pid of await pidsIn(pidFile)) expect(await alive(pid)).toBe(false);
  });

  it('a program that ends within its bound resolves as before', async () => {
    const ok = await script('ok', 'echo out; echo err >&2; exit 3');
    expect(await runProgram(ok, [], { timeoutMs: 60_000 })).toEqual({ stdout: 'out\n', stderr: 'err\n', code: 3 });
  });
});

describe('QemuImg bounds', () => {
  /** A qemu-img that never answers. */
  async function hangingQemuImg(): Promise<string> {
    return script('qemu-img', 'exec sleep 100000');
  }

  it('convert is bounded by [hypervisor] export_timeout', async () => {
    const img = new QemuImg(await hangingQemuImg(), { exportMs: 150, killGraceMs: 100 });
    const err = await img.convertToRaw('/nonexistent/disk', path.join(tmp.path, 'out.raw')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ProgramTimeout);
    expect((err as Error).message).toMatch(/qemu-img convert did not finish within 150 ms \(\[hypervisor\] export_timeout\): killed$/);
  });

  it('the copy of a live backup (convert from NBD) is bounded by export_timeout', async () => {
    const img = new QemuImg(await hangingQemuImg(), { exportMs: 150, killGraceMs: 100 });
    await expect(img.convertNbdToRaw('nbd+unix:///x?socket=/nonexistent', path.join(tmp.path, 'out.raw'))).rejects.toThrow(
      /qemu-img convert did not finish within 150 ms \(\[hypervisor\] export_timeout\)/,
    );
  });

  it("a rate-limited copy is bounded by what its limit needs for the export's size when export_timeout is shorter", async () => {
    expect(rateLimitedBoundMs(150, undefined, 1 << 30)).toBe(150);
    expect(rateLimitedBoundMs(150, 1 << 20, undefined)).toBe(150);
    expect(rateLimitedBoundMs(3_600_000, 100 * 2 ** 20, 1 << 30)).toBe(3_600_000);
    // 1 TiB at 100 MiB/s: 10486 s, and a quarter more.
    expect(rateLimitedBoundMs(3_600_000, 100 * 2 ** 20, 2 ** 40)).toBe(13_107_200);
    const img = new QemuImg(await hangingQemuImg(), { exportMs: 150, killGraceMs: 100 });
    // 256 KiB at 1 MiB/s: 250 ms, and a quarter more.
    await expect(
      img.convertNbdToRaw('nbd+unix:///x?socket=/nonexistent', path.join(tmp.path, 'out.raw'), { rateLimit: 1 << 20, sizeBytes: 256 << 10 }),
    ).rejects.toThrow(/qemu-img convert did not finish within 313 ms \(\[hypervisor\] export_timeout, lengthened to what the copy's rate limit needs\)/);
  });

  it("a rate-limited export of an image is bounded by what its limit needs for the image's virtual size", async () => {
    const img = new QemuImg(await hangingQemuImg(), { exportMs: 150, killGraceMs: 100 });
    // 256 KiB at 1 MiB/s: 250 ms, and a quarter more.
    const opts = { forceShare: true, snapshotName: 's', rateLimit: 1 << 20, sizeBytes: 256 << 10 };
    await expect(img.convertToRaw('/x.qcow2', path.join(tmp.path, 'out.raw'), opts)).rejects.toThrow(
      /qemu-img convert did not finish within 313 ms \(\[hypervisor\] export_timeout, lengthened to what the copy's rate limit needs\)/,
    );
  });

  it('info, check and create are bounded by [hypervisor] qemu_img_timeout', async () => {
    const img = new QemuImg(await hangingQemuImg(), { quickMs: 120, killGraceMs: 100 });
    for (const call of [
      () => img.info('/x'),
      () => img.snapshotList('/x'),
      () => img.check('/x'),
      () => img.create(path.join(tmp.path, 'n.qcow2'), { sizeBytes: 1 << 20 }),
    ]) {
      const err = await call().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ProgramTimeout);
      expect((err as ProgramTimeout).option).toBe('[hypervisor] qemu_img_timeout');
      expect((err as ProgramTimeout).timeoutMs).toBe(120);
    }
  });

  it('offline snapshot create and delete are bounded by [hypervisor] job_timeout', async () => {
    const img = new QemuImg(await hangingQemuImg(), { snapshotMs: 130, killGraceMs: 100 });
    await expect(img.snapshotCreate('/x', 's')).rejects.toThrow(/qemu-img snapshot did not finish within 130 ms \(\[hypervisor\] job_timeout\)/);
    await expect(img.snapshotDelete('/x', 's')).rejects.toThrow(/\(\[hypervisor\] job_timeout\)/);
  });

  it('has a bound by default (the config defaults)', () => {
    expect(new QemuImg().bounds).toEqual({ quickMs: 120_000, snapshotMs: 600_000, exportMs: 3_600_000 });
  });
});
