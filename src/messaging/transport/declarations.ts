import type { Logger } from '../../log.js';
import { BrokerError, errorMessage } from '../../errors.js';
import type { ConsumeOptions, DeliveryHandler, ExchangeOptions, QueueOptions } from '../bus.js';

export type ExchangeType = 'topic' | 'fanout' | 'direct';

export interface RecordedConsumer {
  queue: string;
  handler: DeliveryHandler;
  opts: ConsumeOptions;
}

/** How a bus declares things on a fresh connection; a BrokerError is a refusal, anything else a lost connection. */
export interface RedeclareOps {
  assertExchange(name: string, type: ExchangeType, opts: ExchangeOptions): Promise<void>;
  /** `name` '' asks for a server-named queue; resolves with the name the broker gave. */
  assertQueue(name: string, opts: QueueOptions): Promise<string>;
  bindQueue(queue: string, exchange: string, routingKey: string): Promise<void>;
  consume(queue: string, consumerTag: string, consumer: RecordedConsumer): Promise<void>;
}

interface RecordedQueue {
  opts: QueueOptions;
  serverNamed: boolean;
  /** The broker's name for it now: a server-named queue gets a new name on every reconnect. */
  actual: string;
}

/**
 * What a bus has declared, bound and consumed, so that it can do it all again after a reconnect
 * (the broker forgets non-durable queues on restart and exclusive queues with their connection).
 * Queues are known by the name the bus first returned; for a server-named queue that name stays
 * valid for the bus's callers and maps to the queue's current name.
 */
export class Declarations {
  private readonly exchanges = new Map<string, { type: ExchangeType; opts: ExchangeOptions }>();
  private readonly queues = new Map<string, RecordedQueue>();
  private readonly bindings = new Map<string, { queue: string; exchange: string; routingKey: string }>();
  private readonly consumers = new Map<string, RecordedConsumer>();

  exchangeDeclared(name: string, type: ExchangeType, opts: ExchangeOptions): void {
    this.exchanges.set(name, { type, opts });
  }

  /** `requested` '' for a server-named queue; returns the name callers use from now on. */
  queueDeclared(requested: string, actual: string, opts: QueueOptions): string {
    const known = this.callerName(actual);
    if (known !== undefined) {
      this.queues.set(known, { ...this.queues.get(known)!, opts });
      return known;
    }
    this.queues.set(actual, { opts, serverNamed: requested === '', actual });
    return actual;
  }

  /** The broker's current name for a queue callers know as `name` (itself when not server-named). */
  actualQueue(name: string): string {
    return this.queues.get(name)?.actual ?? name;
  }

  /** The name callers know for the broker's queue `actual`. */
  callerName(actual: string): string | undefined {
    if (this.queues.has(actual) && this.queues.get(actual)!.actual === actual) return actual;
    for (const [name, q] of this.queues) if (q.actual === actual) return name;
    return undefined;
  }

  bound(queue: string, exchange: string, routingKey: string): void {
    this.bindings.set(JSON.stringify([queue, exchange, routingKey]), { queue, exchange, routingKey });
  }

  consumerAdded(tag: string, consumer: RecordedConsumer): void {
    this.consumers.set(tag, consumer);
  }

  consumer(tag: string): RecordedConsumer | undefined {
    return this.consumers.get(tag);
  }

  /** Forgets a consumer; an auto-delete queue left with no consumer is forgotten too (the broker deletes it). */
  consumerRemoved(tag: string): void {
    const consumer = this.consumers.get(tag);
    if (!consumer) return;
    this.consumers.delete(tag);
    const queue = this.queues.get(consumer.queue);
    const othersLeft = [...this.consumers.values()].some((c) => c.queue === consumer.queue);
    if (queue?.opts.autoDelete && !othersLeft) this.queueDeleted(consumer.queue);
  }

  /** Forgets a queue with its bindings and consumers; returns the tags of the consumers it had. */
  queueDeleted(name: string): string[] {
    this.queues.delete(name);
    for (const [key, b] of this.bindings) if (b.queue === name) this.bindings.delete(key);
    const tags = [...this.consumers].filter(([, c]) => c.queue === name).map(([tag]) => tag);
    for (const tag of tags) this.consumers.delete(tag);
    return tags;
  }

  /**
   * Declares everything again, in order: exchanges, queues, bindings, consumers. A refusal
   * (BrokerError) is logged and the rest goes on; any other error (the connection was lost again)
   * stops the restore and is thrown.
   */
  async redeclare(ops: RedeclareOps, log: Logger): Promise<void> {
    const attempt = async (what: string, fn: () => Promise<void>): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        if (!(err instanceof BrokerError)) throw err;
        log.error({ err: errorMessage(err) }, `could not restore ${what} after reconnecting`);
      }
    };
    for (const [name, { type, opts }] of this.exchanges) {
      await attempt(`exchange ${name}`, () => ops.assertExchange(name, type, opts));
    }
    for (const [name, queue] of this.queues) {
      await attempt(`queue ${name}`, async () => {
        queue.actual = await ops.assertQueue(queue.serverNamed ? '' : name, queue.opts);
      });
    }
    for (const { queue, exchange, routingKey } of this.bindings.values()) {
      await attempt(`binding ${queue} ← ${exchange} (${routingKey})`, () =>
        ops.bindQueue(this.actualQueue(queue), exchange, routingKey),
      );
    }
    for (const [tag, consumer] of this.consumers) {
      await attempt(`consumer ${tag} of ${consumer.queue}`, () =>
        ops.consume(this.actualQueue(consumer.queue), tag, consumer),
      );
    }
  }
}
