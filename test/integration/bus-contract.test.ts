import { randomUUID } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { rabbitOptionsSchema, type RabbitOptions } from '../../src/config/schema.js';
import { BrokerError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import type { Bus, Delivery } from '../../src/messaging/bus.js';
import { MemoryBus } from '../../src/messaging/transport/memory-bus.js';
import { openBus } from '../../src/messaging/transport/open-bus.js';
import { RabbitBus } from '../../src/messaging/transport/rabbit-bus.js';
import { closeRabbitConnections, createRabbitVhost, deleteRabbitVhost, ensureRabbit, restartRabbit } from '../helpers/rabbitmq.js';

/**
 * One contract, two brokers: every test runs on memory:// and on a real RabbitMQ, so the
 * in-process broker cannot drift from RabbitMQ's behaviour.
 */

/** Reconnect fast in tests (the defaults wait 1 s, then 3 s, …). */
const RABBIT: RabbitOptions = rabbitOptionsSchema.parse({
  rabbit_retry_interval: '0.2',
  rabbit_retry_backoff: '0.2',
  rabbit_interval_max: '1',
});
const WAIT_MS = 20_000;
const QUIET_MS = 150;

interface Backend {
  name: 'memory' | 'rabbit';
  /** The URL of a vhost of its own for this file. */
  setUp(): Promise<string>;
  tearDown(): Promise<void>;
  /** Makes `bus` lose its connection to the broker (and come back). */
  loseConnection(bus: Bus): Promise<void>;
}

const rabbitVhost = `bus-contract-${process.pid}`;
const BACKENDS: Backend[] = [
  {
    name: 'memory',
    setUp: async () => `memory:///bus-contract-${randomUUID()}`,
    tearDown: async () => {},
    loseConnection: async (bus) => {
      expect(bus).toBeInstanceOf(MemoryBus);
      await (bus as MemoryBus).simulateConnectionLoss();
    },
  },
  {
    name: 'rabbit',
    setUp: async () => {
      await ensureRabbit();
      return createRabbitVhost(rabbitVhost);
    },
    tearDown: () => deleteRabbitVhost(rabbitVhost),
    loseConnection: async (bus) => {
      expect(bus).toBeInstanceOf(RabbitBus);
      await restartRabbit();
    },
  },
];

/** Deliveries of one consumer, awaited in order. */
class Inbox {
  readonly received: Delivery[] = [];
  private waiters: Array<() => void> = [];

  readonly handler = (d: Delivery): void => {
    this.received.push(d);
    for (const wake of this.waiters.splice(0)) wake();
  };

  /** Resolves once `count` deliveries have arrived in total. */
  async waitFor(count: number, what = `${count} deliveries`): Promise<Delivery[]> {
    const deadline = Date.now() + WAIT_MS;
    while (this.received.length < count) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}; got ${this.received.length}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    return this.received.slice(0, count);
  }

  bodies(): string[] {
    return this.received.map((d) => d.body.toString());
  }
}

function once(bus: Bus, event: 'reconnected' | 'disconnected'): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no '${event}' event within ${WAIT_MS * 3} ms`)), WAIT_MS * 3);
    bus.on(event, (info) => {
      clearTimeout(timer);
      resolve(info);
    });
  });
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Every message ready in a queue, taken with basic.get. */
async function drain(bus: Bus, queue: string): Promise<string[]> {
  const bodies: string[] = [];
  for (;;) {
    const d = await bus.get(queue, { noAck: true });
    if (!d) return bodies;
    bodies.push(d.body.toString());
  }
}

async function brokerError(promise: Promise<unknown>): Promise<BrokerError> {
  try {
    await promise;
  } catch (err) {
    expect(err).toBeInstanceOf(BrokerError);
    return err as BrokerError;
  }
  throw new Error('expected a BrokerError, but the operation succeeded');
}

const transient = { durable: false, autoDelete: false } as const;

describe.each(BACKENDS)('Bus contract on $name://', (backend) => {
  let url: string;
  let open: Bus[] = [];
  /** Names unique to one test, so that tests never see each other's queues. */
  let n = 0;
  const unique = (what: string) => `${what}-${++n}-${randomUUID().slice(0, 8)}`;

  async function connect(): Promise<Bus> {
    const bus = await openBus(url, RABBIT, silentLogger());
    open.push(bus);
    return bus;
  }

  beforeAll(async () => {
    url = await backend.setUp();
  });

  afterEach(async () => {
    await Promise.all(open.map((bus) => bus.close()));
    open = [];
  });

  afterAll(async () => {
    await backend.tearDown();
  });

  it('routes topic messages: "*" is one word, "#" zero or more words', async () => {
    const bus = await connect();
    const exchange = unique('topic');
    await bus.assertExchange(exchange, 'topic', transient);
    const patterns = { hash: 'a.#', star: 'a.*', middle: 'x.#.y', all: '#', exact: 'a.b' };
    const queues: Record<string, string> = {};
    for (const [name, pattern] of Object.entries(patterns)) {
      queues[name] = await bus.assertQueue(unique(name), transient);
      await bus.bindQueue(queues[name]!, exchange, pattern);
    }
    const keys = ['a', 'a.b', 'a.b.c', 'x.y', 'x.q.y', 'x.q', 'b'];
    for (const key of keys) await bus.publish(exchange, key, Buffer.from(key));

    expect(await drain(bus, queues.hash!)).toEqual(['a', 'a.b', 'a.b.c']);
    expect(await drain(bus, queues.star!)).toEqual(['a.b']);
    expect(await drain(bus, queues.middle!)).toEqual(['x.y', 'x.q.y']);
    expect(await drain(bus, queues.all!)).toEqual(keys);
    expect(await drain(bus, queues.exact!)).toEqual(['a.b']);
  });

  it('delivers a message once to a queue bound with several matching keys', async () => {
    const bus = await connect();
    const exchange = unique('topic');
    await bus.assertExchange(exchange, 'topic', transient);
    const queue = await bus.assertQueue(unique('q'), transient);
    await bus.bindQueue(queue, exchange, 'a.*');
    await bus.bindQueue(queue, exchange, 'a.#');
    await bus.publish(exchange, 'a.b', Buffer.from('once'));
    expect(await drain(bus, queue)).toEqual(['once']);
  });

  it('fans out to every bound queue, whatever the routing key', async () => {
    const bus = await connect();
    const exchange = unique('fanout');
    await bus.assertExchange(exchange, 'fanout', { durable: false, autoDelete: true });
    const q1 = await bus.assertQueue(unique('f1'), transient);
    const q2 = await bus.assertQueue(unique('f2'), transient);
    await bus.bindQueue(q1, exchange, 'compute');
    await bus.bindQueue(q2, exchange, 'something-else');
    await bus.publish(exchange, 'compute', Buffer.from('to all'));
    expect(await drain(bus, q1)).toEqual(['to all']);
    expect(await drain(bus, q2)).toEqual(['to all']);
  });

  it('routes direct messages by exact key', async () => {
    const bus = await connect();
    const exchange = unique('direct');
    await bus.assertExchange(exchange, 'direct', transient);
    const queue = await bus.assertQueue(unique('d'), transient);
    await bus.bindQueue(queue, exchange, 'k1');
    await bus.publish(exchange, 'k1', Buffer.from('yes'));
    await bus.publish(exchange, 'k1.x', Buffer.from('no'));
    expect(await drain(bus, queue)).toEqual(['yes']);
  });

  it('routes through the default exchange by queue name, and drops what matches no queue', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('reply'), transient);
    await bus.publish('', queue, Buffer.from('direct to queue'));
    await bus.publish('', unique('no-such-queue'), Buffer.from('dropped'));
    const d = await bus.get(queue);
    expect(d?.body.toString()).toBe('direct to queue');
    expect(d?.fields).toMatchObject({ exchange: '', routingKey: queue, redelivered: false });
    bus.ack(d!);
    expect(await bus.get(queue)).toBeUndefined();
  });

  it('names a server-named exclusive queue, keeps it to its connection and drops it on close', async () => {
    const owner = await connect();
    const other = await connect();
    const queue = await owner.assertQueue('', { durable: false, autoDelete: false, exclusive: true });
    expect(queue).toMatch(/^amq\.gen-[A-Za-z0-9_-]{10,}$/);

    await owner.publish('', queue, Buffer.from('mine'));
    expect((await owner.get(queue, { noAck: true }))?.body.toString()).toBe('mine');
    expect((await brokerError(other.consume(queue, () => {}))).code).toBe(405);
    expect((await brokerError(other.get(queue))).code).toBe(405);

    await owner.close();
    const err = await brokerError(other.get(queue));
    expect(err.code).toBe(404);
    expect(err.message).toContain(`no queue '${queue}'`);
    // `other` still works after the refusals.
    const mine = await other.assertQueue(unique('after'), transient);
    await other.publish('', mine, Buffer.from('ok'));
    expect(await drain(other, mine)).toEqual(['ok']);
  });

  it('holds further messages back from a prefetch-1 consumer until it acks', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('prefetch'), transient);
    let outstanding = 0;
    let maxOutstanding = 0;
    const inbox = new Inbox();
    await bus.consume(
      queue,
      (d) => {
        outstanding++;
        maxOutstanding = Math.max(maxOutstanding, outstanding);
        inbox.handler(d);
        // Ack a little later, so that a broker ignoring the prefetch would deliver meanwhile.
        setTimeout(() => {
          outstanding--;
          bus.ack(d);
        }, 30);
      },
      { prefetch: 1 },
    );
    for (const body of ['1', '2', '3', '4']) await bus.publish('', queue, Buffer.from(body));
    await inbox.waitFor(4);
    expect(inbox.bodies()).toEqual(['1', '2', '3', '4']);
    expect(maxOutstanding).toBe(1);
  });

  it('applies prefetch per consumer: a held-back message goes to another consumer at once', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('prefetch'), transient);
    const slow = new Inbox();
    await bus.consume(queue, slow.handler, { prefetch: 1 });
    await bus.publish('', queue, Buffer.from('m1'));
    await bus.publish('', queue, Buffer.from('m2'));
    await slow.waitFor(1);

    // m2 is still in the queue (m1 is unacked): a second consumer, unlimited, gets it.
    const other = new Inbox();
    await bus.consume(queue, other.handler, { prefetch: 0 });
    await other.waitFor(1);
    expect(other.bodies()).toEqual(['m2']);
    expect(slow.bodies()).toEqual(['m1']);

    bus.ack(slow.received[0]!);
    bus.ack(other.received[0]!);
    await bus.publish('', queue, Buffer.from('m3'));
    await bus.publish('', queue, Buffer.from('m4'));
    await Promise.all([slow.waitFor(2), other.waitFor(2)]);
    expect([...slow.bodies(), ...other.bodies()].sort()).toEqual(['m1', 'm2', 'm3', 'm4']);
  });

  it('forgets an acked message, and redelivers an unacked one when its consumer goes away', async () => {
    const first = await connect();
    const queue = await first.assertQueue(unique('ack'), transient);
    const inbox = new Inbox();
    await first.consume(queue, inbox.handler);
    await first.publish('', queue, Buffer.from('acked'));
    await first.publish('', queue, Buffer.from('unacked'));
    const [acked] = await inbox.waitFor(2);
    first.ack(acked!);
    first.ack(acked!); // a second ack of the same delivery is ignored
    await first.close();

    const second = await connect();
    const d = await second.get(queue);
    expect(d?.body.toString()).toBe('unacked');
    expect(d?.fields.redelivered).toBe(true);
    second.ack(d!);
    expect(await second.get(queue)).toBeUndefined();
  });

  it('requeues a nacked message as redelivered, and drops one nacked without requeue', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('nack'), transient);
    const inbox = new Inbox();
    await bus.consume(queue, inbox.handler);
    await bus.publish('', queue, Buffer.from('again'));
    const [first] = await inbox.waitFor(1);
    expect(first!.fields.redelivered).toBe(false);
    bus.nack(first!, true);
    const [, second] = await inbox.waitFor(2);
    expect(second!.body.toString()).toBe('again');
    expect(second!.fields.redelivered).toBe(true);
    bus.nack(second!, false);

    await bus.publish('', queue, Buffer.from('next'));
    const [, , third] = await inbox.waitFor(3);
    expect(third!.body.toString()).toBe('next');
    bus.ack(third!);
    expect(inbox.bodies()).toEqual(['again', 'again', 'next']);
  });

  it('shares a queue round-robin between its consumers', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('rr'), transient);
    const a = new Inbox();
    const b = new Inbox();
    await bus.consume(queue, a.handler, { noAck: true });
    await bus.consume(queue, b.handler, { noAck: true });
    for (const body of ['1', '2', '3', '4', '5', '6']) await bus.publish('', queue, Buffer.from(body));
    await Promise.all([a.waitFor(3), b.waitFor(3)]);
    expect(a.bodies().length).toBe(3);
    expect(b.bodies().length).toBe(3);
    expect([...a.bodies(), ...b.bodies()].sort()).toEqual(['1', '2', '3', '4', '5', '6']);
    // Strictly alternating: one gets the odd, the other the even messages.
    const [odd, even] = a.bodies()[0] === '1' ? [a, b] : [b, a];
    expect(odd.bodies()).toEqual(['1', '3', '5']);
    expect(even.bodies()).toEqual(['2', '4', '6']);
  });

  it('deletes an auto-delete queue when its last consumer is cancelled', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('auto'), { durable: false, autoDelete: true });
    const t1 = await bus.consume(queue, () => {}, { noAck: true });
    const t2 = await bus.consume(queue, () => {}, { noAck: true });
    await bus.cancel(t1);
    expect(await bus.get(queue)).toBeUndefined(); // still there (a missing queue is a 404)
    await bus.cancel(t2);
    expect((await brokerError(bus.get(queue))).code).toBe(404);
  });

  it('refuses a publish to a missing exchange with 404 NOT_FOUND and keeps working', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('alive'), transient);
    const inbox = new Inbox();
    await bus.consume(queue, inbox.handler);
    await bus.publish('', queue, Buffer.from('before'));
    const [before] = await inbox.waitFor(1);

    const missing = unique('no-such-exchange');
    const err = await brokerError(bus.publish(missing, 'key', Buffer.from('lost')));
    expect(err.code).toBe(404);
    expect(err.message).toMatch(new RegExp(`^NOT_FOUND - no exchange '${missing}' in vhost '`));

    // The consumer, its unacked delivery and the publisher all still work.
    bus.ack(before!);
    await bus.publish('', queue, Buffer.from('after'));
    const [, after] = await inbox.waitFor(2);
    expect(after!.body.toString()).toBe('after');
    expect(after!.fields.redelivered).toBe(false);
    bus.ack(after!);
    expect(await bus.get(queue)).toBeUndefined();
  });

  it('fails only the refused publish when other operations run at the same time', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('concurrent'), transient);
    const missing = unique('no-such-exchange');
    const results = await Promise.allSettled([
      bus.publish('', queue, Buffer.from('1')),
      bus.publish(missing, 'k', Buffer.from('lost')),
      bus.assertQueue(unique('declared-meanwhile'), transient),
      bus.publish('', queue, Buffer.from('2')),
      bus.publish(missing, 'k', Buffer.from('lost too')),
      bus.publish('', queue, Buffer.from('3')),
    ]);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'fulfilled', 'fulfilled', 'rejected', 'fulfilled']);
    for (const r of [results[1], results[4]]) {
      expect((r as PromiseRejectedResult).reason).toBeInstanceOf(BrokerError);
      expect(((r as PromiseRejectedResult).reason as BrokerError).code).toBe(404);
    }
    // At least once: a publish whose confirm was lost with the channel is sent again.
    expect(new Set(await drain(bus, queue))).toEqual(new Set(['1', '2', '3']));
  });

  it('refuses a redeclaration with other flags (406) and a missing queue (404), and keeps working', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('flags'), transient);
    const redeclared = await brokerError(bus.assertQueue(queue, { durable: true, autoDelete: false }));
    expect(redeclared.code).toBe(406);
    expect(redeclared.message).toContain("inequivalent arg 'durable'");

    const exchange = unique('ex');
    await bus.assertExchange(exchange, 'topic', transient);
    expect((await brokerError(bus.assertExchange(exchange, 'fanout', transient))).code).toBe(406);
    expect((await brokerError(bus.bindQueue(unique('missing'), exchange, '#'))).code).toBe(404);
    expect((await brokerError(bus.consume(unique('missing'), () => {}))).code).toBe(404);
    const quorum = await brokerError(
      bus.assertQueue(unique('quorum'), { durable: false, autoDelete: false, arguments: { 'x-queue-type': 'quorum' } }),
    );
    expect(quorum.code).toBe(406);

    await bus.publish('', queue, Buffer.from('fine'));
    expect(await drain(bus, queue)).toEqual(['fine']);
  });

  it('accepts a durable quorum queue (rabbit_quorum_queue) and nacks with requeue on it', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('quorum'), {
      durable: true,
      autoDelete: false,
      arguments: { 'x-queue-type': 'quorum' },
    });
    try {
      await bus.publish('', queue, Buffer.from('q'));
      const d = await bus.get(queue);
      expect(d?.body.toString()).toBe('q');
      bus.nack(d!, true);
      const again = await waitForGet(bus, queue);
      expect(again.fields.redelivered).toBe(true);
      bus.ack(again);
    } finally {
      await bus.deleteQueue(queue);
    }
  });

  it('gets single messages with basic.get, returning undefined when the queue is empty', async () => {
    const bus = await connect();
    const exchange = unique('ex');
    await bus.assertExchange(exchange, 'direct', transient);
    const queue = await bus.assertQueue(unique('get'), transient);
    await bus.bindQueue(queue, exchange, 'rk');
    expect(await bus.get(queue)).toBeUndefined();
    await bus.publish(exchange, 'rk', Buffer.from('one'));
    await bus.publish(exchange, 'rk', Buffer.from('two'));

    const one = await bus.get(queue);
    expect(one?.body.toString()).toBe('one');
    expect(one?.fields).toMatchObject({ exchange, routingKey: 'rk', redelivered: false });
    expect((await bus.get(queue, { noAck: true }))?.body.toString()).toBe('two');
    expect(await bus.get(queue)).toBeUndefined();
    bus.nack(one!, true);
    const back = await waitForGet(bus, queue);
    expect(back.body.toString()).toBe('one');
    expect(back.fields.redelivered).toBe(true);
    bus.ack(back);
    await bus.deleteQueue(queue);
    await bus.deleteQueue(queue); // deleting a missing queue is not an error
    expect((await brokerError(bus.get(queue))).code).toBe(404);
  });

  it('carries message properties and the body bytes unchanged', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('props'), transient);
    const inbox = new Inbox();
    await bus.consume(queue, inbox.handler, { noAck: true });
    const body = Buffer.from([0, 1, 2, 255, 0x7b, 0x7d]);
    const properties = {
      contentType: 'application/json',
      contentEncoding: 'utf-8',
      correlationId: 'corr-1',
      replyTo: 'reply_abc',
      messageId: 'msg-1',
      deliveryMode: 2 as const,
      expiration: '60000',
      headers: { 'x-text': 'héllo', 'x-number': 42, 'x-bool': true, 'x-nested': { inner: 'v' } },
    };
    await bus.publish('', queue, body, properties);
    await bus.publish('', queue, Buffer.from('plain'));
    const [withProps, plain] = await inbox.waitFor(2);
    expect(withProps!.body.equals(body)).toBe(true);
    expect(withProps!.properties).toEqual(properties);
    expect(plain!.properties).toEqual({});
  });

  it('drops a message whose expiration passed before it could be delivered', async () => {
    const bus = await connect();
    const queue = await bus.assertQueue(unique('ttl'), transient);
    await bus.publish('', queue, Buffer.from('short'), { expiration: '1' });
    await bus.publish('', queue, Buffer.from('long'), { expiration: '60000' });
    await sleep(QUIET_MS);
    expect(await drain(bus, queue)).toEqual(['long']);
  });

  it(`reconnects after losing the connection: 'reconnected', everything declared again, stale deliveries ignored`, async () => {
    const bus = await connect();
    const exchange = unique('ex');
    await bus.assertExchange(exchange, 'topic', transient);
    const named = await bus.assertQueue(unique('named'), transient);
    const serverNamed = await bus.assertQueue('', { durable: false, autoDelete: false, exclusive: true });
    await bus.bindQueue(named, exchange, 'compute.#');
    await bus.bindQueue(serverNamed, exchange, 'compute.#');
    const a = new Inbox();
    const b = new Inbox();
    // Keeps the first delivery unacked (to ack it after the reconnect); acks everything else.
    await bus.consume(
      named,
      (d) => {
        a.handler(d);
        if (a.received.length > 1) bus.ack(d);
      },
      { prefetch: 1 },
    );
    await bus.consume(serverNamed, b.handler, { noAck: true });
    await bus.publish(exchange, 'compute.host', Buffer.from('before'));
    const [stale] = await a.waitFor(1);
    await b.waitFor(1);

    const events: string[] = [];
    let duringOutage: Promise<void> | undefined;
    bus.on('disconnected', () => {
      events.push('disconnected');
      // Published while there is no connection: it waits for the reconnect, then goes out.
      duringOutage = bus.publish(exchange, 'compute.host', Buffer.from('during'));
    });
    const reconnected = once(bus, 'reconnected');
    await backend.loseConnection(bus);
    await reconnected;
    expect(events).toEqual(['disconnected']);
    await duringOutage;
    await waitForBody(a, 'during');
    await waitForBody(b, 'during');

    bus.ack(stale!); // a delivery from before the reconnect: a no-op, not an error
    await bus.publish(exchange, 'compute.host', Buffer.from('after'));
    // A restarted RabbitMQ has dropped the non-durable queue and its message; the in-memory
    // broker kept it and redelivers "before" first. Either way the new message arrives.
    const afterA = await waitForBody(a, 'after');
    expect(afterA.fields.redelivered).toBe(false);
    await waitForBody(b, 'after');
    // The server-named queue keeps working under the name the bus first returned.
    await bus.publish('', serverNamed, Buffer.from('by old name'));
    await waitForBody(b, 'by old name');
  });

  if (backend.name === 'rabbit') {
    it('reconnects when the broker closes the connection, and gets the unacked message redelivered', async () => {
      const bus = await connect();
      const queue = await bus.assertQueue(unique('forced'), transient);
      const inbox = new Inbox();
      await bus.consume(queue, inbox.handler, { prefetch: 1 });
      await bus.publish('', queue, Buffer.from('held'));
      const [stale] = await inbox.waitFor(1);

      const reconnected = once(bus, 'reconnected');
      await closeRabbitConnections(rabbitVhost);
      await reconnected;
      const [, again] = await inbox.waitFor(2, 'the redelivery');
      expect(again!.body.toString()).toBe('held');
      expect(again!.fields.redelivered).toBe(true);
      bus.ack(stale!); // stale: ignored, and the channel stays usable
      bus.ack(again!);
      await bus.publish('', queue, Buffer.from('next'));
      const [, , next] = await inbox.waitFor(3);
      expect(next!.body.toString()).toBe('next');
      bus.ack(next!);
      expect(await bus.get(queue)).toBeUndefined();
    });

    it('fails over to the next host of the URL when the first does not answer', async () => {
      // Port 1 on loopback refuses at once; the second host is the real broker.
      const failover = url.replace('@127.0.0.1:5672/', '@127.0.0.1:1,guest:guest@127.0.0.1:5672/');
      expect(failover).toContain(',');
      const bus = await openBus(failover, RABBIT, silentLogger());
      open.push(bus);
      expect((bus as RabbitBus).connectedHost).toBe('guest:***@127.0.0.1:5672');
      const queue = await bus.assertQueue(unique('failover'), transient);
      await bus.publish('', queue, Buffer.from('via host 2'));
      expect(await drain(bus, queue)).toEqual(['via host 2']);
    });
  }
});

async function waitForGet(bus: Bus, queue: string): Promise<Delivery> {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const d = await bus.get(queue);
    if (d) return d;
    if (Date.now() > deadline) throw new Error(`nothing arrived in ${queue}`);
    await sleep(10);
  }
}

async function waitForBody(inbox: Inbox, body: string): Promise<Delivery> {
  for (let count = 1; ; count++) {
    const got = await inbox.waitFor(count, `a delivery of "${body}"`);
    const found = got.find((d) => d.body.toString() === body);
    if (found) return found;
  }
}
