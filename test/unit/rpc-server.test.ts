import { randomUUID } from 'node:crypto';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { InstanceNotFound, InvalidArgument } from '../../src/errors.js';
import type { Logger } from '../../src/log.js';
import { encodeEnvelope, unwrap } from '../../src/messaging/envelope.js';
import { DRIVER_ERRORS_MODULE, OSLO_DISPATCHER_MODULE } from '../../src/messaging/failure.js';
import { RpcServer, type RpcCallContext, type RpcServerDeps } from '../../src/messaging/rpc-server.js';
import type { JournalEntry, RequestJournal, RpcContext, RpcRequest, RpcTarget } from '../../src/messaging/rpc-types.js';
import { openMemoryBus, type MemoryBus } from '../../src/messaging/transport/memory-bus.js';
import { rabbitTopologyFromConfig } from '../../src/messaging/topology.js';
import { isUuid } from '../../src/util/uuid.js';
import { rabbitOptionsSchema } from '../../src/config/schema.js';
import { RemoteFailure, TestRpcClient } from '../helpers/rpc-client.js';

const HOST = 'host1';
const INSTANCE = '178b0921-8f85-4257-88b6-2e743b5a975c';
const IMAGE = 'd2aae36f-785c-4518-8016-bc9534d9fc7f';

function deferred<T = void>() {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

interface Call {
  method: string;
  args: Record<string, unknown>;
  ctx: RpcCallContext;
}

/** A stub compute manager: serves snapshot_instance/start_instance plus test hooks. */
class StubTarget implements RpcTarget {
  readonly version = '6.2';
  readonly methods = new Set(['snapshot_instance', 'start_instance', 'slow', 'explode']);
  readonly calls: Call[] = [];
  /** Per-method behaviour; default: echo. */
  readonly handlers: Record<string, (args: Record<string, unknown>) => Promise<unknown>> = {};
  private readonly callWaiters: Array<{ n: number; resolve: () => void }> = [];

  validate(method: string, args: Record<string, unknown>): void {
    if (method === 'snapshot_instance' && !isUuid(args.image_id)) {
      throw new InvalidArgument(`argument image_id: expected a UUID, got ${JSON.stringify(args.image_id)}`);
    }
  }

  async call(method: string, args: Record<string, unknown>, ctx: RpcContext): Promise<unknown> {
    this.calls.push({ method, args, ctx: ctx as RpcCallContext });
    for (const w of this.callWaiters.filter((w) => this.calls.length >= w.n)) w.resolve();
    const handler = this.handlers[method];
    if (handler) return handler(args);
    if (method === 'explode') throw new InstanceNotFound(INSTANCE);
    return { method, image_id: args.image_id ?? null };
  }

  /** Resolves once n calls have started. */
  waitCalls(n: number): Promise<void> {
    if (this.calls.length >= n) return Promise.resolve();
    const d = deferred();
    this.callWaiters.push({ n, resolve: d.resolve });
    return d.promise;
  }
}

/** An in-memory RequestJournal that records the order of events. */
class MemoryJournal implements RequestJournal {
  readonly entries: Array<JournalEntry & { finished?: { ok: boolean; error?: string } }> = [];
  async has(uniqueId: string): Promise<boolean> {
    return this.entries.some((e) => e.request.uniqueId === uniqueId);
  }
  async accept(request: RpcRequest): Promise<JournalEntry> {
    const entry = { id: `j${this.entries.length + 1}`, request: structuredClone(request), acceptedAt: new Date().toISOString() };
    this.entries.push(entry);
    return entry;
  }
  async finish(id: string, outcome: { ok: boolean; error?: string }): Promise<void> {
    const entry = this.entries.find((e) => e.id === id);
    if (!entry) throw new Error(`no journal entry ${id}`);
    entry.finished = outcome;
  }
  async unfinished(): Promise<JournalEntry[]> {
    return this.entries.filter((e) => !e.finished);
  }
}

function captureLogger(): { log: Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n')) if (line.trim()) lines.push(JSON.parse(line) as Record<string, unknown>);
      cb();
    },
  });
  return { log: pino({ level: 'debug' }, stream), lines };
}

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
  vi.restoreAllMocks();
});

interface Env {
  vhost: string;
  bus: MemoryBus;
  target: StubTarget;
  journal: MemoryJournal;
  server: RpcServer;
  client: TestRpcClient;
  lines: Array<Record<string, unknown>>;
  /** Drops the server from cleanup (a "crashed" server whose call never ends cannot be stopped). */
  abandonServer(): void;
}

async function openBus(vhost: string): Promise<MemoryBus> {
  const bus = openMemoryBus(vhost, pino({ level: 'silent' }));
  cleanups.push(() => bus.close());
  return bus;
}

async function setup(
  o: { vhost?: string; journal?: MemoryJournal; target?: StubTarget; start?: boolean; deps?: Partial<RpcServerDeps> } = {},
): Promise<Env> {
  const vhost = o.vhost ?? `/rpc-test-${randomUUID()}`;
  const bus = await openBus(vhost);
  const target = o.target ?? new StubTarget();
  const journal = o.journal ?? new MemoryJournal();
  const { log, lines } = captureLogger();
  const server = new RpcServer({ bus, target, journal, controlExchange: 'nova', host: HOST, log, ...o.deps });
  const stopServer = () => server.stop();
  if (o.start !== false) {
    await server.start();
    cleanups.push(stopServer);
  }
  const clientBus = await openBus(vhost);
  const client = await new TestRpcClient(clientBus, { exchange: 'nova', topic: 'compute', version: '6.0' }).open();
  cleanups.push(() => client.close());
  const abandonServer = () => {
    const i = cleanups.indexOf(stopServer);
    if (i >= 0) cleanups.splice(i, 1);
  };
  return { vhost, bus, target, journal, server, client, lines, abandonServer };
}

const snapshotArgs = (over: Record<string, unknown> = {}) => ({ instance: { uuid: INSTANCE }, image_id: IMAGE, ...over });

describe('RpcServer topology', () => {
  it("declares oslo's rabbit topology for topic compute on server <host>", async () => {
    const vhost = `/rpc-test-${randomUUID()}`;
    const bus = await openBus(vhost);
    const exchanges = vi.spyOn(bus, 'assertExchange');
    const queues = vi.spyOn(bus, 'assertQueue');
    const binds = vi.spyOn(bus, 'bindQueue');
    const consumes = vi.spyOn(bus, 'consume');
    const server = new RpcServer({
      bus, target: new StubTarget(), journal: new MemoryJournal(), controlExchange: 'nova', host: HOST, log: pino({ level: 'silent' }),
    });
    await server.start();
    cleanups.push(() => server.stop());

    const fanoutQueue = server.queues!.fanoutQueue;
    expect(fanoutQueue).toMatch(/^compute_fanout_[0-9a-f]{32}$/);
    expect(exchanges.mock.calls).toEqual([
      ['nova', 'topic', { durable: false, autoDelete: false }],
      ['compute_fanout', 'fanout', { durable: false, autoDelete: true }],
    ]);
    expect(queues.mock.calls).toEqual([
      ['compute', { durable: false, autoDelete: false }],
      [`compute.${HOST}`, { durable: false, autoDelete: false }],
      [fanoutQueue, { durable: false, autoDelete: false, arguments: { 'x-expires': 1_800_000 } }],
    ]);
    expect(binds.mock.calls).toEqual([
      ['compute', 'nova', 'compute'],
      [`compute.${HOST}`, 'nova', `compute.${HOST}`],
      [fanoutQueue, 'compute_fanout', 'compute'],
    ]);
    expect(consumes.mock.calls.map((c) => [c[0], c[2]])).toEqual([
      ['compute', { prefetch: 0 }],
      [`compute.${HOST}`, { prefetch: 0 }],
      [fanoutQueue, { prefetch: 0 }],
    ]);
  });

  it('follows amqp_durable_queues / rabbit_quorum_queue / prefetch / transient TTL', async () => {
    const bus = await openBus(`/rpc-test-${randomUUID()}`);
    const exchanges = vi.spyOn(bus, 'assertExchange');
    const queues = vi.spyOn(bus, 'assertQueue');
    const consumes = vi.spyOn(bus, 'consume');
    const server = new RpcServer({
      bus, target: new StubTarget(), journal: new MemoryJournal(), controlExchange: 'openstack', host: HOST,
      rabbit: { quorumQueues: true, prefetchCount: 5, transientQueuesTtlS: 60 }, log: pino({ level: 'silent' }),
    });
    await server.start();
    cleanups.push(() => server.stop());
    expect(exchanges.mock.calls[0]).toEqual(['openstack', 'topic', { durable: true, autoDelete: false }]);
    expect(queues.mock.calls).toEqual([
      ['compute', { durable: true, autoDelete: false, arguments: { 'x-queue-type': 'quorum' } }],
      [`compute.${HOST}`, { durable: true, autoDelete: false, arguments: { 'x-queue-type': 'quorum' } }],
      [server.queues!.fanoutQueue, { durable: false, autoDelete: false, arguments: { 'x-expires': 60_000 } }],
    ]);
    expect(consumes.mock.calls.every((c) => c[2]?.prefetch === 5)).toBe(true);
  });

  it('maps the [oslo_messaging_rabbit] options', () => {
    const o = rabbitOptionsSchema.parse({ amqp_durable_queues: 'true', amqp_auto_delete: 'yes', rabbit_qos_prefetch_count: '10' });
    expect(rabbitTopologyFromConfig(o)).toEqual({ durableQueues: true, autoDelete: true, quorumQueues: false, prefetchCount: 10 });
  });

  it('refuses quorum and HA queues together, as oslo does', () => {
    expect(
      () =>
        new RpcServer({
          bus: {} as MemoryBus, target: new StubTarget(), journal: new MemoryJournal(), controlExchange: 'nova', host: HOST,
          rabbit: { quorumQueues: true, haQueues: true }, log: pino({ level: 'silent' }),
        }),
    ).toThrow(/quorum.*HA/);
  });
});

describe('RpcServer requests', () => {
  it('answers a call with the result and one ending reply', async () => {
    const { client, target, journal } = await setup();
    const outcome = await client.callRaw('snapshot_instance', snapshotArgs(), { context: { request_id: 'req-abc', user_id: 'u1' } });
    expect(outcome.failure).toBeNull();
    expect(outcome.result).toEqual({ method: 'snapshot_instance', image_id: IMAGE });
    expect(outcome.replies).toHaveLength(1);
    expect(outcome.replies[0]).toMatchObject({ ending: true, failure: null });
    expect(target.calls).toHaveLength(1);
    expect(target.calls[0]!.ctx).toMatchObject({ requestId: 'req-abc', userId: 'u1' });
    expect(journal.entries).toHaveLength(1);
    expect(journal.entries[0]!.finished).toEqual({ ok: true });
  });

  it('carries out casts on compute, compute.<host> and the fanout exchange', async () => {
    const { client, target } = await setup();
    await client.cast('start_instance', { instance: { uuid: INSTANCE } });
    await client.cast('start_instance', { instance: { uuid: INSTANCE } }, { server: HOST });
    await client.cast('start_instance', { instance: { uuid: INSTANCE } }, { fanout: true });
    await target.waitCalls(3);
    expect(target.calls.map((c) => c.method)).toEqual(['start_instance', 'start_instance', 'start_instance']);
  });

  it('gives the call a logger carrying request_id and instance_uuid', async () => {
    const { client, target, lines } = await setup();
    await client.call('snapshot_instance', snapshotArgs(), { context: { request_id: 'req-log' } });
    expect(target.calls[0]!.ctx.log.bindings()).toMatchObject({ request_id: 'req-log', instance_uuid: INSTANCE });
    const accepted = lines.find((l) => l.msg === 'RPC request accepted');
    expect(accepted).toMatchObject({ request_id: 'req-log', instance_uuid: INSTANCE, method: 'snapshot_instance' });
  });

  it('answers an unknown method with NoSuchMethod and keeps serving', async () => {
    const { client, journal } = await setup();
    const err = await client.call('reboot_instance', { instance: { uuid: INSTANCE } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RemoteFailure);
    expect((err as RemoteFailure).failure).toMatchObject({
      class: 'NoSuchMethod',
      module: OSLO_DISPATCHER_MODULE,
      message: 'Endpoint does not support RPC method reboot_instance',
    });
    expect(journal.entries).toHaveLength(0);
    await expect(client.call('snapshot_instance', snapshotArgs())).resolves.toBeTruthy();
  });

  it.each(['7.0', '6.9'])('answers version %s (serving 6.2) with UnsupportedVersion', async (version) => {
    const { client, target, journal } = await setup();
    const err = await client.call('snapshot_instance', snapshotArgs(), { version }).catch((e: unknown) => e);
    expect((err as RemoteFailure).failure).toMatchObject({ class: 'UnsupportedVersion', module: OSLO_DISPATCHER_MODULE });
    expect((err as RemoteFailure).failure.message).toMatch(new RegExp(`RPC version ${version.replace('.', '\\.')}`));
    expect(target.calls).toHaveLength(0);
    expect(journal.entries).toHaveLength(0);
  });

  it('answers bad arguments with a failure naming the argument, without journaling', async () => {
    const { client, target, journal } = await setup();
    const err = await client.call('snapshot_instance', snapshotArgs({ image_id: 42 })).catch((e: unknown) => e);
    expect((err as RemoteFailure).failure).toMatchObject({ class: 'InvalidArgument', module: DRIVER_ERRORS_MODULE });
    expect((err as RemoteFailure).failure.message).toContain('image_id');
    expect(target.calls).toHaveLength(0);
    expect(journal.entries).toHaveLength(0);
  });

  it("answers a failed call with the error's class and records the failure in the journal", async () => {
    const { client, journal } = await setup();
    const err = await client.call('explode', { instance: { uuid: INSTANCE } }).catch((e: unknown) => e);
    expect((err as RemoteFailure).failure).toMatchObject({
      class: 'InstanceNotFound', module: DRIVER_ERRORS_MODULE, message: `instance ${INSTANCE} not found`,
    });
    expect(journal.entries[0]!.finished).toEqual({ ok: false, error: `InstanceNotFound: instance ${INSTANCE} not found` });
  });

  it('runs a request whose _unique_id was seen before only once', async () => {
    const { client, target, lines } = await setup();
    await client.cast('start_instance', { instance: { uuid: INSTANCE } }, { uniqueId: 'dup-1' });
    await client.cast('start_instance', { instance: { uuid: INSTANCE } }, { uniqueId: 'dup-1' });
    await client.call('snapshot_instance', snapshotArgs()); // the queue is FIFO: both casts were taken in by now
    expect(target.calls.map((c) => c.method)).toEqual(['start_instance', 'snapshot_instance']);
    expect(lines.filter((l) => String(l.msg).startsWith('duplicate RPC request dropped'))).toHaveLength(1);
  });

  it('journals a request before acknowledging it', async () => {
    const { bus, client, journal } = await setup();
    const acks: Array<[string, boolean]> = [];
    const ack = bus.ack.bind(bus);
    vi.spyOn(bus, 'ack').mockImplementation((d) => {
      const id = unwrap(d.body)._unique_id as string;
      acks.push([id, journal.entries.some((e) => e.request.uniqueId === id)]);
      ack(d);
    });
    await client.cast('start_instance', { instance: { uuid: INSTANCE } }, { uniqueId: 'order-1' });
    await client.call('snapshot_instance', snapshotArgs(), { uniqueId: 'order-2' });
    expect(acks).toEqual([['order-1', true], ['order-2', true]]);
  });

  it('sends keep-alive replies every _timeout/2 s while a call runs', async () => {
    const { client, target } = await setup();
    const enough = deferred();
    target.handlers.slow = async () => {
      await enough.promise;
      return 'done';
    };
    const outcome = await client.callRaw('slow', {}, {
      callMonitorTimeoutS: 2,
      onKeepAlive: (n) => {
        if (n >= 2) enough.resolve();
      },
    });
    expect(outcome.result).toBe('done');
    expect(outcome.keepAlives).toBeGreaterThanOrEqual(2);
    expect(outcome.replies.slice(0, -1).every((r) => r.ending === false && r.result === null && r.failure === null)).toBe(true);
    expect(outcome.replies.at(-1)).toMatchObject({ ending: true, result: 'done' });
    expect(new Set(outcome.replies.map((r) => r._unique_id)).size).toBe(outcome.replies.length);
  });

  it('sends no keep-alives to a client that sent no _timeout', async () => {
    const { client } = await setup();
    const outcome = await client.callRaw('snapshot_instance', snapshotArgs());
    expect(outcome.keepAlives).toBe(0);
  });
});

describe('RpcServer malformed messages', () => {
  function malformedLines(lines: Array<Record<string, unknown>>) {
    return lines.filter((l) => l.msg === 'malformed RPC message dropped');
  }

  it.each([
    ['not JSON', () => Buffer.from('{"method": "snapshot_instance", '), /not JSON/],
    ['a bad envelope version', () => Buffer.from(JSON.stringify({ 'oslo.version': '3.0', 'oslo.message': '{}' })), /unsupported envelope version "3.0"/],
    ['oslo.message not a string', () => Buffer.from(JSON.stringify({ 'oslo.version': '2.0', 'oslo.message': { method: 'x' } })), /expected a JSON string/],
  ])('logs and drops %s (no reply address) and keeps serving', async (_name, body, reason) => {
    const { client, lines, bus } = await setup();
    await client.sendRaw(body());
    await expect(client.call('snapshot_instance', snapshotArgs())).resolves.toBeTruthy();
    const dropped = malformedLines(lines);
    expect(dropped).toHaveLength(1); // acked once, never redelivered
    expect(String(dropped[0]!.reason)).toMatch(reason);
    expect(bus.broker.messageCount('compute')).toBe(0);
  });

  it('answers a truncated call it can still read the reply address of', async () => {
    const { client, lines } = await setup();
    const { msgId, fields } = client.newCallAddress();
    const reply = client.waitReply(msgId);
    const whole = encodeEnvelope({ method: 'snapshot_instance', args: snapshotArgs(), version: '6.0', ...fields }).toString();
    await client.sendRaw(Buffer.from(whole.slice(0, whole.length - 2)));
    const outcome = await reply;
    expect(outcome.failure).toMatchObject({ class: 'MalformedMessage' });
    expect(outcome.failure!.message).toMatch(/not JSON/);
    expect(malformedLines(lines)).toHaveLength(1);
  });

  it.each([
    ['no method', (a: Record<string, unknown>) => encodeEnvelope({ args: {}, version: '6.0', ...a }), /no "method"/],
    ['method not a string', (a: Record<string, unknown>) => encodeEnvelope({ method: ['x'], args: {}, ...a }), /"method" is an array/],
    ['args not an object', (a: Record<string, unknown>) => encodeEnvelope({ method: 'snapshot_instance', args: [INSTANCE, IMAGE], ...a }), /"args" of snapshot_instance is an array/],
    ['version not a string', (a: Record<string, unknown>) => encodeEnvelope({ method: 'snapshot_instance', args: {}, version: 6, ...a }), /"version" of snapshot_instance is 6/],
    [
      'a 10 MiB payload',
      (a: Record<string, unknown>) =>
        encodeEnvelope({ method: 'snapshot_instance', args: { pad: 'x'.repeat(10 * 1024 * 1024) }, version: '6.0', ...a }),
      /over the limit of 1048576 bytes/,
    ],
  ])('answers a call with %s with a MalformedMessage failure, and keeps serving', async (_name, build, reason) => {
    const { client, lines, target, journal } = await setup();
    const { msgId, fields } = client.newCallAddress();
    const reply = client.waitReply(msgId);
    await client.sendRaw(build({ ...fields, _unique_id: randomUUID() }));
    const outcome = await reply;
    expect(outcome.failure).toMatchObject({ class: 'MalformedMessage', module: DRIVER_ERRORS_MODULE });
    expect(outcome.failure!.message).toMatch(reason);
    expect(String(malformedLines(lines)[0]!.reason)).toMatch(reason);
    expect(target.calls).toHaveLength(0);
    expect(journal.entries).toHaveLength(0);
    await expect(client.call('snapshot_instance', snapshotArgs())).resolves.toBeTruthy();
    expect(malformedLines(lines)).toHaveLength(1);
  });
});

describe('RpcServer journal replay and lifecycle', () => {
  it('re-runs a request a crashed server had accepted, on a new server, and replies to it', async () => {
    const journal = new MemoryJournal();
    const stuck = new StubTarget();
    stuck.handlers.snapshot_instance = () => new Promise(() => {}); // the first server "crashes" mid-call
    const first = await setup({ journal, target: stuck });
    const { msgId, fields } = first.client.newCallAddress();
    const reply = first.client.waitReply(msgId);
    await first.client.sendRaw(
      encodeEnvelope({ method: 'snapshot_instance', args: snapshotArgs(), version: '6.0', _unique_id: 'crash-1', ...fields }),
    );
    await stuck.waitCalls(1);
    expect(journal.entries.map((e) => e.request.uniqueId)).toEqual(['crash-1']);
    first.abandonServer();
    await first.bus.close(); // the crashed process's connection is gone

    const second = await setup({ vhost: first.vhost, journal });
    const outcome = await reply;
    expect(outcome.result).toEqual({ method: 'snapshot_instance', image_id: IMAGE });
    expect(second.target.calls.map((c) => c.args)).toEqual([snapshotArgs()]);
    expect(journal.entries[0]!.finished).toEqual({ ok: true });
    expect(second.lines.some((l) => l.msg === 'resuming an unfinished RPC request')).toBe(true);
  });

  it('carries out unfinished requests before consuming new ones', async () => {
    const journal = new MemoryJournal();
    await journal.accept({ method: 'start_instance', args: { instance: { uuid: INSTANCE } }, version: '6.0', uniqueId: 'old', context: { request_id: 'req-old' } });
    const vhost = `/rpc-test-${randomUUID()}`;
    const pre = await setup({ vhost, start: false });
    // The topic queue exists (as after a previous run) and holds a new request.
    await pre.bus.assertExchange('nova', 'topic', { durable: false, autoDelete: false });
    await pre.bus.assertQueue('compute', { durable: false, autoDelete: false });
    await pre.bus.bindQueue('compute', 'nova', 'compute');
    await pre.client.cast('start_instance', { instance: { uuid: INSTANCE } }, { uniqueId: 'new' });

    const target = new StubTarget();
    const { server } = await setup({ vhost, journal, target });
    await target.waitCalls(2);
    await server.idle();
    expect(target.calls.map((c) => c.ctx.requestId)).toEqual(['req-old', expect.stringMatching(/^req-/)]);
    expect(journal.entries.map((e) => [e.request.uniqueId, e.finished?.ok])).toEqual([['old', true], ['new', true]]);
  });

  it('stop() waits for running calls and leaves new requests in the queue', async () => {
    const { client, target, server, bus } = await setup();
    const release = deferred();
    target.handlers.slow = async () => {
      await release.promise;
      return 'late';
    };
    const call = client.call('slow', {});
    await target.waitCalls(1);
    let stopped = false;
    const stopping = server.stop().then(() => (stopped = true));
    await new Promise((r) => setImmediate(r));
    expect(stopped).toBe(false);
    release.resolve();
    await stopping;
    await expect(call).resolves.toBe('late');

    await client.cast('start_instance', { instance: { uuid: INSTANCE } });
    expect(bus.broker.messageCount('compute')).toBe(1);
    expect(target.calls).toHaveLength(1);
  });

  it('keeps serving after the connection is lost and restored', async () => {
    const { client, bus } = await setup();
    await bus.simulateConnectionLoss();
    await expect(client.call('snapshot_instance', snapshotArgs())).resolves.toEqual({ method: 'snapshot_instance', image_id: IMAGE });
  });
});
