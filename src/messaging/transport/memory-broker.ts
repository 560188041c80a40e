import { randomBytes } from 'node:crypto';
import { BrokerError } from '../../errors.js';
import type { ExchangeOptions, MessageProperties, QueueOptions } from '../bus.js';
import type { ExchangeType } from './declarations.js';

/**
 * An in-process AMQP 0-9-1 broker with RabbitMQ's semantics for what the agent uses: exchanges
 * (direct, topic with `*` and `#`, fanout, the default exchange), durable / auto-delete / exclusive
 * queues, server-named queues (`amq.gen-…`), consumers with per-consumer prefetch served
 * round-robin, ack / nack / requeue (redelivered), basic.get, per-message and per-queue TTL, and
 * RabbitMQ's refusals (404 NOT_FOUND, 405 RESOURCE_LOCKED, 406 PRECONDITION_FAILED,
 * 403 ACCESS_REFUSED) with RabbitMQ's reply texts.
 *
 * One broker per virtual host, kept in a module-level registry, so that a server and a client in the
 * same process meet. A MemorySession stands for one connection with its channel.
 */

export interface StoredMessage {
  body: Buffer;
  properties: MessageProperties;
  exchange: string;
  routingKey: string;
  redelivered: boolean;
  /** Date.now() after which the message is dropped instead of delivered. */
  expiresAt?: number;
}

export interface BrokerDelivery {
  message: StoredMessage;
  deliveryTag: number;
  consumerTag: string;
}

export interface ConsumerCallbacks {
  deliver(delivery: BrokerDelivery): void;
  /** The broker cancelled the consumer (its queue was deleted). */
  cancelled(): void;
}

interface Queue {
  name: string;
  durable: boolean;
  autoDelete: boolean;
  owner?: MemorySession;
  arguments: Record<string, unknown>;
  messages: StoredMessage[];
  consumers: Consumer[];
  nextConsumer: number;
  dispatchScheduled: boolean;
}

interface Exchange {
  name: string;
  type: ExchangeType;
  durable: boolean;
  autoDelete: boolean;
  bindings: Array<{ queue: string; routingKey: string }>;
}

interface Consumer {
  tag: string;
  session: MemorySession;
  queue: Queue;
  prefetch: number;
  noAck: boolean;
  unacked: number;
  callbacks: ConsumerCallbacks;
}

interface Unacked {
  message: StoredMessage;
  queue: Queue;
  consumer?: Consumer;
}

const registry = new Map<string, MemoryBroker>();

export class MemoryBroker {
  private readonly exchanges = new Map<string, Exchange>();
  private readonly queues = new Map<string, Queue>();

  private constructor(readonly virtualHost: string) {
    this.exchanges.set('', { name: '', type: 'direct', durable: true, autoDelete: false, bindings: [] });
    for (const type of ['direct', 'fanout', 'topic'] as const) {
      const name = `amq.${type}`;
      this.exchanges.set(name, { name, type, durable: true, autoDelete: false, bindings: [] });
    }
  }

  /** The broker of a virtual host, made on first use. */
  static forVirtualHost(virtualHost: string): MemoryBroker {
    let broker = registry.get(virtualHost);
    if (!broker) {
      broker = new MemoryBroker(virtualHost);
      registry.set(virtualHost, broker);
    }
    return broker;
  }

  /** Forgets every virtual host (for tests that want a clean slate). */
  static reset(): void {
    registry.clear();
  }

  openSession(): MemorySession {
    return new MemorySession(this);
  }

  /** Names of the queues that exist now (for tests and tools). */
  queueNames(): string[] {
    return [...this.queues.keys()];
  }

  /** Messages ready in a queue (not counting unacknowledged ones), or undefined if there is no such queue. */
  messageCount(queue: string): number | undefined {
    return this.queues.get(queue)?.messages.length;
  }

  // --- operations, called by MemorySession -------------------------------------------------------

  /** @internal */
  declareExchange(name: string, type: ExchangeType, opts: ExchangeOptions): void {
    if (name === '' || name.startsWith('amq.')) {
      const existing = this.exchanges.get(name);
      if (existing && existing.type === type) return;
      throw this.refused(403, `ACCESS_REFUSED - exchange name '${name}' contains reserved prefix 'amq.*'`);
    }
    const existing = this.exchanges.get(name);
    if (existing) {
      this.requireEquivalent('exchange', name, 'type', type, existing.type);
      this.requireEquivalent('exchange', name, 'durable', opts.durable, existing.durable);
      this.requireEquivalent('exchange', name, 'auto_delete', opts.autoDelete, existing.autoDelete);
      return;
    }
    this.exchanges.set(name, { name, type, durable: opts.durable, autoDelete: opts.autoDelete, bindings: [] });
  }

  /** @internal */
  declareQueue(session: MemorySession, requested: string, opts: QueueOptions): string {
    if (requested.startsWith('amq.')) {
      throw this.refused(403, `ACCESS_REFUSED - queue name '${requested}' contains reserved prefix 'amq.*'`);
    }
    const name = requested === '' ? `amq.gen-${randomBytes(16).toString('base64url').slice(0, 22)}` : requested;
    const args = opts.arguments ?? {};
    const existing = this.queues.get(name);
    if (existing) {
      this.requireAccess(session, existing);
      this.requireEquivalent('queue', name, 'durable', opts.durable, existing.durable);
      this.requireEquivalent('queue', name, 'auto_delete', opts.autoDelete, existing.autoDelete);
      for (const key of new Set([...Object.keys(args), ...Object.keys(existing.arguments)])) {
        this.requireEquivalent('queue', name, key, args[key], existing.arguments[key]);
      }
      return name;
    }
    if (args['x-queue-type'] === 'quorum') {
      const invalid = !opts.durable ? 'non-durable' : opts.exclusive ? 'exclusive-owner' : opts.autoDelete ? 'auto-delete' : undefined;
      if (invalid) {
        throw this.refused(406, `PRECONDITION_FAILED - invalid property '${invalid}' for queue '${name}' in vhost '${this.virtualHost}'`);
      }
    }
    this.queues.set(name, {
      name,
      durable: opts.durable,
      autoDelete: opts.autoDelete,
      owner: opts.exclusive ? session : undefined,
      arguments: structuredClone(args),
      messages: [],
      consumers: [],
      nextConsumer: 0,
      dispatchScheduled: false,
    });
    return name;
  }

  /** @internal */
  bindQueue(session: MemorySession, queueName: string, exchangeName: string, routingKey: string): void {
    const queue = this.requireQueue(session, queueName);
    if (exchangeName === '') {
      throw this.refused(403, `ACCESS_REFUSED - operation not permitted on the default exchange`);
    }
    const exchange = this.requireExchange(exchangeName);
    if (!exchange.bindings.some((b) => b.queue === queue.name && b.routingKey === routingKey)) {
      exchange.bindings.push({ queue: queue.name, routingKey });
    }
  }

  /** @internal */
  publish(exchangeName: string, routingKey: string, body: Buffer, properties: MessageProperties): void {
    const exchange = this.requireExchange(exchangeName);
    const now = Date.now();
    for (const queue of this.route(exchange, routingKey)) {
      const ttl = minDefined(numberOrUndefined(properties.expiration), numberOrUndefined(queue.arguments['x-message-ttl']));
      queue.messages.push({
        body: Buffer.from(body),
        properties: structuredClone(properties),
        exchange: exchangeName,
        routingKey,
        redelivered: false,
        ...(ttl !== undefined && { expiresAt: now + ttl }),
      });
      this.scheduleDispatch(queue);
    }
  }

  /** @internal */
  consume(
    session: MemorySession,
    queueName: string,
    tag: string,
    opts: { prefetch: number; noAck: boolean; exclusive: boolean },
    callbacks: ConsumerCallbacks,
  ): void {
    const queue = this.requireQueue(session, queueName);
    if (queue.consumers.some((c) => c.tag === tag)) {
      throw this.refused(530, `NOT_ALLOWED - attempt to reuse consumer tag '${tag}'`);
    }
    if (opts.exclusive && queue.consumers.length > 0) {
      throw this.refused(403, `ACCESS_REFUSED - queue '${queue.name}' in vhost '${this.virtualHost}' in exclusive use`);
    }
    queue.consumers.push({ tag, session, queue, prefetch: opts.prefetch, noAck: opts.noAck, unacked: 0, callbacks });
    this.scheduleDispatch(queue);
  }

  /** @internal Removes a consumer; an auto-delete queue that loses its last consumer is deleted. */
  cancel(session: MemorySession, tag: string): void {
    for (const queue of this.queues.values()) {
      const index = queue.consumers.findIndex((c) => c.tag === tag && c.session === session);
      if (index < 0) continue;
      queue.consumers.splice(index, 1);
      if (queue.autoDelete && queue.consumers.length === 0) this.deleteQueue(queue.name);
      return;
    }
  }

  /** @internal */
  get(session: MemorySession, queueName: string): { message: StoredMessage; queue: Queue } | undefined {
    const queue = this.requireQueue(session, queueName);
    this.dropExpired(queue);
    const message = queue.messages.shift();
    return message ? { message, queue } : undefined;
  }

  /** @internal Deleting a missing queue is not an error (as in RabbitMQ). */
  deleteQueue(name: string, session?: MemorySession): void {
    const queue = this.queues.get(name);
    if (!queue) return;
    if (session) this.requireAccess(session, queue);
    this.queues.delete(name);
    for (const exchange of this.exchanges.values()) {
      const before = exchange.bindings.length;
      exchange.bindings = exchange.bindings.filter((b) => b.queue !== name);
      if (exchange.autoDelete && before > 0 && exchange.bindings.length === 0) this.exchanges.delete(exchange.name);
    }
    const consumers = queue.consumers.splice(0);
    for (const consumer of consumers) consumer.callbacks.cancelled();
  }

  /** @internal */
  consumerTagsOf(session: MemorySession): string[] {
    return [...this.queues.values()].flatMap((q) => q.consumers.filter((c) => c.session === session).map((c) => c.tag));
  }

  /** @internal */
  exclusiveQueuesOf(session: MemorySession): string[] {
    return [...this.queues.values()].filter((q) => q.owner === session).map((q) => q.name);
  }

  /** @internal Puts a message back at the head of its queue, marked redelivered. */
  requeue(unacked: Unacked): void {
    if (this.queues.get(unacked.queue.name) !== unacked.queue) return;
    unacked.queue.messages.unshift({ ...unacked.message, redelivered: true });
    this.scheduleDispatch(unacked.queue);
  }

  /** @internal A consumer got room for one more message. */
  released(queue: Queue): void {
    this.scheduleDispatch(queue);
  }

  // --- internals -----------------------------------------------------------------------------------

  private route(exchange: Exchange, routingKey: string): Queue[] {
    if (exchange.name === '') {
      const queue = this.queues.get(routingKey);
      return queue ? [queue] : [];
    }
    const names = new Set<string>();
    for (const binding of exchange.bindings) {
      if (
        exchange.type === 'fanout' ||
        (exchange.type === 'direct' && binding.routingKey === routingKey) ||
        (exchange.type === 'topic' && topicMatches(binding.routingKey, routingKey))
      ) {
        names.add(binding.queue);
      }
    }
    return [...names].map((n) => this.queues.get(n)).filter((q): q is Queue => q !== undefined);
  }

  private scheduleDispatch(queue: Queue): void {
    if (queue.dispatchScheduled) return;
    queue.dispatchScheduled = true;
    // Deliver asynchronously, as a network broker would: never inside the publisher's call.
    setImmediate(() => {
      queue.dispatchScheduled = false;
      if (this.queues.get(queue.name) === queue) this.dispatch(queue);
    });
  }

  private dispatch(queue: Queue): void {
    for (;;) {
      this.dropExpired(queue);
      if (queue.messages.length === 0 || queue.consumers.length === 0) return;
      const consumer = this.nextReadyConsumer(queue);
      if (!consumer) return;
      const message = queue.messages.shift()!;
      const deliveryTag = consumer.session.track(
        consumer.noAck ? undefined : { message, queue, consumer },
      );
      if (!consumer.noAck) consumer.unacked++;
      consumer.callbacks.deliver({ message, deliveryTag, consumerTag: consumer.tag });
    }
  }

  /** Round-robin over the consumers that have room under their prefetch. */
  private nextReadyConsumer(queue: Queue): Consumer | undefined {
    const count = queue.consumers.length;
    for (let i = 0; i < count; i++) {
      const index = (queue.nextConsumer + i) % count;
      const consumer = queue.consumers[index]!;
      if (consumer.noAck || consumer.prefetch === 0 || consumer.unacked < consumer.prefetch) {
        queue.nextConsumer = (index + 1) % count;
        return consumer;
      }
    }
    return undefined;
  }

  private dropExpired(queue: Queue): void {
    const now = Date.now();
    while (queue.messages.length > 0 && (queue.messages[0]!.expiresAt ?? Infinity) <= now) queue.messages.shift();
  }

  private requireExchange(name: string): Exchange {
    const exchange = this.exchanges.get(name);
    if (!exchange) throw this.refused(404, `NOT_FOUND - no exchange '${name}' in vhost '${this.virtualHost}'`);
    return exchange;
  }

  private requireQueue(session: MemorySession, name: string): Queue {
    const queue = this.queues.get(name);
    if (!queue) throw this.refused(404, `NOT_FOUND - no queue '${name}' in vhost '${this.virtualHost}'`);
    this.requireAccess(session, queue);
    return queue;
  }

  private requireAccess(session: MemorySession, queue: Queue): void {
    if (queue.owner && queue.owner !== session) {
      throw this.refused(
        405,
        `RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '${queue.name}' in vhost '${this.virtualHost}'. ` +
          'It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.',
      );
    }
  }

  private requireEquivalent(kind: string, name: string, arg: string, received: unknown, current: unknown): void {
    if (JSON.stringify(received) === JSON.stringify(current)) return;
    throw this.refused(
      406,
      `PRECONDITION_FAILED - inequivalent arg '${arg}' for ${kind} '${name}' in vhost '${this.virtualHost}': ` +
        `received '${String(received ?? 'none')}' but current is '${String(current ?? 'none')}'`,
    );
  }

  private refused(code: number, text: string): BrokerError {
    return new BrokerError(text, code);
  }
}

/** One connection (with its channel) to a MemoryBroker. */
export class MemorySession {
  private readonly unacked = new Map<number, Unacked>();
  private nextDeliveryTag = 1;
  private closed = false;

  constructor(readonly broker: MemoryBroker) {}

  get isOpen(): boolean {
    return !this.closed;
  }

  declareExchange(name: string, type: ExchangeType, opts: ExchangeOptions): void {
    this.requireOpen();
    this.broker.declareExchange(name, type, opts);
  }

  declareQueue(name: string, opts: QueueOptions): string {
    this.requireOpen();
    return this.broker.declareQueue(this, name, opts);
  }

  bindQueue(queue: string, exchange: string, routingKey: string): void {
    this.requireOpen();
    this.broker.bindQueue(this, queue, exchange, routingKey);
  }

  publish(exchange: string, routingKey: string, body: Buffer, properties: MessageProperties): void {
    this.requireOpen();
    this.broker.publish(exchange, routingKey, body, properties);
  }

  consume(
    queue: string,
    opts: { prefetch: number; noAck: boolean; exclusive: boolean; consumerTag?: string },
    callbacks: ConsumerCallbacks,
  ): string {
    this.requireOpen();
    const tag = opts.consumerTag ?? `amq.ctag-${randomBytes(16).toString('base64url').slice(0, 22)}`;
    this.broker.consume(this, queue, tag, opts, callbacks);
    return tag;
  }

  cancel(consumerTag: string): void {
    this.requireOpen();
    this.broker.cancel(this, consumerTag);
  }

  get(queue: string, noAck: boolean): BrokerDelivery | undefined {
    this.requireOpen();
    const got = this.broker.get(this, queue);
    if (!got) return undefined;
    const deliveryTag = this.track(noAck ? undefined : got);
    return { message: got.message, deliveryTag, consumerTag: '' };
  }

  deleteQueue(queue: string): void {
    this.requireOpen();
    this.broker.deleteQueue(queue, this);
  }

  /** Acknowledges a delivery; false when the tag is unknown (already settled, or not this session's). */
  ack(deliveryTag: number): boolean {
    return this.settle(deliveryTag, false);
  }

  nack(deliveryTag: number, requeue: boolean): boolean {
    return this.settle(deliveryTag, requeue);
  }

  /**
   * Closes the connection as RabbitMQ does when a client goes away: its consumers are cancelled
   * (deleting auto-delete queues left without one), its unacknowledged messages are requeued and
   * its exclusive queues deleted.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const tag of this.broker.consumerTagsOf(this)) this.broker.cancel(this, tag);
    // Highest tag first, each to the head of its queue: the oldest ends up first again.
    const pending = [...this.unacked.entries()].sort(([a], [b]) => b - a);
    this.unacked.clear();
    for (const [, entry] of pending) this.broker.requeue(entry);
    for (const name of this.broker.exclusiveQueuesOf(this)) this.broker.deleteQueue(name);
  }

  /** @internal Registers an unacknowledged delivery (or none for noAck) and returns its tag. */
  track(entry: Unacked | undefined): number {
    const tag = this.nextDeliveryTag++;
    if (entry) this.unacked.set(tag, entry);
    return tag;
  }

  private settle(deliveryTag: number, requeue: boolean): boolean {
    if (this.closed) return false;
    const entry = this.unacked.get(deliveryTag);
    if (!entry) return false;
    this.unacked.delete(deliveryTag);
    if (entry.consumer) {
      entry.consumer.unacked--;
      this.broker.released(entry.queue);
    }
    if (requeue) this.broker.requeue(entry);
    return true;
  }

  private requireOpen(): void {
    if (this.closed) throw new BrokerError('the connection to the in-memory broker is closed');
  }
}

/**
 * RabbitMQ's topic matching: words are separated by "."; "*" matches exactly one word, "#" zero
 * or more (so "a.#" matches "a", and "#" matches everything, even the empty key).
 */
export function topicMatches(pattern: string, routingKey: string): boolean {
  const p = pattern === '' ? [] : pattern.split('.');
  const k = routingKey === '' ? [] : routingKey.split('.');
  const memo = new Map<number, boolean>();
  const match = (i: number, j: number): boolean => {
    const key = i * (k.length + 1) + j;
    const cached = memo.get(key);
    if (cached !== undefined) return cached;
    let result: boolean;
    if (i === p.length) result = j === k.length;
    else if (p[i] === '#') result = match(i + 1, j) || (j < k.length && match(i, j + 1));
    else result = j < k.length && (p[i] === '*' || p[i] === k[j]) && match(i + 1, j + 1);
    memo.set(key, result);
    return result;
  };
  return match(0, 0);
}

function numberOrUndefined(value: unknown): number | undefined {
  const n = typeof value === 'string' && value.trim() !== '' ? Number(value) : value;
  return typeof n === 'number' && Number.isFinite(n) && n >= 0 ? n : undefined;
}

function minDefined(a: number | undefined, b: number | undefined): number | undefined {
  if (a === undefined) return b;
  if (b === undefined) return a;
  return Math.min(a, b);
}
