/**
 * Issue 12 item 1 and the migration's job timeout, on real QEMU (7.2, TCG, OS-less guests):
 *
 * - A resume's final `cont` really fails: a resume is an incoming migration, whose new QEMU holds the
 *   disk inactive (no image lock) until the vCPUs first run; `cont` then activates the disk and takes
 *   its write lock. Another process holding the qcow2 read-write meanwhile (here `qemu-io`, opened on
 *   the disk while the guest is managed-saved) makes it fail with `Failed to get "write" lock`: the
 *   state is loaded, its file gone, the guest paused. The snapshot fails, the guest is asked to run
 *   again and cannot, so the failure is an undo error and the operation's record stays in the
 *   journal; once the other process lets go, recovery runs the guest.
 * - A managed save whose migration cannot finish (its destination, our end of the stream, never reads)
 *   is bounded by `[hypervisor] job_timeout`: cancelled (`migrate_cancel`), the guest running again.
 *   The migration can never complete, so the test does not depend on how fast anything is.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir } from 'tmp-promise';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildRuntime, type Runtime } from '../../src/service/runtime.js';
import { recoveryDeps } from '../../src/service/startup-recovery.js';
import type { StrategyName } from '../../src/config/schema.js';
import { SnapshotFailed } from '../../src/errors.js';
import { InstanceLayout } from '../../src/hypervisor/qemu/layout.js';
import { MigrationTimeout } from '../../src/errors.js';
import { QemuHypervisor } from '../../src/hypervisor/qemu/qemu-hypervisor.js';
import { silentLogger } from '../../src/log.js';
import { QemuImg } from '../../src/qemu-img/qemu-img.js';
import { recoverOperations } from '../../src/snapshot/recovery.js';
import type { BeforeStep } from '../../src/snapshot/run-steps.js';
import { GuestLeftPaused } from '../../src/errors.js';
import { assertQemuInstalled, guestDiskHasPattern, guestWrite, killQemuUnder, MiB, QEMU_BINARY, QEMU_IMG, QEMU_IO } from '../helpers/qemu-guest.js';
import { tempDirsConfig } from '../helpers/temp-config.js';

const PREFIX = 'snapdrv-';
const PATTERN = { value: 0x3c, offset: 4 * MiB, len: MiB };

let base: string;
let rt: Runtime;
let hv: QemuHypervisor;
let beforeStep: BeforeStep | undefined;
const holders: ChildProcessWithoutNullStreams[] = [];

beforeAll(async () => {
  await assertQemuInstalled();
  base = (await dir({ prefix: 'sdc-' })).path;
  const config = tempDirsConfig(base, { shutdownTimeoutS: 1 });
  rt = buildRuntime(config, silentLogger(), { beforeStep: (step, i) => beforeStep?.(step, i) });
  hv = rt.qemu!;
});

afterAll(async () => {
  for (const h of holders) h.kill('SIGKILL');
  await killQemuUnder(base);
  await fs.rm(base, { recursive: true, force: true });
});

async function newGuest(opts: { memoryMb?: number; memoryFile?: string } = {}): Promise<string> {
  const uuid = randomUUID();
  await hv.createInstance({ uuid, name: `c-${uuid.slice(0, 8)}`, memoryMb: opts.memoryMb ?? 128, vcpus: 1, machine: 'pc', diskSizeBytes: 64 * MiB, memoryFile: opts.memoryFile });
  await rt.lifecycle.start(uuid);
  return uuid;
}

/**
 * Opens `disk` read-write in a `qemu-io` that waits at its prompt, holding the image's write lock;
 * resolves once the image is open (the prompt is printed after it). Fails loudly if qemu-io cannot.
 */
async function holdDisk(disk: string): Promise<{ release(): Promise<void> }> {
  const io = spawn(QEMU_IO, ['-f', 'qcow2', disk]);
  holders.push(io);
  let out = '';
  await new Promise<void>((resolve, reject) => {
    const onData = (d: Buffer) => {
      out += d.toString();
      if (out.includes('qemu-io>')) resolve();
    };
    io.stdout.on('data', onData);
    io.stderr.on('data', onData);
    io.once('exit', (code) => reject(new Error(`qemu-io on ${disk} exited (${code}) before holding it: ${out}`)));
    io.once('error', reject);
  });
  return {
    async release() {
      const exited = once(io, 'exit');
      io.stdin.end('quit\n');
      await exited;
    },
  };
}

async function runState(uuid: string): Promise<string> {
  return (await hv.qmp<{ status: string }>(uuid, 'query-status')).status;
}

describe("a resume whose cont fails on real QEMU (another process holds the disk's write lock)", () => {
  it.each(['cold', 'suspend-create-resume-extract'] as StrategyName[])(
    '%s: the guest is left paused only as an undo error; the record stays, and recovery runs the guest once the lock is gone',
    async (strategy) => {
      const uuid = await newGuest();
      await guestWrite(hv, uuid, PATTERN.value, PATTERN.offset, PATTERN.len);
      const disk = (await hv.diskInfo(uuid)).path;
      let holder: { release(): Promise<void> } | undefined;
      beforeStep = async (step) => {
        // The guest is managed-saved now: no QEMU holds the disk, so qemu-io gets its lock.
        if (step.name === 'resume' && holder === undefined) holder = await holdDisk(disk);
      };
      const imageId = randomUUID();
      const err = await rt.engine.take({ requestId: `req-${imageId}`, instanceUuid: uuid, imageId, strategy }).then(
        () => undefined,
        (e: unknown) => e,
      );
      beforeStep = undefined;
      expect(holder).toBeDefined();
      expect(err).toBeInstanceOf(SnapshotFailed);
      const failure = err as SnapshotFailed;
      expect(failure.message).toMatch(/resume.*Failed to get "write" lock/);
      expect(failure.undoErrors.some((u) => u instanceof GuestLeftPaused)).toBe(true);
      // Loaded (the state file is gone), paused: a new process, not a saved guest.
      expect((await hv.info(uuid)).state).toBe('paused');
      expect(await runState(uuid)).toBe('paused');
      const layout = new InstanceLayout(path.join(base, 'i'), uuid);
      await expect(fs.access(layout.saveState)).rejects.toThrow(/ENOENT/);
      const records = await rt.operations.list();
      expect(records.map((r) => r.image_id)).toEqual([imageId]);
      expect((await rt.store.show(imageId)).status).toBe('killed');
      // A snapshot of ours still on the disk is one the paused QEMU could not delete: recorded pending.
      // (Asked to, QEMU 7.2 dies: its disk is inactive. The backend refuses instead, and the QEMU lives.)
      const ours = (await hv.listInternalSnapshots(uuid)).map((s) => s.name).filter((n) => n.startsWith(PREFIX));
      expect(ours).toEqual(strategy === 'cold' ? [] : [`${PREFIX}${imageId}`]);
      for (const name of ours) {
        expect(await rt.pending.list(uuid)).toContain(name);
        await expect(hv.liveSnapshotDelete(uuid, name)).rejects.toThrow(/is inactive in its QEMU/);
      }
      expect(await runState(uuid)).toBe('paused');

      // While the lock is held, recovery cannot run the guest either: it says so and keeps the record.
      const deps = { ...recoveryDeps(rt), ownerRunning: async () => false };
      const [early] = await recoverOperations(deps, uuid);
      expect(early!.error).toMatch(/write" lock/);
      expect(await rt.operations.list()).toHaveLength(1);
      expect(await runState(uuid)).toBe('paused');

      await holder!.release();
      const [res] = await recoverOperations(deps, uuid);
      expect(res!.error).toBeUndefined();
      expect(res).toMatchObject({ image_id: imageId, guest_found: 'paused', guest_now: 'running', image: 'killed' });
      expect(await runState(uuid)).toBe('running');
      expect(await rt.operations.list()).toEqual([]);
      expect((await hv.listInternalSnapshots(uuid)).filter((s) => s.name.startsWith(PREFIX))).toEqual([]);
      expect(await rt.pending.list(uuid)).toEqual([]);
      // The guest's disk is as it wrote it, and sound.
      expect(await guestDiskHasPattern(hv, uuid, PATTERN.value, PATTERN.offset, PATTERN.len)).toBe(true);
      expect(await rt.qemuImg.check(disk, { forceShare: true })).toMatchObject({ clean: true, corruptions: 0, leaks: 0 });
      // And usable: the next snapshot completes.
      const next = await rt.engine.take({ requestId: 'req-next', instanceUuid: uuid, imageId: randomUUID(), strategy });
      expect(next.status).toBe('active');
      expect(await runState(uuid)).toBe('running');
    },
  );
});

describe('a managed save whose migration cannot finish is bounded by [hypervisor] job_timeout', () => {
  it('cancelled with migrate_cancel, the guest running again, nothing left of the save', async () => {
    // Random RAM: the stream is far larger than the socket's buffers, so QEMU itself is held.
    const ramFile = path.join(base, 'ram.bin');
    const ramMb = 64;
    const fh = await fs.open(ramFile, 'w');
    for (let i = 0; i < ramMb; i++) await fh.write(randomBytes(MiB));
    await fh.close();
    const uuid = await newGuest({ memoryMb: ramMb, memoryFile: ramFile });
    let connected = false;
    const stalling = new QemuHypervisor({
      instancesPath: path.join(base, 'i'),
      qemuBinary: QEMU_BINARY,
      qemuImg: new QemuImg(QEMU_IMG),
      accel: 'tcg',
      shutdownTimeoutMs: 1000,
      qmpTimeoutMs: 10_000,
      log: silentLogger(),
      jobTimeoutMs: 300,
      // The destination never reads the stream (until it is closed).
      beforeReadingSaveStream: (socket) => {
        connected = true;
        return new Promise<void>((resolve) => socket.once('close', () => resolve()));
      },
    });
    const err = await stalling.managedSave(uuid).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(connected).toBe(true);
    expect(err).toBeInstanceOf(MigrationTimeout);
    expect(String(err)).toMatch(/save migration did not complete within 300 ms \(\[hypervisor\] job_timeout\)/);
    expect((await hv.info(uuid)).state).toBe('running');
    expect(await runState(uuid)).toBe('running');
    // It was still under way when the timeout fired: cancelled, not completed.
    expect((await hv.qmp<{ status?: string }>(uuid, 'query-migrate')).status).toBe('cancelled');
    const layout = new InstanceLayout(path.join(base, 'i'), uuid);
    for (const f of [layout.saveState, layout.saveStatePartial, layout.saveMeta, layout.saveSocket]) {
      await expect(fs.access(f), f).rejects.toThrow(/ENOENT/);
    }
    // With a destination that reads, the same guest saves and resumes.
    await hv.managedSave(uuid);
    expect((await hv.info(uuid)).state).toBe('saved');
    await hv.resume(uuid);
    expect(await runState(uuid)).toBe('running');
  });
});
