/**
 * Issue 10: which libvirt domains the agent takes, and the `instances` commands on them (real
 * libvirtd). A domain without a qcow2 root disk (raw, network), a transient domain for a strategy
 * that needs a managed save, an unknown uuid: refused with an error naming the domain and the reason,
 * and nothing touched (no image record, no operation, no job, state unchanged). The power commands
 * work on domains; `create` and `delete` are the qemu backend's only.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ImageNotFound, InstanceNotFound, UnsupportedInstance } from '../../src/errors.js';
import type { StrategyName } from '../../src/config/schema.js';
import { cliJson, runCli } from '../helpers/cli.js';
import { libvirtView, makeLibvirtBench, virsh, type LibvirtBench } from '../helpers/libvirt.js';

let bench: LibvirtBench;
let conf: string;

beforeAll(async () => {
  bench = await makeLibvirtBench({ quiesce: 'auto' });
  conf = await bench.configFile({ quiesce: 'auto' });
});

afterAll(async () => {
  await bench?.cleanup();
});

async function refusal(uuid: string, strategy: StrategyName): Promise<{ err: unknown; imageId: string }> {
  const imageId = randomUUID();
  const err = await bench.rt.engine.take({ requestId: 'refuse', instanceUuid: uuid, imageId, strategy }).then(
    () => undefined,
    (e: unknown) => e,
  );
  return { err, imageId };
}

/** Refused before anything was touched: no image record, no operation record, libvirt unchanged. */
async function expectUntouched(uuid: string, imageId: string, before: Awaited<ReturnType<typeof libvirtView>>): Promise<void> {
  await expect(bench.rt.store.show(imageId)).rejects.toBeInstanceOf(ImageNotFound);
  expect(await fs.readdir(path.join(bench.base, 's', 'operations')).catch(() => [])).toEqual([]);
  expect(await libvirtView(uuid)).toEqual(before);
}

describe('domains the agent refuses', () => {
  it('a raw root disk: no qcow2 disk to snapshot', async () => {
    const dom = await bench.domain({ guest: 'bare', format: 'raw' });
    const before = await libvirtView(dom.uuid);
    const { err, imageId } = await refusal(dom.uuid, 'suspend-create-resume-extract');
    expect(err).toBeInstanceOf(UnsupportedInstance);
    expect((err as Error).message).toBe(
      `domain ${dom.name} (${dom.uuid}) cannot be snapshotted: it has no <disk device='disk'> of driver type qcow2 (it has file raw disk vda (${dom.disk}))`,
    );
    await expectUntouched(dom.uuid, imageId, before);
  });

  it('a network (RBD) root disk, defined and never started', async () => {
    const uuid = randomUUID();
    const xml = path.join(bench.base, 'rbd.xml');
    const name = `sdt-${process.pid}-rbd`;
    await fs.writeFile(
      xml,
      `<domain type='qemu'><name>${name}</name><uuid>${uuid}</uuid><memory unit='MiB'>64</memory><os><type arch='x86_64' machine='pc'>hvm</type></os>` +
        `<devices><disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' name='volumes/vol-1'><host name='192.0.2.1'/></source><target dev='vda' bus='virtio'/></disk></devices></domain>`,
    );
    await virsh('define', xml);
    try {
      const before = await libvirtView(uuid);
      const { err, imageId } = await refusal(uuid, 'cold');
      expect(err).toBeInstanceOf(UnsupportedInstance);
      expect((err as Error).message).toContain(`domain ${name} (${uuid}) cannot be snapshotted: it has no <disk device='disk'> of driver type qcow2 (it has network raw disk vda (rbd volumes/vol-1))`);
      await expectUntouched(uuid, imageId, before);
    } finally {
      await virsh('undefine', uuid);
    }
  });

  it('a transient domain: refused for a strategy that needs a managed save, taken by live', async () => {
    const dom = await bench.domain({ guest: 'bare', persistent: false });
    const before = await libvirtView(dom.uuid);
    const { err, imageId } = await refusal(dom.uuid, 'deferred-delete');
    expect(err).toBeInstanceOf(UnsupportedInstance);
    expect((err as Error).message).toBe(
      `cannot take this snapshot, which needs a managed save: domain ${dom.name} (${dom.uuid}) is transient, and libvirt can managed-save only a defined domain`,
    );
    await expectUntouched(dom.uuid, imageId, before);
    const live = await bench.rt.engine.take({ requestId: 'live', instanceUuid: dom.uuid, imageId: randomUUID(), strategy: 'live' });
    expect(live).toMatchObject({ status: 'active', strategy: 'live' });
    expect((await libvirtView(dom.uuid)).state).toMatch(/^running/);
  });

  it('an unknown uuid, and one that is not a uuid', async () => {
    const { err } = await refusal(randomUUID(), 'cold');
    expect(err).toBeInstanceOf(InstanceNotFound);
    const res = await runCli(['--config-file', conf, 'snapshot', '../../etc/passwd']);
    expect(res.code).toBe(2);
    expect(res.stderr).toContain('InvalidInstanceId');
  });
});

describe('instances commands on libvirt domains', () => {
  it('list, suspend/resume (managed save), pause/unpause, stop/start, reboot; create and delete refused', async () => {
    const dom = await bench.domain({ guest: 'bare' });
    const stateOf = async () => ((await cliJson(conf, ['instances', 'list'])) as { uuid: string; name: string; state: string }[]).find((i) => i.uuid === dom.uuid);
    expect(await stateOf()).toEqual({ uuid: dom.uuid, name: dom.name, state: 'running' });
    const step = async (args: string[], state: string) => {
      const res = await runCli(['--config-file', conf, 'instances', ...args, dom.uuid]);
      expect(res.code, res.stderr).toBe(0);
      expect(res.stdout.trim()).toBe(`${dom.uuid} ${state}`);
    };
    await step(['suspend'], 'saved');
    expect(await libvirtView(dom.uuid)).toMatchObject({ managedSave: true, state: 'shut off (saved)' });
    await step(['resume'], 'running');
    await step(['pause'], 'paused');
    await step(['unpause'], 'running');
    await step(['reboot'], 'running');
    await step(['stop', '--force'], 'shutoff');
    await step(['start'], 'running');
    for (const args of [['create', '--name', 'x'], ['delete', dom.uuid]]) {
      const res = await runCli(['--config-file', conf, 'instances', ...args]);
      expect(res.code).toBe(2);
      expect(res.stderr).toContain(`works with [hypervisor] driver = qemu only: the libvirt backend's instances are defined by the operator`);
    }
    expect(await stateOf()).toMatchObject({ state: 'running' });
  });
});
