import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ConfigError,
  InstanceExists,
  InstanceInvalidState,
  InstanceNotFound,
  InvalidInstanceId,
  QemuImgError,
  QemuProcessError,
  SafetyViolation,
} from '../../src/errors.js';
import { defaultConfig } from '../../src/config/schema.js';
import { QemuHypervisor, fromConfig } from '../../src/hypervisor/qemu/qemu-hypervisor.js';
import { QmpClient } from '../../src/hypervisor/qemu/qmp.js';
import { silentLogger } from '../../src/log.js';
import { QemuImg } from '../../src/qemu-img/qemu-img.js';
import {
  MiB,
  QEMU_BINARY,
  QEMU_IMG,
  crashGuest,
  createGuest,
  guestDiskHasPattern,
  guestPid,
  guestWrite,
  makeQemuEnv,
  processAlive,
  qcow2HasPattern,
  type QemuEnv,
} from '../helpers/qemu-guest.js';

async function exists(p: string): Promise<boolean> {
  return fs.access(p).then(
    () => true,
    () => false,
  );
}

/** One real TCG guest (128 MiB, no OS) is reused through the file; the tests run in order. */
describe('qemu backend against real QEMU', () => {
  let env: QemuEnv;
  let hv: QemuHypervisor;
  let uuid: string;
  let dir: string;

  beforeAll(async () => {
    env = await makeQemuEnv();
    hv = env.hv;
    uuid = await createGuest(hv, { name: 'guest, one' });
    dir = path.join(env.instancesPath, uuid);
  });

  afterAll(async () => {
    await env?.cleanup();
  });

  it('creates and starts a guest: layout on disk, running process', async () => {
    expect(await hv.info(uuid)).toEqual({ uuid, name: 'guest, one', state: 'running' });
    expect(await hv.list()).toEqual([{ uuid, name: 'guest, one', state: 'running' }]);
    expect(JSON.parse(await fs.readFile(path.join(dir, 'instance.json'), 'utf8'))).toEqual({
      uuid,
      name: 'guest, one',
      memory_mb: 128,
      vcpus: 1,
      machine: 'pc',
    });
    const disk = await hv.diskInfo(uuid);
    expect(disk).toMatchObject({ path: path.join(dir, 'disk'), virtualSize: 64 * MiB });
    expect((await env.qemuImg.info(disk.path, { forceShare: true })).format).toBe('qcow2');
    const pid = await guestPid(env.instancesPath, uuid);
    expect(pid).toBeDefined();
    const argv = (await fs.readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0');
    expect(argv).toContain(uuid);
    expect(argv).toContain('guest=guest,, one');
    expect(await exists(path.join(dir, 'qmp.sock'))).toBe(true);
    expect(await hv.qmp(uuid, 'query-name')).toEqual({ name: 'guest, one' });
    // The guest agent channel: a virtio-serial port on a unix socket QEMU listens on.
    expect(argv).toContain(`socket,id=qga0,path=${path.join(dir, 'qga.sock')},server=on,wait=off`);
    expect(argv.some((a) => a.startsWith('virtserialport,') && a.endsWith(',name=org.qemu.guest_agent.0'))).toBe(true);
    expect((await fs.stat(path.join(dir, 'qga.sock'))).isSocket()).toBe(true);
  });

  it('pauses and unpauses', async () => {
    await hv.pause(uuid);
    expect((await hv.info(uuid)).state).toBe('paused');
    await expect(hv.pause(uuid)).rejects.toBeInstanceOf(InstanceInvalidState);
    await hv.unpause(uuid);
    expect((await hv.info(uuid)).state).toBe('running');
    await expect(hv.unpause(uuid)).rejects.toBeInstanceOf(InstanceInvalidState);
  });

  it('managed-saves a running guest (process gone, state file) and resumes it running, disk data intact', async () => {
    await guestWrite(hv, uuid, 0x77, 1 * MiB, 1 * MiB);
    const pid = (await guestPid(env.instancesPath, uuid))!;

    const beforeSave = Date.now();
    const res = await hv.managedSave(uuid);
    expect(res.priorState).toBe('running');
    expect(res.bytes).toBeGreaterThan(0);
    // From the STOP event, stamped by QEMU's wall clock.
    expect(res.vcpusStoppedAt).toBeGreaterThanOrEqual(beforeSave);
    expect(res.vcpusStoppedAt).toBeLessThan(Date.now() + 1); // event times carry microseconds, Date.now() whole ms
    expect(res.bytes).toBe((await fs.stat(path.join(dir, 'managed-save.state'))).size);
    expect(JSON.parse(await fs.readFile(path.join(dir, 'managed-save.json'), 'utf8'))).toEqual({
      prior_state: 'running',
      bytes: res.bytes,
    });
    expect(await processAlive(pid)).toBe(false);
    expect(await exists(path.join(dir, 'qemu.pid'))).toBe(false);
    expect(await exists(path.join(dir, 'qga.sock'))).toBe(false);
    expect(await exists(path.join(dir, 'managed-save.state.partial'))).toBe(false);
    expect((await hv.info(uuid)).state).toBe('saved');
    // The save flushed the guest's write to the file.
    expect(await qcow2HasPattern(path.join(dir, 'disk'), 0x77, 1 * MiB, 1 * MiB)).toBe(true);
    await expect(hv.start(uuid)).rejects.toBeInstanceOf(InstanceInvalidState);

    const seen: string[] = [];
    const { state, vcpusResumedAt } = await hv.resume(uuid, {
      beforeLaunch: async (u) => {
        seen.push(`${u}:${(await hv.info(u)).state}`);
      },
    });
    expect(seen).toEqual([`${uuid}:saved`]);
    expect(state).toBe('running');
    expect(vcpusResumedAt).toBeGreaterThan(res.vcpusStoppedAt!);
    expect(vcpusResumedAt).toBeLessThan(Date.now() + 1);
    expect((await hv.info(uuid)).state).toBe('running');
    expect(await exists(path.join(dir, 'managed-save.state'))).toBe(false);
    expect(await exists(path.join(dir, 'managed-save.json'))).toBe(false);
    const newPid = await guestPid(env.instancesPath, uuid);
    expect(newPid).not.toBe(pid);

    // The resumed QEMU has the disk: it sees the old data and can write new data.
    await guestWrite(hv, uuid, 0x55, 2 * MiB, 1 * MiB);
    expect(await guestDiskHasPattern(hv, uuid, 0x77, 1 * MiB, 1 * MiB)).toBe(true);
    expect(await guestDiskHasPattern(hv, uuid, 0x55, 2 * MiB, 1 * MiB)).toBe(true);
    // The check is not vacuous.
    expect(await guestDiskHasPattern(hv, uuid, 0x78, 1 * MiB, 1 * MiB)).toBe(false);
  });

  it('managed-saves a paused guest and resumes it paused, RAM the same', async () => {
    await hv.pause(uuid);
    const before = path.join(env.tmpPath, 'ram-before');
    const after = path.join(env.tmpPath, 'ram-after');
    await hv.qmp(uuid, 'pmemsave', { val: 0, size: 128 * MiB, filename: before });

    const res = await hv.managedSave(uuid);
    expect(res.priorState).toBe('paused');
    // Its vCPUs were stopped already, and stay so.
    expect(res.vcpusStoppedAt).toBeUndefined();
    expect((await hv.info(uuid)).state).toBe('saved');

    expect(await hv.resume(uuid)).toEqual({ state: 'paused' });
    expect((await hv.info(uuid)).state).toBe('paused');
    await hv.qmp(uuid, 'pmemsave', { val: 0, size: 128 * MiB, filename: after });
    // Compared apart from the legacy hole 0xA0000-0xFFFFF: how QEMU maps the BIOS shadow there
    // after a migration (PAM) is its business, and what pmemsave reads of it may differ.
    const [a, b] = [await fs.readFile(before), await fs.readFile(after)];
    expect(a.length).toBe(128 * MiB);
    expect(b.subarray(0, 0xa0000).equals(a.subarray(0, 0xa0000))).toBe(true);
    expect(b.subarray(0x100000).equals(a.subarray(0x100000))).toBe(true);
    // Not vacuous: the BIOS left data in low memory.
    expect(a.subarray(0, 0xa0000).some((x) => x !== 0)).toBe(true);
    await fs.rm(before);
    await fs.rm(after);

    await hv.unpause(uuid);
    expect((await hv.info(uuid)).state).toBe('running');
  });

  it('a resume that fails ends the new process and keeps the saved state', async () => {
    await hv.managedSave(uuid);
    const state = path.join(dir, 'managed-save.state');
    const good = path.join(env.tmpPath, 'state.good');
    await fs.copyFile(state, good);
    const { size } = await fs.stat(state);
    await fs.truncate(state, Math.floor(size / 2));

    await expect(hv.resume(uuid)).rejects.toThrow();
    expect((await hv.info(uuid)).state).toBe('saved');
    expect(await exists(path.join(dir, 'managed-save.json'))).toBe(true);
    expect(await guestPid(env.instancesPath, uuid)).toBeUndefined();

    await fs.copyFile(good, state);
    expect((await hv.resume(uuid)).state).toBe('running');
    expect(await guestDiskHasPattern(hv, uuid, 0x55, 2 * MiB, 1 * MiB)).toBe(true);
  });

  it('creates, reads and deletes an internal snapshot through the running QEMU', async () => {
    await hv.liveSnapshotCreate(uuid, 'snap-live');
    expect((await hv.listInternalSnapshots(uuid)).map((s) => s.name)).toEqual(['snap-live']);

    // Overwrite after the snapshot: the export must still show the data as of the snapshot.
    await guestWrite(hv, uuid, 0x11, 1 * MiB, 1 * MiB);
    const dest = path.join(env.tmpPath, 'export.raw');
    await hv.exportDisk(uuid, { snapshotName: 'snap-live', dest });
    const raw = await fs.readFile(dest);
    expect(raw.length).toBe(64 * MiB);
    expect(raw.subarray(1 * MiB, 2 * MiB).every((b) => b === 0x77)).toBe(true);
    expect(raw.subarray(2 * MiB, 3 * MiB).every((b) => b === 0x55)).toBe(true);
    await fs.rm(dest);

    await hv.liveSnapshotDelete(uuid, 'snap-live');
    expect(await hv.listInternalSnapshots(uuid)).toEqual([]);
    await guestWrite(hv, uuid, 0x77, 1 * MiB, 1 * MiB);
  });

  it('refuses offline snapshot changes and active-layer exports while QEMU holds the disk (SafetyViolation)', async () => {
    await expect(hv.offlineSnapshotCreate(uuid, 'nope')).rejects.toBeInstanceOf(SafetyViolation);
    await expect(hv.offlineSnapshotDelete(uuid, 'nope')).rejects.toBeInstanceOf(SafetyViolation);
    const dest = path.join(env.tmpPath, 'nope.raw');
    await expect(hv.exportDisk(uuid, { dest })).rejects.toBeInstanceOf(SafetyViolation);
    expect(await exists(dest)).toBe(false);
    expect(await hv.listInternalSnapshots(uuid)).toEqual([]);
  });

  it('real QEMU itself refuses qemu-img snapshot -c on a running guest\'s disk (the "write" lock)', async () => {
    const err = await new QemuImg(QEMU_IMG).snapshotCreate(path.join(dir, 'disk'), 'direct').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QemuImgError);
    expect((err as Error).message).toContain('"write" lock');
    expect(await hv.listInternalSnapshots(uuid)).toEqual([]);
  });

  it('re-attaches: a second hypervisor object (from the config) on the same dir sees the guest and controls it', async () => {
    const base = defaultConfig();
    const other = fromConfig({ ...base, DEFAULT: { ...base.DEFAULT, instances_path: env.instancesPath } }, silentLogger());
    expect(other.instancesPath).toBe(env.instancesPath);
    expect(await other.info(uuid)).toEqual({ uuid, name: 'guest, one', state: 'running' });
    await other.pause(uuid);
    expect((await hv.info(uuid)).state).toBe('paused');
    await other.unpause(uuid);
    expect((await hv.info(uuid)).state).toBe('running');
  });

  it('QMP is connected per operation: another client holding the monitor only delays an operation', async () => {
    // Overlapping operations of one object share a connection.
    const states = await Promise.all([hv.info(uuid), hv.info(uuid), hv.qmp(uuid, 'query-status')]);
    expect(states.slice(0, 2).map((i) => (i as { state: string }).state)).toEqual(['running', 'running']);
    expect(states[2]).toMatchObject({ status: 'running' });

    const holder = await QmpClient.connect(path.join(dir, 'qmp.sock'), { timeoutMs: 5000 });
    let released = false;
    setTimeout(() => {
      released = true;
      void holder.close();
    }, 300);
    const info = await env.newHypervisor().info(uuid);
    expect(released).toBe(true);
    expect(info.state).toBe('running');
  });

  it('a managed save that fails after the migration leaves the guest running, files cleaned up', async () => {
    // A directory where the state file goes makes the final rename fail.
    const obstacle = path.join(dir, 'managed-save.state');
    await fs.mkdir(path.join(obstacle, 'x'), { recursive: true });
    await expect(hv.managedSave(uuid)).rejects.toThrow(/rename/);
    await fs.rm(obstacle, { recursive: true });

    expect((await hv.info(uuid)).state).toBe('running');
    expect(await exists(path.join(dir, 'managed-save.state.partial'))).toBe(false);
    expect(await exists(path.join(dir, 'managed-save.json'))).toBe(false);
    expect(await exists(path.join(dir, 'save.sock'))).toBe(false);
    // The disk is back in the QEMU's hands (migration had handed it over): writes and QMP snapshots work.
    await guestWrite(hv, uuid, 0x66, 3 * MiB, 1 * MiB);
    expect(await guestDiskHasPattern(hv, uuid, 0x66, 3 * MiB, 1 * MiB)).toBe(true);
    await hv.liveSnapshotCreate(uuid, 'after-failed-save');
    await hv.liveSnapshotDelete(uuid, 'after-failed-save');

    // A paused guest stays paused.
    await hv.pause(uuid);
    await fs.mkdir(path.join(obstacle, 'x'), { recursive: true });
    await expect(hv.managedSave(uuid)).rejects.toThrow();
    await fs.rm(obstacle, { recursive: true });
    expect((await hv.info(uuid)).state).toBe('paused');
    await hv.unpause(uuid);
  });

  it('a QEMU that exits by itself (as on a guest power-off) leaves no pidfile: shutoff, not crashed', async () => {
    const pid = (await guestPid(env.instancesPath, uuid))!;
    await hv.qmp(uuid, 'quit').catch(() => undefined);
    while (await processAlive(pid)) await new Promise((r) => setTimeout(r, 20));
    expect(await exists(path.join(dir, 'qemu.pid'))).toBe(false);
    expect((await hv.info(uuid)).state).toBe('shutoff');
    await hv.start(uuid);
    expect((await hv.info(uuid)).state).toBe('running');
  });

  it('a graceful stop of a guest that ignores ACPI is forced after the shutdown timeout', async () => {
    const pid = (await guestPid(env.instancesPath, uuid))!;
    await env.newHypervisor({ shutdownTimeoutMs: 300 }).stop(uuid, { graceful: true });
    expect((await hv.info(uuid)).state).toBe('shutoff');
    expect(await processAlive(pid)).toBe(false);
    expect(await exists(path.join(dir, 'qemu.pid'))).toBe(false);
    await expect(hv.stop(uuid, { graceful: false })).rejects.toBeInstanceOf(InstanceInvalidState);
    await expect(hv.liveSnapshotCreate(uuid, 'x')).rejects.toBeInstanceOf(InstanceInvalidState);
  });

  it('works on the offline disk with qemu-img while shut off', async () => {
    await hv.offlineSnapshotCreate(uuid, 'snap-off');
    expect((await hv.listInternalSnapshots(uuid)).map((s) => s.name)).toEqual(['snap-off']);
    await hv.offlineSnapshotDelete(uuid, 'snap-off');
    expect(await hv.listInternalSnapshots(uuid)).toEqual([]);

    const dest = path.join(env.tmpPath, 'offline.raw');
    const progress: number[] = [];
    await hv.exportDisk(uuid, { dest, onProgress: (f) => progress.push(f) });
    const raw = await fs.readFile(dest);
    expect(raw.subarray(1 * MiB, 2 * MiB).every((b) => b === 0x77)).toBe(true);
    expect(progress.at(-1)).toBe(1);
    await fs.rm(dest);
  });

  it('a QEMU killed with SIGKILL is crashed; start brings it back running', async () => {
    await hv.start(uuid);
    expect((await hv.info(uuid)).state).toBe('running');
    await crashGuest(env.instancesPath, uuid);
    expect((await hv.info(uuid)).state).toBe('crashed');

    const seen: string[] = [];
    await hv.start(uuid, {
      beforeLaunch: async (u) => {
        seen.push((await hv.info(u)).state);
      },
    });
    expect(seen).toEqual(['crashed']);
    expect((await hv.info(uuid)).state).toBe('running');
    // No OS: the ACPI power button goes unanswered, the soft reboot says so (the caller hard reboots).
    expect(await hv.softReboot(uuid, { waitMs: 200 })).toBe(false);
    expect((await hv.info(uuid)).state).toBe('running');
  });

  it('a status query while the QEMU process is going (its monitor socket already gone) waits for it to go instead of failing', async () => {
    expect((await hv.info(uuid)).state).toBe('running');
    const layoutDir = path.join(env.instancesPath, uuid);
    const pid = Number((await fs.readFile(path.join(layoutDir, 'qemu.pid'), 'utf8')).trim());
    // As after a managed save's `quit`: the monitor is gone, the process is still there for a while.
    await fs.rm(path.join(layoutDir, 'qmp.sock'));
    const asked = hv.info(uuid);
    const stopped = new Promise((resolve) => setTimeout(resolve, 300)).then(() => process.kill(pid, 'SIGKILL'));
    await stopped;
    expect((await asked).state).toBe('crashed'); // SIGKILL left its pidfile
    await hv.start(uuid);
    expect((await hv.info(uuid)).state).toBe('running');
  });

  it('a failed launch surfaces QEMU\'s stderr', async () => {
    const bad = randomUUID();
    await hv.createInstance({ uuid: bad, name: 'bad', memoryMb: 128, vcpus: 1, machine: 'no-such-machine', diskSizeBytes: MiB });
    const err = await hv.start(bad).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QemuProcessError);
    expect((err as Error).message).toContain(`QEMU of instance ${bad} failed to start`);
    expect((err as Error).message).toContain('unsupported machine type');
    expect((await hv.info(bad)).state).toBe('shutoff');
    await hv.deleteInstance(bad);
  });

  it('rejects bad input with clear errors', async () => {
    const unknown = randomUUID();
    await expect(hv.info(unknown)).rejects.toBeInstanceOf(InstanceNotFound);
    await expect(hv.start(unknown)).rejects.toBeInstanceOf(InstanceNotFound);
    await expect(hv.info('not-a-uuid')).rejects.toBeInstanceOf(InvalidInstanceId);
    await expect(hv.managedSave('../etc')).rejects.toThrow(/invalid instance uuid "\.\.\/etc"/);
    await expect(
      hv.createInstance({ uuid, name: 'dup', memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: MiB }),
    ).rejects.toBeInstanceOf(InstanceExists);
    await expect(hv.start(uuid)).rejects.toBeInstanceOf(InstanceInvalidState);
  });

  it('refuses an instances_path whose unix socket paths would not fit, naming the path', async () => {
    const longPath = path.join(env.tmpPath, 'x'.repeat(60));
    const long = new QemuHypervisor({
      instancesPath: longPath,
      qemuBinary: QEMU_BINARY,
      qemuImg: env.qemuImg,
      accel: 'tcg',
      shutdownTimeoutMs: 100,
      qmpTimeoutMs: 1000,
      log: silentLogger(),
    });
    const u = randomUUID();
    const err = await long
      .createInstance({ uuid: u, name: 'long', memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: MiB })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as Error).message).toContain(path.join(longPath, u, 'qmp.sock'));
    expect(await exists(path.join(longPath, u))).toBe(false);
  });

  it('a guest with RAM from a file of random bytes saves all of it and resumes running; the file is not written', async () => {
    const memoryMb = 64;
    const memoryFile = path.join(env.tmpPath, 'ram.bin');
    const content = randomBytes(memoryMb * MiB);
    await fs.writeFile(memoryFile, content);
    const u = randomUUID();
    await hv.createInstance({ uuid: u, name: 'ram-file', memoryMb, vcpus: 1, machine: 'pc', diskSizeBytes: MiB, memoryFile });
    expect(JSON.parse(await fs.readFile(path.join(env.instancesPath, u, 'instance.json'), 'utf8'))).toMatchObject({
      memory_file: memoryFile,
    });
    await hv.start(u);
    const argv = (await fs.readFile(`/proc/${(await guestPid(env.instancesPath, u))!}/cmdline`, 'utf8')).split('\0');
    expect(argv).toContain(`memory-backend-file,id=ram0,size=${memoryMb}M,mem-path=${memoryFile},share=off`);
    expect(argv).toContain('pc,accel=tcg,memory-backend=ram0');

    // Random pages neither compress nor count as zero pages: the state holds (nearly) all of the RAM.
    const saved = await hv.managedSave(u);
    expect(saved.bytes).toBeGreaterThanOrEqual(memoryMb * MiB * 0.9);
    expect((await hv.resume(u)).state).toBe('running');
    expect((await hv.info(u)).state).toBe('running');
    expect((await fs.readFile(memoryFile)).equals(content)).toBe(true);
    await hv.deleteInstance(u);
    await expect(
      hv.createInstance({ uuid: randomUUID(), name: 'rel', memoryMb, vcpus: 1, machine: 'pc', diskSizeBytes: MiB, memoryFile: 'ram.bin' }),
    ).rejects.toThrow(/memoryFile must be an absolute path/);
  });

  it('deletes a running instance: process ended, directory gone', async () => {
    const pid = (await guestPid(env.instancesPath, uuid))!;
    await hv.deleteInstance(uuid);
    expect(await processAlive(pid)).toBe(false);
    expect(await exists(dir)).toBe(false);
    expect(await hv.list()).toEqual([]);
  });
});
