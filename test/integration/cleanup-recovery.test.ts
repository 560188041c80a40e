/**
 * Issue 5: `cleanup` as the recovery path (the agent not running), the orphan scan, and the agent
 * lock — on real QEMU guests and real RabbitMQ.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InstanceLocks } from '../../src/snapshot/instance-locks.js';
import { silentLogger } from '../../src/log.js';
import { spawnAgent, startAgentProcess } from '../helpers/agent.js';
import { cliJson, runCli } from '../helpers/cli.js';
import { castSnapshot, expectStoreConsistent, journalEntries, makeCrashBench, type CrashBench } from '../helpers/crash-matrix.js';
import { faultOf } from '../helpers/notification-tap.js';

let bench: CrashBench;
const SCRE = 'suspend-create-resume-extract';

beforeAll(async () => {
  bench = await makeCrashBench('cleanup', [SCRE, 'double-suspend', 'deferred-delete']);
});

afterAll(async () => {
  await bench?.close();
});

interface CleanupJson {
  operations: { image_id: string; image: string; guest_found: string; guest_now: string; stopped_at: string; actions: string[] }[];
  orphans: { instance_uuid: string; snapshot: string; action: string }[];
  requestsSettled: number;
}

async function snapshotsOf(uuid: string): Promise<string[]> {
  return (await bench.env.qemuImg.snapshotList(path.join(bench.env.instancesPath, uuid, 'disk'))).map((s) => s.name);
}

async function stateOf(uuid: string): Promise<string | undefined> {
  const list = (await cliJson(bench.confs.get(SCRE)!, ['instances', 'list'])) as { uuid: string; state: string }[];
  return list.find((i) => i.uuid === uuid)?.state;
}

describe('cleanup recovers what a crash interrupted', () => {
  it('a `snapshot` command killed between its two managed saves: the guest runs again, the image is killed', async () => {
    const uuid = await bench.guest('double-suspend', 'running');
    const conf = bench.confs.get('double-suspend')!;
    const imageId = randomUUID();
    const killed = await runCli(['--config-file', conf, 'snapshot', uuid, '--image-id', imageId], { SNAPSHOT_DRIVER_FAULT: 'kill:step:7:delete-snapshot' });
    expect(killed.code).toBe(-1); // killed by a signal
    expect(await stateOf(uuid)).toBe('saved'); // the second managed save, left behind
    expect(await snapshotsOf(uuid)).toEqual([`snapdrv-${imageId}`]);

    const report = (await cliJson(conf, ['cleanup'])) as CleanupJson;
    expect(report.operations).toEqual([
      expect.objectContaining({ image_id: imageId, image: 'killed', guest_found: 'saved', guest_now: 'running', stopped_at: 'step 8 (delete-snapshot)' }),
    ]);
    expect(report.operations[0]!.actions).toEqual(
      expect.arrayContaining([`deleted internal snapshot snapdrv-${imageId}`, 'resumed the guest from our managed save']),
    );
    expect(report.requestsSettled).toBe(0); // not an RPC request: nobody to notify
    expect(await stateOf(uuid)).toBe('running');
    expect(await snapshotsOf(uuid)).toEqual([]);
    expect(await cliJson(conf, ['images', 'show', imageId])).toMatchObject({ status: 'killed', properties: { kill_reason: expect.stringMatching(/^interrupted: the agent stopped at step 8 \(delete-snapshot\) of double-suspend/) } });
    await expectStoreConsistent(bench);
    // Nothing is left to recover: a second cleanup finds nothing.
    expect(((await cliJson(conf, ['cleanup'])) as CleanupJson).operations).toEqual([]);
  });

  it('an RPC request interrupted by a crash ends with an error notification from cleanup; the next serve does not run it again', async () => {
    const uuid = await bench.guest(SCRE, 'running');
    const conf = bench.confs.get(SCRE)!;
    const imageId = randomUUID();
    const crashing = spawnAgent(conf, { env: { SNAPSHOT_DRIVER_FAULT: 'kill:step:3:resume' } });
    bench.agents.push(crashing);
    await crashing.waitForLog('agent serving');
    await castSnapshot(bench, uuid, imageId);
    expect(await crashing.exited).toEqual({ code: null, signal: 'SIGKILL' });
    expect(await journalEntries(bench)).toHaveLength(1);

    const report = (await cliJson(conf, ['cleanup'])) as CleanupJson;
    expect(report.operations).toEqual([expect.objectContaining({ image_id: imageId, image: 'killed', guest_found: 'saved', guest_now: 'running' })]);
    expect(report.requestsSettled).toBe(1);
    const note = await bench.tap.waitFor('instance.snapshot.error', imageId);
    expect(faultOf(note.message)).toMatchObject({ exception: 'SnapshotInterrupted' });
    expect(await journalEntries(bench)).toEqual([]);
    expect(await stateOf(uuid)).toBe('running');
    expect((await snapshotsOf(uuid)).filter((n) => n.startsWith('snapdrv-'))).toEqual([]);

    const agent = await startAgentProcess(conf);
    bench.agents.push(agent);
    expect(agent.find('resuming an unfinished RPC request')).toEqual([]);
    expect(agent.find('recovering an interrupted snapshot')).toEqual([]);
    await agent.stop();
    expect(bench.tap.find('instance.snapshot.error', imageId)).toHaveLength(1);
  });
});

describe('orphaned internal snapshots of ours', () => {
  it('on a running guest: deleted through its monitor (s-c-r-e), kept pending under deferred-delete; others never touched', async () => {
    const uuid = await bench.guest(SCRE, 'running');
    const orphan = `snapdrv-${randomUUID()}`;
    await bench.env.hv.liveSnapshotCreate(uuid, orphan);
    await bench.env.hv.liveSnapshotCreate(uuid, 'operator-keep');
    const report = (await cliJson(bench.confs.get(SCRE)!, ['cleanup', uuid])) as CleanupJson;
    expect(report.orphans).toEqual([{ instance_uuid: uuid, snapshot: orphan, action: 'deleted' }]);
    expect(await snapshotsOf(uuid)).toEqual(['operator-keep']);

    const orphan2 = `snapdrv-${randomUUID()}`;
    await bench.env.hv.liveSnapshotCreate(uuid, orphan2);
    const deferred = (await cliJson(bench.confs.get('deferred-delete')!, ['cleanup', uuid])) as CleanupJson;
    expect(deferred.orphans).toEqual([{ instance_uuid: uuid, snapshot: orphan2, action: 'pending' }]);
    expect((await snapshotsOf(uuid)).sort()).toEqual(['operator-keep', orphan2].sort());
    // The next restart of its QEMU process deletes it.
    const reboot = await runCli(['--config-file', bench.confs.get(SCRE)!, 'instances', 'reboot', '--hard', uuid]);
    expect(reboot.code, reboot.stderr).toBe(0);
    expect(await snapshotsOf(uuid)).toEqual(['operator-keep']);
    await bench.env.hv.liveSnapshotDelete(uuid, 'operator-keep');
  });

  it('on a shut-off guest: deleted with qemu-img', async () => {
    const uuid = await bench.guest('deferred-delete', 'running');
    const conf = bench.confs.get('deferred-delete')!;
    expect((await runCli(['--config-file', conf, 'instances', 'stop', '--force', uuid])).code).toBe(0);
    const orphan = `snapdrv-${randomUUID()}`;
    await bench.env.hv.offlineSnapshotCreate(uuid, orphan);
    await bench.env.hv.offlineSnapshotCreate(uuid, 'operator-keep');
    const report = (await cliJson(conf, ['cleanup', uuid])) as CleanupJson;
    expect(report.orphans).toEqual([{ instance_uuid: uuid, snapshot: orphan, action: 'deleted' }]);
    expect(await snapshotsOf(uuid)).toEqual(['operator-keep']);
    await bench.env.hv.offlineSnapshotDelete(uuid, 'operator-keep');
    expect(await bench.env.qemuImg.check(path.join(bench.env.instancesPath, uuid, 'disk'))).toMatchObject({ clean: true });
    expect((await runCli(['--config-file', conf, 'instances', 'start', uuid])).code).toBe(0);
  });
});

describe('one agent per state_path', () => {
  it('a second serve and a cleanup refuse while an agent serves; a killed agent leaves a lock the next one takes over', async () => {
    const conf = bench.confs.get(SCRE)!;
    const agent = await startAgentProcess(conf);
    bench.agents.push(agent);
    const second = spawnAgent(conf);
    bench.agents.push(second);
    expect(await second.exited).toEqual({ code: 1, signal: null });
    expect(second.tail()).toMatch(new RegExp(`AgentAlreadyRunning: another agent \\(pid ${agent.pid}\\) already serves`));
    const cleanup = await runCli(['--config-file', conf, 'cleanup']);
    expect(cleanup.code).toBe(1);
    expect(cleanup.stderr).toMatch(new RegExp(`AgentAlreadyRunning: an agent \\(pid ${agent.pid}\\) is serving`));
    expect(await agent.kill()).toEqual({ code: null, signal: 'SIGKILL' });
    expect(JSON.parse(await fs.readFile(path.join(bench.stateDir, 'agent.lock'), 'utf8'))).toMatchObject({ pid: agent.pid });
    const next = await startAgentProcess(conf);
    bench.agents.push(next);
    expect(await next.stop()).toEqual({ code: 0, signal: null });
    await expect(fs.access(path.join(bench.stateDir, 'agent.lock'))).rejects.toThrow();
  });
});

describe('one process per instance', () => {
  it('a command is refused while another process works on the instance; the agent waits for it instead', async () => {
    const conf = bench.confs.get(SCRE)!;
    const uuid = await bench.guest(SCRE, 'running');
    // This test process holds the instance, as a long `snapshot` command would.
    const locks = new InstanceLocks(path.join(bench.stateDir, 'locks'), silentLogger());
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    const holding = locks.hold(uuid, 'test hold', { waitMs: 0 }, () => released);

    const refused = await runCli(['--config-file', conf, 'instances', 'stop', '--force', uuid]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain(`InstanceBusy: instance ${uuid} is busy: process ${process.pid} is working on it (test hold)`);
    const snap = await runCli(['--config-file', conf, 'snapshot', uuid]);
    expect(snap.code).toBe(1);
    expect(snap.stderr).toContain('InstanceBusy');
    expect(await stateOf(uuid)).toBe('running');

    const agent = await startAgentProcess(conf);
    bench.agents.push(agent);
    const imageId = randomUUID();
    await castSnapshot(bench, uuid, imageId);
    await agent.waitForLog('waiting for another process to finish with the instance', { instance_uuid: uuid, holder_pid: process.pid, holder_what: 'test hold' });
    expect(agent.find('snapshot start', { image_id: imageId })).toEqual([]);
    release();
    await holding;
    await bench.tap.waitFor('instance.snapshot.end', imageId);
    await agent.stop();
    expect(await cliJson(conf, ['images', 'show', imageId])).toMatchObject({ status: 'active' });
    expect(await stateOf(uuid)).toBe('running');
  });
});
