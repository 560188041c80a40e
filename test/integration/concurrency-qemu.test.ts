/**
 * Issue 5, "20 concurrent snapshot requests over 4 guests, with hard reboots interleaved", for real:
 * four TCG QEMU guests (one of them paused), the agent as operators run it (`snapshot-driver serve`,
 * a child process) with max_concurrent_snapshots = 2 on real RabbitMQ, and every request cast by
 * oslo.messaging's own Python RPC client, in one order, as nova sends them.
 *
 * What ran when is read back from the agent's log lines (test/helpers/concurrency-log.ts) in the
 * order the agent wrote them (one process, one stderr: exact, where the lines' whole-ms `time` ties).
 */
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rawHasPattern, startAgentProcess, waitForImageStatus, writeAgentConfig, type AgentProcess, type LogLine } from '../helpers/agent.js';
import { cliJson } from '../helpers/cli.js';
import { expectConcurrencyBound, operationsByInstance, serialProblems, startOrder } from '../helpers/concurrency-log.js';
import { assertOsloMessaging, osloRpc, type OsloStep } from '../helpers/oslo-python.js';
import { createGuest, guestWrite, makeQemuEnv, MiB, type QemuEnv } from '../helpers/qemu-guest.js';
import { createRabbitVhost, deleteRabbitVhost, ensureRabbit } from '../helpers/rabbitmq.js';

const VHOST = `sd-concurrency-${process.pid}`;
const HOST = `concurrency-${process.pid}`;
const STRATEGY = 'suspend-create-resume-extract';
const MAX_CONCURRENT = 2;
const PREFIX = 'snapdrv-';
const DISK_BYTES = 16 * MiB;

interface Guest {
  uuid: string;
  name: string;
  /** The byte the guest wrote over [0, 2 MiB) and [8 MiB, 9 MiB) of its disk before any snapshot. */
  pattern: number;
  initial: 'running' | 'paused';
}

type Msg =
  | { kind: 'snapshot'; requestId: string; guest: Guest; imageId: string }
  | { kind: 'reboot'; requestId: string; guest: Guest };

let url: string;
let env: QemuEnv | undefined;
let conf: string;
let imagesDir: string;
let agent: AgentProcess | undefined;
const guests: Guest[] = [];

beforeAll(async () => {
  await assertOsloMessaging();
  await ensureRabbit();
  url = await createRabbitVhost(VHOST);
  env = await makeQemuEnv({ accel: 'tcg' });
  conf = await writeAgentConfig(env.tmpPath, { host: HOST, transportUrl: url, strategy: STRATEGY, maxConcurrentSnapshots: MAX_CONCURRENT });
  imagesDir = path.join(env.tmpPath, 'images');
  const memory = [64, 96, 128, 64];
  for (const [i, memoryMb] of memory.entries()) {
    const name = `conc-guest-${i}`;
    const uuid = await createGuest(env.hv, { name, memoryMb, diskSizeBytes: DISK_BYTES });
    const pattern = 0x61 + i;
    // Data the snapshots must carry, written through the guest's own QEMU, as the guest would.
    await guestWrite(env.hv, uuid, pattern, 0, 2 * MiB);
    await guestWrite(env.hv, uuid, pattern, 8 * MiB, MiB);
    const initial = i === 2 ? 'paused' : 'running';
    if (initial === 'paused') await env.hv.pause(uuid);
    guests.push({ uuid, name, pattern, initial });
  }
  agent = await startAgentProcess(conf);
});

afterAll(async () => {
  try {
    await agent?.stop(20_000);
    // Kills every QEMU whose command line names the temp dir, then removes it.
    await env?.cleanup();
  } finally {
    await deleteRabbitVhost(VHOST);
  }
});

/**
 * 20 snapshots, guest i % 4 for the i-th, and a HARD reboot after every fourth (5 reboots, 25
 * messages). The paused guest is rebooted first (after its first snapshot), so it is snapshotted
 * once paused and then running; every guest is rebooted at least once.
 */
function schedule(): Msg[] {
  const rebootTargets = [2, 0, 1, 3, 2];
  const msgs: Msg[] = [];
  for (let i = 0; i < 20; i++) {
    msgs.push({ kind: 'snapshot', requestId: `req-snap-${String(i).padStart(2, '0')}`, guest: guests[i % 4]!, imageId: randomUUID() });
    if (i % 4 === 3) {
      const r = (i - 3) / 4;
      msgs.push({ kind: 'reboot', requestId: `req-reboot-${r}`, guest: guests[rebootTargets[r]!]! });
    }
  }
  return msgs;
}

const instanceArg = (g: Guest) => ({
  'nova_object.name': 'Instance',
  'nova_object.namespace': 'nova',
  'nova_object.version': '2.7',
  'nova_object.data': { uuid: g.uuid, display_name: g.name, user_id: 'py-user', project_id: 'py-project' },
});

describe('20 concurrent snapshots over 4 real guests, hard reboots interleaved, max_concurrent_snapshots = 2', () => {
  it('keeps per-guest order, never runs more than 2 at once, and leaves every disk clean', async () => {
    const a = agent!;
    const msgs = schedule();
    expect(msgs.filter((m) => m.kind === 'reboot')).toHaveLength(5);
    const snapshots = msgs.filter((m): m is Extract<Msg, { kind: 'snapshot' }> => m.kind === 'snapshot');

    // The state each snapshot should find (a hard reboot leaves a paused guest running).
    const model = new Map(guests.map((g) => [g.uuid, g.initial as string]));
    const expectedPrior = new Map<string, string>();
    for (const m of msgs) {
      if (m.kind === 'reboot') model.set(m.guest.uuid, 'running');
      else expectedPrior.set(m.requestId, model.get(m.guest.uuid)!);
    }
    expect([...expectedPrior.values()].filter((s) => s === 'paused')).toHaveLength(1);

    // All 25 cast in order by oslo.messaging's RPC client, one after the other, without waiting.
    const context = (requestId: string) => ({ request_id: requestId, user_id: 'py-user', project_id: 'py-project' });
    const steps: OsloStep[] = msgs.map((m) =>
      m.kind === 'snapshot'
        ? { name: m.requestId, kind: 'cast', method: 'snapshot_instance', args: { instance: instanceArg(m.guest), image_id: m.imageId }, context: context(m.requestId) }
        : { name: m.requestId, kind: 'cast', method: 'reboot_instance', args: { instance: instanceArg(m.guest), reboot_type: 'HARD', block_device_info: null }, context: context(m.requestId) },
    );
    const sent = await osloRpc(url, HOST, steps);
    for (const m of msgs) expect(sent.get(m.requestId)).toEqual({ name: m.requestId, ok: true, result: null });

    const ended = (l: LogLine) => l.msg === 'operation end' || String(l.msg).startsWith('operation failed');
    await a.waitForLine(ended, 'operation end|failed', { count: msgs.length, timeoutMs: 120_000 });
    const lines = [...a.lines];

    // Every request ended, successfully.
    expect(lines.filter((l) => String(l.msg).startsWith('operation failed'))).toEqual([]);
    expect(a.find('snapshot failed')).toEqual([]);
    expect(lines.filter((l) => typeof l.level === 'number' && l.level >= 50)).toEqual([]);
    expect(a.find('operation end')).toHaveLength(msgs.length);

    // Per guest: operations started in the order they were sent, one at a time.
    const ops = operationsByInstance(lines);
    for (const g of guests) {
      expect(startOrder(ops.get(g.uuid) ?? [])).toEqual(msgs.filter((m) => m.guest === g).map((m) => m.requestId));
      expect(serialProblems(ops.get(g.uuid)!)).toEqual([]);
    }
    const starts = a.find('snapshot start');
    expect(starts).toHaveLength(20);
    for (const l of starts) expect({ req: l.request_id, prior: l.prior_state }).toEqual({ req: l.request_id, prior: expectedPrior.get(String(l.request_id)) });

    // Never more than 2 snapshots at once, and 2 reached (with one waiting for a slot): from the
    // manager's slot lines, and independently from the engine's snapshot start/end lines.
    expectConcurrencyBound(lines, MAX_CONCURRENT, 20);

    // All 20 images active, verified by the CLI, each holding its guest's data; none left internally.
    for (const m of snapshots) {
      expect(await waitForImageStatus(imagesDir, m.imageId, ['active'], 5_000)).toMatchObject({
        status: 'active',
        size: DISK_BYTES,
        properties: { instance_uuid: m.guest.uuid },
      });
      expect(await rawHasPattern(path.join(imagesDir, m.imageId), m.guest.pattern, 0, 2 * MiB)).toBe(true);
      expect(await rawHasPattern(path.join(imagesDir, m.imageId), m.guest.pattern, 8 * MiB, MiB)).toBe(true);
    }
    for (let i = 0; i < snapshots.length; i += 2) {
      const pair = snapshots.slice(i, i + 2);
      const verified = await Promise.all(pair.map((m) => cliJson(conf, ['images', 'verify', m.imageId])));
      for (const v of verified) expect(v).toMatchObject({ ok: true });
    }
    for (const l of a.find('snapshot end')) expect(l.internal_snapshots).toBe(0);

    // Every guest running (the paused one was hard-rebooted).
    const listed = (await cliJson(conf, ['instances', 'list'])) as Array<{ uuid: string; state: string }>;
    expect(new Map(listed.map((i) => [i.uuid, i.state]))).toEqual(new Map(guests.map((g) => [g.uuid, 'running'])));

    // Stopped through the agent, each disk is clean and holds no internal snapshot at all.
    const stops = await osloRpc(
      url,
      HOST,
      guests.map((g) => ({ name: `stop-${g.name}`, kind: 'call' as const, method: 'stop_instance', args: { instance: instanceArg(g) }, timeout: 60 })),
    );
    for (const g of guests) expect(stops.get(`stop-${g.name}`)).toMatchObject({ ok: true, result: null });
    const afterStop = (await cliJson(conf, ['instances', 'list'])) as Array<{ uuid: string; state: string }>;
    expect(new Map(afterStop.map((i) => [i.uuid, i.state]))).toEqual(new Map(guests.map((g) => [g.uuid, 'shutoff'])));
    for (const g of guests) {
      const disk = path.join(env!.instancesPath, g.uuid, 'disk');
      expect(await env!.qemuImg.check(disk)).toMatchObject({ clean: true, corruptions: 0, leaks: 0 });
      const left = await env!.qemuImg.snapshotList(disk);
      expect(left.filter((s) => s.name.startsWith(PREFIX))).toEqual([]);
      expect(left).toEqual([]);
    }
    expect(a.find('snapshot failed')).toEqual([]);
  });
});
