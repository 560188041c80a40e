import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir } from 'tmp-promise';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildRuntime, type Runtime } from '../../src/service/runtime.js';
import { SnapshotFailed } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { assertQemuInstalled, killQemuUnder, processAlive, writeQemuImgStub } from '../helpers/qemu-guest.js';
import { tempDirsConfig } from '../helpers/temp-config.js';

/**
 * Issue 12 item 4, on real QEMU: an export that never ends while the guest is suspended (cold: the
 * guest is down for the whole export) is stopped at `[hypervisor] export_timeout`, the snapshot
 * fails naming qemu-img, the bound and the option, and the guest runs again. The qemu-img here is a
 * stub that hangs on `convert` (forever: the bound is what ends it, no race) and runs the real
 * qemu-img for everything else.
 */

const MiB = 2 ** 20;
let base: string;
let rt: Runtime;
let pidFile: string;

beforeAll(async () => {
  await assertQemuInstalled();
  base = (await dir({ prefix: 'sdb-' })).path;
  pidFile = path.join(base, 'convert.pids');
  const stub = await writeQemuImgStub(base, [`echo $$ >> '${pidFile}'`, 'exec sleep 100000']);
  const config = tempDirsConfig(base, { shutdownTimeoutS: 1 });
  config.hypervisor.qemu_img = stub;
  config.hypervisor.export_timeout = 1;
  rt = buildRuntime(config, silentLogger());
});

afterAll(async () => {
  if (base === undefined) return;
  await killQemuUnder(base);
  await fs.rm(base, { recursive: true, force: true });
});

describe('an export that overruns [hypervisor] export_timeout', () => {
  it('cold: the hung qemu-img is killed, the snapshot fails naming the bound and its option, the guest runs again', async () => {
    const hv = rt.qemu!;
    const uuid = randomUUID();
    await hv.createInstance({ uuid, name: 'bound', memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: 64 * MiB });
    await rt.lifecycle.start(uuid);
    expect((await hv.info(uuid)).state).toBe('running');

    const imageId = randomUUID();
    const err = await rt.engine
      .take({ requestId: `req-${randomUUID()}`, instanceUuid: uuid, imageId, strategy: 'cold' })
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    expect(err).toBeInstanceOf(SnapshotFailed);
    expect((err as Error).message).toContain('qemu-img-stub convert did not finish within 1 s ([hypervisor] export_timeout): killed');
    expect((err as SnapshotFailed).undoErrors).toEqual([]);

    // The guest was suspended for the export: it runs again.
    expect((await hv.info(uuid)).state).toBe('running');
    // The hung qemu-img is gone.
    const pids = (await fs.readFile(pidFile, 'utf8')).trim().split('\n').map(Number);
    expect(pids).toHaveLength(1);
    expect(await processAlive(pids[0]!)).toBe(false);
    // The image is killed, its partial file gone.
    expect((await rt.store.show(imageId)).status).toBe('killed');
    expect((await rt.store.leftovers()).partials).toEqual([]);
  });
});

describe('the live backup copy that overruns [hypervisor] export_timeout', () => {
  it('is killed and the backup torn down in the guest\'s QEMU (no fleece node, export or file left; the device back on its disk); the guest runs on', async () => {
    const hv = rt.qemu!;
    const uuid = randomUUID();
    await hv.createInstance({ uuid, name: 'live-bound', memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: 64 * MiB });
    await rt.lifecycle.start(uuid);
    await fs.rm(pidFile, { force: true });

    const dest = path.join(base, 'live.raw');
    const job = await hv.startLiveBackup(uuid, dest);
    const err = await job.wait().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect((err as Error).message).toBe('qemu-img-stub convert did not finish within 1 s ([hypervisor] export_timeout): killed'.replace('qemu-img-stub', path.join(base, 'qemu-img-stub')));
    const pids = (await fs.readFile(pidFile, 'utf8')).trim().split('\n').map(Number);
    expect(await processAlive(pids[0]!)).toBe(false);

    const nodes = await hv.qmp<Array<{ 'node-name': string }>>(uuid, 'query-named-block-nodes', { flat: true });
    expect(nodes.map((n) => n['node-name']).filter((n) => n.startsWith('snapdrv-fleece-'))).toEqual([]);
    expect(await hv.qmp(uuid, 'query-block-exports')).toEqual([]);
    expect(await hv.qmp(uuid, 'qom-get', { path: '/machine/peripheral/virtio-disk0/virtio-backend', property: 'drive' })).toBe('disk0');
    const files = await fs.readdir(path.join(hv.instancesPath, uuid));
    expect(files.filter((f) => f.startsWith('snapdrv-fleece-'))).toEqual([]);
    expect((await hv.info(uuid)).state).toBe('running');
  });
});
