/**
 * The RPC part of the hostile-input corpus (test/hostile/corpus.ts), through the real RpcServer,
 * ComputeManager and SnapshotEngine over the in-memory broker, on the fake hypervisor (which throws
 * on any §2 violation) with a real FileJournal and image store in a temp folder.
 *
 * Each case is published raw. A case whose reply address the server can read must get exactly one
 * failure reply naming what is wrong; every case must leave the matching log line ('malformed RPC
 * message dropped', 'RPC request refused' or 'RPC request failed') with its reason. After each case
 * two sentinel calls are answered (the server still serves, and anything the case sent back into
 * its own queues has been taken in), no request is left unfinished in the journal, no log line or
 * reply echoes a huge input, and Object.prototype is clean. After the corpus a valid snapshot still
 * succeeds, no guest changed state, the fake hypervisor saw only read-only calls and no violation,
 * and the store holds exactly the two valid images.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileJournal } from '../../src/compute/journal.js';
import { ComputeManager } from '../../src/compute/manager.js';
import type { Logger } from '../../src/log.js';
import type { Delivery } from '../../src/messaging/bus.js';
import { encodeEnvelope, JSON_PROPERTIES, unwrap, type ReplyMessage } from '../../src/messaging/envelope.js';
import { parseFailure, type OsloFailure } from '../../src/messaging/failure.js';
import { RpcServer } from '../../src/messaging/rpc-server.js';
import { openMemoryBus, type MemoryBus } from '../../src/messaging/transport/memory-bus.js';
import { guestIn, makeFakeEnv, type FakeEnv } from '../helpers/fake-env.js';
import { TestRpcClient } from '../helpers/rpc-client.js';
import {
  EXISTING_IMAGE,
  REPLY_Q,
  RPC_CASES,
  RUNNING_GUEST,
  SHUTOFF_GUEST,
  assertUniqueIds,
  replyAddress,
  type RpcCase,
} from '../hostile/corpus.js';

const HOST = 'hostile-host';
/** No log line of a case, and no failure message, may be longer than this: a huge input is never echoed. */
const MAX_LINE_BYTES = 8 * 1024;
const MAX_FAILURE_MESSAGE = 2 * 1024;
/** The fake hypervisor calls that change nothing. */
const READ_ONLY_OPS = new Set(['info', 'diskInfo', 'list', 'listInternalSnapshots']);

type Line = Record<string, unknown> & { msg?: string };

function captureLogger(): { log: Logger; lines: Line[] } {
  const lines: Line[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const text of chunk.toString().split('\n')) if (text.trim()) lines.push({ ...(JSON.parse(text) as Line), __bytes: text.length });
      cb();
    },
  });
  return { log: pino({ level: 'info' }, stream), lines };
}

/** Collects the replies that arrive on REPLY_Q, by `_msg_id`. */
class ReplyCollector {
  readonly byMsgId = new Map<string, ReplyMessage[]>();
  private readonly waiters = new Map<string, () => void>();

  constructor(private readonly bus: MemoryBus) {}

  async open(): Promise<void> {
    await this.bus.assertQueue(REPLY_Q, { durable: false, autoDelete: false });
    await this.bus.consume(REPLY_Q, (d) => this.onReply(d), {});
  }

  /** Resolves with the ending reply of msgId; rejects if none comes (the server stopped serving). */
  waitEnding(msgId: string): Promise<ReplyMessage> {
    const ending = () => this.byMsgId.get(msgId)?.find((r) => r.ending);
    const found = ending();
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const guard = setTimeout(() => {
        this.waiters.delete(msgId);
        reject(new Error(`no reply to ${msgId}: the server stopped answering`));
      }, 15_000);
      this.waiters.set(msgId, () => {
        const r = ending();
        if (!r) return;
        clearTimeout(guard);
        this.waiters.delete(msgId);
        resolve(r);
      });
    });
  }

  private onReply(d: Delivery): void {
    this.bus.ack(d);
    const reply = unwrap(d.body) as unknown as ReplyMessage;
    const list = this.byMsgId.get(reply._msg_id) ?? [];
    list.push(reply);
    this.byMsgId.set(reply._msg_id, list);
    this.waiters.get(reply._msg_id)?.();
  }
}

/** The log line the server writes for a failure of this class. */
function expectedLogMessage(cls: string): string {
  if (cls === 'MalformedMessage') return 'malformed RPC message dropped';
  if (cls === 'NoSuchMethod' || cls === 'UnsupportedVersion' || cls === 'InvalidArgument') return 'RPC request refused';
  return 'RPC request failed';
}

function isSentinelLine(l: Line): boolean {
  return l.method === 'hostile_sentinel' || String(l.msg_id ?? '').startsWith('sentinel-');
}

let env: FakeEnv;
let serverBus: MemoryBus;
let clientBus: MemoryBus;
let server: RpcServer;
let journal: FileJournal;
let client: TestRpcClient;
let replies: ReplyCollector;
let lines: Line[];
let existingChecksum: string | undefined;
let callsBeforeCorpus = 0;
let sentinelCount = 0;
const warnings: Error[] = [];
const onWarning = (w: Error) => warnings.push(w);
const prototypeNames = Object.getOwnPropertyNames(Object.prototype).sort();

beforeAll(async () => {
  assertUniqueIds();
  process.on('warning', onWarning);
  const capture = captureLogger();
  lines = capture.lines;
  env = await makeFakeEnv({ log: capture.log });
  await guestIn(env, 'running', RUNNING_GUEST);
  await guestIn(env, 'shutoff', SHUTOFF_GUEST);
  journal = await new FileJournal({ dir: path.join(env.tmp, 'state', 'journal'), log: capture.log }).open();
  const manager = new ComputeManager({
    engine: env.engine,
    lifecycle: env.lifecycle,
    store: env.store,
    hv: env.hv,
    log: capture.log,
    maxConcurrentSnapshots: 2,
  });
  const vhost = `/hostile-${randomUUID()}`;
  const silent = pino({ level: 'silent' });
  serverBus = openMemoryBus(vhost, silent);
  server = new RpcServer({ bus: serverBus, target: manager, journal, controlExchange: 'nova', host: HOST, log: capture.log });
  await server.start();
  clientBus = openMemoryBus(vhost, silent);
  replies = new ReplyCollector(clientBus);
  await replies.open();
  client = await new TestRpcClient(clientBus, { exchange: 'nova', topic: 'compute', version: '6.0' }).open();

  // Before the corpus: a valid snapshot (its image is the target of the image-id-existing case).
  const result = (await client.call('snapshot_instance', { instance: { uuid: RUNNING_GUEST }, image_id: EXISTING_IMAGE })) as { status: string };
  expect(result.status).toBe('active');
  existingChecksum = (await env.store.show(EXISTING_IMAGE)).checksum ?? undefined;
  expect(existingChecksum).toMatch(/^[0-9a-f]{32}$/);
  callsBeforeCorpus = env.hv.calls.length;
});

afterAll(async () => {
  process.off('warning', onWarning);
  await client?.close();
  await server?.stop();
  await clientBus?.close();
  await serverBus?.close();
  await env?.cleanup();
});

async function publish(c: RpcCase): Promise<void> {
  const body = typeof c.input.body === 'string' ? Buffer.from(c.input.body) : c.input.body;
  const properties = { ...JSON_PROPERTIES, ...c.input.properties };
  switch (c.input.route ?? 'topic') {
    case 'topic':
      return clientBus.publish('nova', 'compute', body, properties);
    case 'server':
      return clientBus.publish('nova', `compute.${HOST}`, body, properties);
    case 'fanout':
      return clientBus.publish('compute_fanout', 'compute', body, properties);
  }
}

/** A call the server answers with NoSuchMethod: once it is answered, everything sent before it was taken in. */
async function sentinel(): Promise<void> {
  const msgId = `sentinel-${++sentinelCount}`;
  const reply = replies.waitEnding(msgId);
  await clientBus.publish(
    'nova',
    'compute',
    encodeEnvelope({ method: 'hostile_sentinel', args: {}, version: '6.0', _unique_id: msgId, _msg_id: msgId, _reply_q: REPLY_Q }),
    { ...JSON_PROPERTIES },
  );
  const r = await reply;
  expect(parseFailure(String(r.failure)).class).toBe('NoSuchMethod');
}

describe('hostile RPC messages: a clear failure, the agent keeps serving', () => {
  it.each(RPC_CASES.map((c) => [c.id, c] as const))('%s', async (_id, c) => {
    const start = lines.length;
    const warningsBefore = warnings.length;
    const { _msg_id: msgId } = replyAddress(c.id);
    const replyWait = c.expect.reply ? replies.waitEnding(msgId) : undefined;
    await publish(c);

    let failure: OsloFailure | undefined;
    if (replyWait) {
      const reply = await replyWait;
      expect(reply.result).toBeNull();
      expect(reply.failure, 'the reply carries a failure').toEqual(expect.any(String));
      failure = parseFailure(String(reply.failure));
      expect(failure.class).toBe(c.expect.class);
      expect(failure.message).toMatch(c.expect.message);
      expect(failure.message.length).toBeLessThanOrEqual(MAX_FAILURE_MESSAGE);
    }
    // Two round trips: the server still answers, and whatever the case sent back into the server's
    // own queues (reply-q-own-queue) has been taken in too.
    await sentinel();
    await sentinel();
    await server.idle();

    // Exactly the expected replies: one ending reply for a call, none otherwise, never a keep-alive.
    expect(replies.byMsgId.get(msgId) ?? []).toHaveLength(c.expect.reply ? 1 : 0);

    const window = lines.slice(start).filter((l) => !isSentinelLine(l));
    const wanted = expectedLogMessage(c.expect.class);
    const line = window.find((l) => l.msg === wanted);
    expect(line, `log line "${wanted}" among ${JSON.stringify(window.map((l) => l.msg))}`).toBeDefined();
    expect(String(line!.reason)).toMatch(c.expect.message);
    if (wanted !== 'malformed RPC message dropped') expect(line!.error).toBe(c.expect.class);

    // Taken in once: at most the case itself and (for reply-q-own-queue) the failure it bounced back.
    expect(window.filter((l) => l.msg === 'malformed RPC message dropped' || l.msg === 'RPC request refused').length).toBeLessThanOrEqual(2);
    for (const l of window) {
      expect(l.__bytes as number, `log line "${l.msg}" is ${String(l.__bytes)} bytes`).toBeLessThanOrEqual(MAX_LINE_BYTES);
      expect(String(l.msg)).not.toMatch(/unexpected error|failed unexpectedly/);
      if (c.expect.absent) expect(JSON.stringify(l)).not.toMatch(c.expect.absent);
    }
    if (c.expect.absent && failure) expect(JSON.stringify(failure)).not.toMatch(c.expect.absent);

    expect(await journal.unfinished()).toEqual([]);
    expect(warnings.slice(warningsBefore).map((w) => `${w.name}: ${w.message}`), 'process warnings').toEqual([]);
    expect(Object.getOwnPropertyNames(Object.prototype).sort()).toEqual(prototypeNames);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it('after the whole corpus: a valid snapshot still succeeds, nothing else changed', async () => {
    const corpusCalls = env.hv.calls.slice(callsBeforeCorpus);
    expect(corpusCalls.filter((call) => !READ_ONLY_OPS.has(call.op)).map((call) => call.op)).toEqual([]);

    const imageId = randomUUID();
    const result = (await client.call('snapshot_instance', { instance: { uuid: RUNNING_GUEST }, image_id: imageId })) as { status: string; image_id: string };
    expect(result).toMatchObject({ status: 'active', image_id: imageId });

    expect(env.hv.violations).toEqual([]);
    expect(env.hv.powerState(RUNNING_GUEST)).toBe('running');
    expect(env.hv.powerState(SHUTOFF_GUEST)).toBe('shutoff');
    expect(env.hv.snapshotNames(RUNNING_GUEST)).toEqual([]);
    expect(env.hv.snapshotNames(SHUTOFF_GUEST)).toEqual([]);

    const images = await env.store.list();
    expect(images.map((i) => [i.id, i.status]).sort()).toEqual([[EXISTING_IMAGE, 'active'], [imageId, 'active']].sort());
    expect((await env.store.show(EXISTING_IMAGE)).checksum).toBe(existingChecksum);
    expect((await env.store.verify(EXISTING_IMAGE)).ok).toBe(true);
    expect((await fs.readdir(env.store.path)).sort()).toEqual(['.partial', EXISTING_IMAGE, `${EXISTING_IMAGE}.json`, imageId, `${imageId}.json`].sort());
    expect(await env.partialFiles()).toEqual([]);

    expect(await journal.unfinished()).toEqual([]);
    expect(warnings.map((w) => `${w.name}: ${w.message}`)).toEqual([]);
    expect(Object.getOwnPropertyNames(Object.prototype).sort()).toEqual(prototypeNames);
    expect(lines.filter((l) => /unexpected error|failed unexpectedly/.test(String(l.msg)))).toEqual([]);
  });
});
