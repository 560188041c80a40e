/**
 * The agent (`snapshot-driver serve`, a child process) on real RabbitMQ with a real QEMU guest,
 * driven the way nova drives it: oslo.messaging's own RPC client and notification listener (Python,
 * test/interop/), our TestRpcClient for duplicates, and hand-made malformed messages.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rabbitOptionsSchema } from '../../src/config/schema.js';
import { silentLogger } from '../../src/log.js';
import type { Bus } from '../../src/messaging/bus.js';
import { encodeEnvelope, newUniqueId } from '../../src/messaging/envelope.js';
import { openBus } from '../../src/messaging/transport/open-bus.js';
import { novaInstance, rawHasPattern, startAgentProcess, waitForImageStatus, writeAgentConfig, type AgentProcess, type LogLine } from '../helpers/agent.js';
import { cliJson } from '../helpers/cli.js';
import { assertOsloMessaging, osloRpc, startOsloListener, type OsloNotification } from '../helpers/oslo-python.js';
import { createGuest, guestWrite, makeQemuEnv, MiB, type QemuEnv } from '../helpers/qemu-guest.js';
import { createRabbitVhost, deleteRabbitVhost, ensureRabbit } from '../helpers/rabbitmq.js';
import { TestRpcClient } from '../helpers/rpc-client.js';

const VHOST = `sd-interop-${process.pid}`;
const HOST = `interop-${process.pid}`;
const STRATEGY = 'suspend-create-resume-extract';
const GUEST_NAME = 'interop-guest';

let url: string;
let env: QemuEnv | undefined;
let conf: string;
let imagesDir: string;
let uuid: string;
let agent: AgentProcess | undefined;
let bus: Bus | undefined;
let client: TestRpcClient | undefined;

beforeAll(async () => {
  await assertOsloMessaging();
  await ensureRabbit();
  url = await createRabbitVhost(VHOST);
  env = await makeQemuEnv({ accel: 'tcg' });
  conf = await writeAgentConfig(env.tmpPath, { host: HOST, transportUrl: url, strategy: STRATEGY });
  imagesDir = path.join(env.tmpPath, 'images');
  uuid = await createGuest(env.hv, { name: GUEST_NAME });
  // Data the snapshots must carry: written through the guest's own QEMU, as the guest would.
  await guestWrite(env.hv, uuid, 0x5a, 0, MiB);
  await guestWrite(env.hv, uuid, 0xc3, 40 * MiB, MiB);
  agent = await startAgentProcess(conf);
  bus = await openBus(url, rabbitOptionsSchema.parse({}), silentLogger());
  client = await new TestRpcClient(bus, { server: HOST }).open();
});

afterAll(async () => {
  try {
    await client?.close().catch(() => undefined);
    await bus?.close().catch(() => undefined);
    await agent?.stop(20_000);
    // Kills every QEMU (and any agent) whose command line names the temp dir, then removes it.
    await env?.cleanup();
  } finally {
    await deleteRabbitVhost(VHOST);
  }
});

describe('oslo.messaging interop on real RabbitMQ and a real QEMU guest', () => {
  it('a Python oslo.messaging client casts and calls; an oslo listener gets the snapshot notifications', async () => {
    const castImage = randomUUID();
    const callImage = randomUUID();
    const instance = novaInstance({ uuid, display_name: GUEST_NAME, user_id: 'py-user', project_id: 'py-project' });
    const listener = await startOsloListener(url, 150, [
      'instance.snapshot.start=2',
      'instance.snapshot.end=2',
      'compute.instance.snapshot.start=2',
      'compute.instance.snapshot.end=2',
    ]);
    let notifications: OsloNotification[];
    let results: Awaited<ReturnType<typeof osloRpc>>;
    try {
      // One instance's operations run in arrival order: the call returns after the cast's snapshot.
      results = await osloRpc(url, HOST, [
        { name: 'cast-snapshot', kind: 'cast', method: 'snapshot_instance', args: { instance, image_id: castImage } },
        { name: 'call-snapshot', kind: 'call', method: 'snapshot_instance', args: { instance, image_id: callImage }, timeout: 120 },
        { name: 'call-stop', kind: 'call', method: 'stop_instance', args: { instance } },
        { name: 'call-start', kind: 'call', method: 'start_instance', args: { instance } },
        { name: 'no-such-method', kind: 'call', method: 'resize_instance', args: { instance } },
        { name: 'no-such-method-exmods', kind: 'call', method: 'resize_instance', args: { instance }, exmods: true },
        { name: 'version-7', kind: 'call', method: 'start_instance', args: { instance }, version: '7.0' },
        { name: 'version-7-exmods', kind: 'call', method: 'start_instance', args: { instance }, version: '7.0', exmods: true },
      ]);
      notifications = await listener.done;
    } finally {
      listener.kill();
    }

    expect(results.get('cast-snapshot')).toEqual({ name: 'cast-snapshot', ok: true, result: null });
    const snap = results.get('call-snapshot');
    expect(snap).toMatchObject({
      ok: true,
      result: { image_id: callImage, status: 'active', strategy: STRATEGY, size: 64 * MiB, os_hash_algo: 'sha512', internal_snapshots: 0 },
    });
    const callResult = (snap as { result: Record<string, unknown> }).result;
    // The fields SPEC §8 lists for `snapshot --json` (the SnapshotResult), whatever else it carries.
    expect(Object.keys(callResult)).toEqual(
      expect.arrayContaining(['checksum', 'downtime_ms', 'duration_ms', 'image_id', 'internal_snapshots', 'os_hash_algo', 'os_hash_value', 'size', 'status', 'strategy']),
    );
    expect(callResult.downtime_ms).toEqual(expect.any(Number));
    expect(results.get('call-stop')).toMatchObject({ ok: true, result: null });
    expect(results.get('call-start')).toMatchObject({ ok: true, result: null });

    // Without allowed_remote_exmods the client raises RemoteError naming the server's class; with
    // oslo_messaging.rpc.dispatcher allowed it rebuilds oslo's own exception (as a subclass
    // NoSuchMethod_Remote of oslo_messaging.NoSuchMethod, as it does for any oslo server).
    expect(results.get('no-such-method')).toMatchObject({ ok: false, exc_class: 'RemoteError', exc_type: 'NoSuchMethod', is_a: ['RemoteError'] });
    expect(results.get('no-such-method-exmods')).toMatchObject({ ok: false, exc_class: 'NoSuchMethod_Remote', is_a: ['NoSuchMethod'] });
    expect(results.get('version-7')).toMatchObject({ ok: false, exc_class: 'RemoteError', exc_type: 'UnsupportedVersion', is_a: ['RemoteError'] });
    expect(results.get('version-7-exmods')).toMatchObject({ ok: false, exc_class: 'UnsupportedVersion_Remote', is_a: ['UnsupportedVersion'] });
    expect((results.get('no-such-method') as { message: string }).message).toContain('resize_instance');
    expect(agent!.find('RPC request refused', { method: 'resize_instance', error: 'NoSuchMethod' })).toHaveLength(2);
    expect(agent!.find('RPC request refused', { method: 'start_instance', error: 'UnsupportedVersion' })).toHaveLength(2);

    // The cast's image: active, with the guest's data, and the CLI verifies its checksums.
    const meta = await waitForImageStatus(imagesDir, castImage);
    expect(meta).toMatchObject({
      id: castImage,
      name: `snapshot of ${GUEST_NAME}`,
      status: 'active',
      disk_format: 'raw',
      size: 64 * MiB,
      properties: { image_type: 'snapshot', instance_uuid: uuid },
    });
    for (const image of [castImage, callImage]) {
      expect(await cliJson(conf, ['images', 'verify', image])).toMatchObject({ ok: true });
      expect(await rawHasPattern(path.join(imagesDir, image), 0x5a, 0, MiB)).toBe(true);
      expect(await rawHasPattern(path.join(imagesDir, image), 0xc3, 40 * MiB, MiB)).toBe(true);
    }
    expect(await cliJson(conf, ['images', 'show', callImage])).toMatchObject({ status: 'active', checksum: callResult.checksum });
    expect(await cliJson(conf, ['instances', 'list'])).toEqual([{ uuid, name: GUEST_NAME, state: 'running' }]);

    // Versioned notifications, as nova-compute sends them, for each image.
    for (const image of [castImage, callImage]) {
      const of = (eventType: string) =>
        notifications.filter((n) => n.event_type === eventType && dataOf(n).snapshot_image_id === image);
      const [start] = of('instance.snapshot.start');
      const [end] = of('instance.snapshot.end');
      expect(of('instance.snapshot.start')).toHaveLength(1);
      expect(of('instance.snapshot.end')).toHaveLength(1);
      for (const n of [start!, end!]) {
        expect(n.publisher_id).toBe(`nova-compute:${HOST}`);
        expect(n.priority).toBe('info');
        expect(n.payload['nova_object.name']).toBe('InstanceActionSnapshotPayload');
        expect(dataOf(n)).toMatchObject({ uuid, snapshot_image_id: image });
      }
      expect(dataOf(end!)).toMatchObject({ strategy: STRATEGY, bytes: 64 * MiB, downtime_ms: expect.any(Number) });
      // The legacy (unversioned) pair too.
      const legacy = notifications.filter((n) => n.event_type.startsWith('compute.instance.snapshot.') && n.payload.snapshot_image_id === image);
      expect(legacy.map((n) => n.event_type).sort()).toEqual(['compute.instance.snapshot.end', 'compute.instance.snapshot.start']);
      expect(legacy.every((n) => n.publisher_id === `compute.${HOST}`)).toBe(true);
    }
    const callEnd = notifications.find((n) => n.event_type === 'instance.snapshot.end' && dataOf(n).snapshot_image_id === callImage)!;
    expect(dataOf(callEnd).downtime_ms).toBe(callResult.downtime_ms);
  });

  it('runs a request sent twice with one _unique_id once', async () => {
    const image = randomUUID();
    const uniqueId = newUniqueId();
    const args = { instance: novaInstance({ uuid, display_name: GUEST_NAME, user_id: 'py-user', project_id: 'py-project' }), image_id: image };
    await client!.cast('snapshot_instance', args, { uniqueId });
    await client!.cast('snapshot_instance', args, { uniqueId });
    await agent!.waitForLog(/^duplicate RPC request dropped/, { unique_id: uniqueId });
    await agent!.waitForLog('RPC request finished', { unique_id: uniqueId });
    // A call on the same instance runs after everything before it: once it returns, nothing is left.
    expect(await client!.call('reboot_instance', { instance: { uuid }, reboot_type: 'SOFT' }, { timeoutS: 60 })).toBeNull();

    expect(agent!.find('RPC request accepted', { unique_id: uniqueId })).toHaveLength(1);
    expect(agent!.find('snapshot start', { image_id: image })).toHaveLength(1);
    expect(agent!.find('snapshot end', { image_id: image })).toHaveLength(1);
    expect(await waitForImageStatus(imagesDir, image)).toMatchObject({ status: 'active' });
    expect(await cliJson(conf, ['images', 'verify', image])).toMatchObject({ ok: true });
  });

  describe('malformed input: logged with its reason, a call answered with a failure, the agent serves on', () => {
    const c = () => client!;
    type Case = {
      name: string;
      /** The body, given a call's `_msg_id`/`_reply_q` fields. */
      body: (call: { _msg_id: string; _reply_q: string }) => Buffer;
      /** false: sent as a cast (no reply address). */
      call: boolean;
      log: 'malformed RPC message dropped' | 'RPC request refused';
      reason: RegExp;
      failure?: { class: string; message: RegExp };
    };
    const instanceArg = () => ({ uuid });
    const cases: Case[] = [
      {
        name: 'not JSON (a cast)',
        body: () => Buffer.from('definitely { not JSON'),
        call: false,
        log: 'malformed RPC message dropped',
        reason: /^message body is not JSON/,
      },
      {
        name: 'not JSON (a truncated call)',
        body: (a) => Buffer.from(`{"oslo.version": "2.0", "oslo.message": "{\\"method\\": \\"start_instance\\", \\"_msg_id\\": \\"${a._msg_id}\\", \\"_reply_q\\": \\"${a._reply_q}\\"`),
        call: true,
        log: 'malformed RPC message dropped',
        reason: /^message body is not JSON/,
        failure: { class: 'MalformedMessage', message: /not JSON/ },
      },
      {
        name: 'a bad envelope (oslo.message not a string)',
        body: (a) => Buffer.from(JSON.stringify({ 'oslo.version': '2.0', 'oslo.message': { method: 'start_instance', args: { instance: instanceArg() }, ...a } })),
        call: true,
        log: 'malformed RPC message dropped',
        reason: /"oslo\.message" is an object, expected a JSON string/,
        failure: { class: 'MalformedMessage', message: /oslo\.message/ },
      },
      {
        name: 'no method',
        body: (a) => encodeEnvelope({ args: { instance: instanceArg() }, version: '6.0', _unique_id: newUniqueId(), ...a }),
        call: true,
        log: 'malformed RPC message dropped',
        reason: /^message has no "method"$/,
        failure: { class: 'MalformedMessage', message: /no "method"/ },
      },
      {
        name: 'args of the wrong type (a list)',
        body: (a) => encodeEnvelope({ method: 'snapshot_instance', args: [uuid, randomUUID()], version: '6.0', _unique_id: newUniqueId(), ...a }),
        call: true,
        log: 'malformed RPC message dropped',
        reason: /"args" of snapshot_instance is an array, expected a JSON object/,
        failure: { class: 'MalformedMessage', message: /"args"/ },
      },
      {
        name: 'an argument of the wrong type (instance a number)',
        body: (a) => encodeEnvelope({ method: 'snapshot_instance', args: { instance: 42, image_id: randomUUID() }, version: '6.0', _unique_id: newUniqueId(), ...a }),
        call: true,
        log: 'RPC request refused',
        reason: /argument instance is number 42/,
        failure: { class: 'InvalidArgument', message: /argument instance is number 42/ },
      },
      {
        name: 'a non-UUID image_id',
        body: (a) => encodeEnvelope({ method: 'snapshot_instance', args: { instance: instanceArg(), image_id: '../../etc/passwd' }, version: '6.0', _unique_id: newUniqueId(), ...a }),
        call: true,
        log: 'RPC request refused',
        reason: /argument image_id "\.\.\/\.\.\/etc\/passwd" is not an image id: expected a UUID/,
        failure: { class: 'InvalidArgument', message: /image_id/ },
      },
      {
        name: 'a 10 MiB payload',
        body: (a) =>
          encodeEnvelope({ method: 'start_instance', args: { instance: instanceArg(), padding: 'x'.repeat(10 * MiB) }, version: '6.0', _unique_id: newUniqueId(), ...a }),
        call: true,
        log: 'malformed RPC message dropped',
        reason: /^message body is \d+ bytes, over the limit of 1048576 bytes$/,
        failure: { class: 'MalformedMessage', message: /over the limit/ },
      },
    ];

    it.each(cases)('$name', async (tc) => {
      const { msgId, fields } = c().newCallAddress();
      const before = agent!.lines.length;
      const reply = tc.call ? c().waitReply(msgId, 60) : undefined;
      await c().sendRaw(tc.body(fields));
      // The line for this message: the next one with this text (and, for a call, its msg_id).
      const line: LogLine = await agent!.waitForLine(
        (l) => agent!.lines.indexOf(l) >= before && l.msg === tc.log && (!tc.call || l.msg_id === msgId),
        `${tc.log} for "${tc.name}"`,
      );
      expect(line.reason).toMatch(tc.reason);
      expect(line.level).toBe(40); // a warning: the agent's own fault would be an error
      if (reply) {
        const outcome = await reply;
        expect(outcome.failure).toMatchObject({ class: tc.failure!.class, message: expect.stringMatching(tc.failure!.message) });
        expect(outcome.result ?? null).toBeNull();
      }
      // Still serving: a valid call afterwards returns.
      expect(await c().call('reboot_instance', { instance: { uuid }, reboot_type: 'SOFT' }, { timeoutS: 60 })).toBeNull();
      expect(agent!.exitStatus).toBeUndefined();
    });

    it('wrote nothing for the refused requests and logged no unexpected error', async () => {
      const files = await fs.readdir(imagesDir);
      expect(files.filter((f) => f.includes('passwd'))).toEqual([]);
      expect(await fs.readdir(path.join(imagesDir, '.partial')).catch(() => [])).toEqual([]);
      expect(agent!.find(/unexpected error/)).toEqual([]);
      expect(client!.strayReplies).toEqual([]);
    });
  });

  it('stops cleanly on SIGTERM, leaving the guest running', async () => {
    expect(await agent!.stop()).toEqual({ code: 0, signal: null });
    expect(agent!.find('stopping: waiting for running operations')).toMatchObject([{ signal: 'SIGTERM' }]);
    expect(agent!.find('stopped')).toHaveLength(1);
    // Guests are daemonized: they outlive the agent.
    expect(await cliJson(conf, ['instances', 'list'])).toEqual([{ uuid, name: GUEST_NAME, state: 'running' }]);
  });
});

function dataOf(n: OsloNotification): Record<string, unknown> {
  return (n.payload['nova_object.data'] ?? {}) as Record<string, unknown>;
}
