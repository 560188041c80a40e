import { createHash, randomUUID } from 'node:crypto';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildRuntime, type Runtime } from '../../src/service/runtime.js';
import { STRATEGIES, type StrategyName } from '../../src/config/schema.js';
import type { QemuHypervisor } from '../../src/hypervisor/qemu/qemu-hypervisor.js';
import type { QmpEvent } from '../../src/hypervisor/qemu/qmp.js';
import { silentLogger } from '../../src/log.js';
import { SNAPSHOTS_LEFT_MAX, USES_MANAGED_SAVE } from '../../src/snapshot/strategies.js';
import { dir } from 'tmp-promise';
import { assertQemuInstalled, guestFlush, guestWrite as writeThroughGuest, killQemuUnder } from '../helpers/qemu-guest.js';
import { tempDirsConfig } from '../helpers/temp-config.js';

const MiB = 2 ** 20;
const PREFIX = 'snapdrv-';

let base: string;
let rt: Runtime;
let hv: QemuHypervisor;
/** sha512 of `qemu-img convert -O raw` of the disk, taken by the test when the point in time is fixed. */
let reference: string | undefined;

async function sha512(file: string): Promise<string> {
  const h = createHash('sha512');
  for await (const chunk of createReadStream(file, { highWaterMark: 4 * MiB })) h.update(chunk as Buffer);
  return h.digest('hex');
}

beforeAll(async () => {
  await assertQemuInstalled();
  base = (await dir({ prefix: 'sds-' })).path;
  const config = tempDirsConfig(base, { shutdownTimeoutS: 1 });
  // Right before the step that fixes the point in time, convert the disk as it is then: offline when
  // the guest is suspended or off; for live and monitor-snapshot (the guest runs) after a flush of
  // its QEMU's caches — the test guest has no OS, so nothing writes between that flush and the job
  // start or the create.
  const beforeStep = async (step: { name: string }) => {
    if (reference !== undefined || !['create-snapshot', 'export-disk', 'start-backup', 'monitor-create-snapshot'].includes(step.name)) return;
    const running = ['running', 'paused'].includes((await hv.info(currentUuid)).state);
    if (running) await guestFlush(hv, currentUuid);
    const out = path.join(base, 'reference.raw');
    await rt.qemuImg.convertToRaw((await hv.diskInfo(currentUuid)).path, out, { forceShare: running });
    reference = await sha512(out);
    await fs.rm(out);
  };
  rt = buildRuntime(config, silentLogger(), { beforeStep });
  hv = rt.qemu!;
});

afterAll(async () => {
  await killQemuUnder(base);
  await fs.rm(base, { recursive: true, force: true });
});

let currentUuid = '';

/** Writes a pattern through the running guest's own QEMU (as the guest would). */
function guestWrite(uuid: string, pattern: number, offsetMiB: number, lenMiB: number): Promise<void> {
  return writeThroughGuest(hv, uuid, pattern, offsetMiB * MiB, lenMiB * MiB);
}

/** A guest with data at 0 and at 100 MiB of a disk of `diskMiB` (each image is read whole some 5 times). */
async function newGuest(state: 'running' | 'paused' | 'shutoff', diskMiB = 128): Promise<string> {
  const uuid = randomUUID();
  await hv.createInstance({ uuid, name: `t-${state}`, memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: diskMiB * MiB });
  await rt.lifecycle.start(uuid);
  await guestWrite(uuid, 0x5a, 0, 4);
  await guestWrite(uuid, 0xa5, 100, 4);
  if (state === 'paused') await hv.pause(uuid);
  if (state === 'shutoff') await hv.stop(uuid, { graceful: false });
  return uuid;
}

async function ownSnapshots(uuid: string): Promise<string[]> {
  return (await hv.listInternalSnapshots(uuid)).map((s) => s.name).filter((n) => n.startsWith(PREFIX));
}

async function snapshot(uuid: string, strategy: StrategyName) {
  currentUuid = uuid;
  reference = undefined;
  return rt.engine.take({ requestId: `req-${randomUUID()}`, instanceUuid: uuid, imageId: randomUUID(), strategy });
}

describe.each(STRATEGIES)('%s on a real QEMU guest', (strategy) => {
  it.each(['running', 'paused', 'shutoff'] as const)('%s guest: image = disk at snapshot time, state kept, disk clean', async (state) => {
    const uuid = await newGuest(state);
    // Every QMP event of the guest's QEMU while the snapshot is taken (its QMP connection is shared
    // while this one is open), for a strategy that keeps that QEMU.
    const events: string[] = [];
    const result = USES_MANAGED_SAVE[strategy] || state === 'shutoff'
      ? await snapshot(uuid, strategy)
      : await hv.withMonitor(uuid, async (qmp) => {
          qmp.on('event', (ev: QmpEvent) => events.push(ev.event));
          return snapshot(uuid, strategy);
        });

    expect(result.status).toBe('active');
    expect(reference).toBeDefined();
    expect(result.os_hash_value).toBe(reference);
    expect(await sha512(path.join(base, 'images', result.image_id))).toBe(reference);
    expect((await rt.store.verify(result.image_id)).ok).toBe(true);
    expect((await hv.info(uuid)).state).toBe(state);
    const left = await ownSnapshots(uuid);
    expect(left.length).toBe(state === 'shutoff' ? 0 : SNAPSHOTS_LEFT_MAX[strategy]);
    expect(result.internal_snapshots).toBe(left.length);
    if (state === 'running') {
      // A managed save stops the vCPUs; live and monitor-snapshot only hold disk I/O for a moment,
      // and never stop them (no STOP event).
      if (USES_MANAGED_SAVE[strategy]) expect(result.downtime_ms).toBeGreaterThan(0);
      else expect(events).not.toContain('STOP');
      if (strategy === 'monitor-snapshot') expect(events).toEqual([]);
      // A write after the snapshot is on the disk, not in the image.
      await guestWrite(uuid, 0x77, 0, 1);
    }
    if (state === 'shutoff') expect(result.downtime_ms).toBe(0);

    if (state !== 'shutoff') await hv.stop(uuid, { graceful: false });
    expect((await rt.qemuImg.check((await hv.diskInfo(uuid)).path)).clean).toBe(true);
    if (state === 'running') {
      const now = path.join(base, 'now.raw');
      await rt.qemuImg.convertToRaw((await hv.diskInfo(uuid)).path, now);
      expect(await sha512(now)).not.toBe(reference);
      await fs.rm(now);
    }
    await hv.deleteInstance(uuid);
  });
});

describe('deferred-delete on a real QEMU guest', () => {
  it('two snapshots leave the newest; hard reboot, start and resume each leave none', async () => {
    const uuid = await newGuest('running');
    const twoInARow = async () => {
      await snapshot(uuid, 'deferred-delete');
      const second = await snapshot(uuid, 'deferred-delete');
      expect(await ownSnapshots(uuid)).toEqual([`${PREFIX}${second.image_id}`]);
    };

    await twoInARow();
    await rt.lifecycle.hardReboot(uuid);
    expect(await ownSnapshots(uuid)).toEqual([]);
    expect((await hv.info(uuid)).state).toBe('running');

    await twoInARow();
    await rt.lifecycle.stop(uuid, false);
    await rt.lifecycle.start(uuid);
    expect(await ownSnapshots(uuid)).toEqual([]);

    await twoInARow();
    await rt.lifecycle.suspend(uuid);
    expect((await hv.info(uuid)).state).toBe('saved');
    await rt.lifecycle.resume(uuid);
    expect(await ownSnapshots(uuid)).toEqual([]);
    expect((await hv.info(uuid)).state).toBe('running');

    await hv.stop(uuid, { graceful: false });
    expect((await rt.qemuImg.check((await hv.diskInfo(uuid)).path)).clean).toBe(true);
    await hv.deleteInstance(uuid);
  });
});

describe('sparse export', () => {
  it('a 1 GiB-virtual disk holding 64 MiB of data exports to a raw file taking at most 80 MiB', async () => {
    const uuid = randomUUID();
    await hv.createInstance({ uuid, name: 'sparse', memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: 1024 * MiB });
    await rt.lifecycle.start(uuid);
    for (let i = 0; i < 8; i++) await guestWrite(uuid, 0x11 + i, i * 125, 8); // 64 MiB spread over the disk
    const result = await snapshot(uuid, 'suspend-create-resume-extract');
    const st = await fs.stat(path.join(base, 'images', result.image_id));
    expect(st.size).toBe(1024 * MiB);
    expect(result.size).toBe(1024 * MiB);
    expect(st.blocks * 512).toBeGreaterThanOrEqual(64 * MiB);
    expect(st.blocks * 512).toBeLessThanOrEqual(80 * MiB);
    expect(result.os_hash_value).toBe(reference);
    await hv.deleteInstance(uuid);
  });
});
