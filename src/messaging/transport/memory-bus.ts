import { EventEmitter } from 'node:events';
import { BrokerError } from '../../errors.js';
import type { Logger } from '../../log.js';
import type {
  Bus,
  ConsumeOptions,
  Delivery,
  DeliveryHandler,
  ExchangeOptions,
  MessageProperties,
  QueueOptions,
} from '../bus.js';
import { Declarations, type ExchangeType, type RecordedConsumer, type RedeclareOps } from './declarations.js';
import { MemoryBroker, type BrokerDelivery, type MemorySession } from './memory-broker.js';
import { normalizeProperties, runHandler } from './properties.js';

/**
 * The Bus over the in-process broker (`memory://`). Operations take effect at once; deliveries
 * arrive asynchronously, as from a real broker. `simulateConnectionLoss()` lets tests exercise the
 * reconnect path ('disconnected', redeclaration, 'reconnected', stale deliveries) without RabbitMQ.
 */
export class MemoryBus extends EventEmitter implements Bus {
  private session: MemorySession;
  private readonly declarations = new Declarations();
  /** Deliveries that can still be acked, with the session that got them. */
  private readonly settlers = new WeakMap<Delivery, { session: MemorySession; tag: number }>();
  private closed = false;
  /** Settles when a simulated reconnect is over. */
  private reconnecting: Promise<void> = Promise.resolve();

  constructor(
    readonly broker: MemoryBroker,
    private readonly log: Logger,
  ) {
    super();
    this.session = broker.openSession();
  }

  async assertExchange(name: string, type: ExchangeType, opts: ExchangeOptions): Promise<void> {
    (await this.live()).declareExchange(name, type, opts);
    this.declarations.exchangeDeclared(name, type, opts);
  }

  async assertQueue(name: string, opts: QueueOptions): Promise<string> {
    const actual = (await this.live()).declareQueue(name, opts);
    return this.declarations.queueDeclared(name, actual, opts);
  }

  async bindQueue(queue: string, exchange: string, routingKey: string): Promise<void> {
    (await this.live()).bindQueue(this.declarations.actualQueue(queue), exchange, routingKey);
    this.declarations.bound(queue, exchange, routingKey);
  }

  async publish(exchange: string, routingKey: string, body: Buffer, props?: MessageProperties): Promise<void> {
    const session = await this.live();
    const key = exchange === '' ? this.declarations.actualQueue(routingKey) : routingKey;
    session.publish(exchange, key, body, normalizeProperties(props));
  }

  async consume(queue: string, handler: DeliveryHandler, opts: ConsumeOptions = {}): Promise<string> {
    const consumer: RecordedConsumer = { queue, handler, opts };
    const tag = this.startConsumer(await this.live(), this.declarations.actualQueue(queue), undefined, consumer);
    this.declarations.consumerAdded(tag, consumer);
    return tag;
  }

  async cancel(consumerTag: string): Promise<void> {
    (await this.live()).cancel(consumerTag);
    this.declarations.consumerRemoved(consumerTag);
  }

  ack(delivery: Delivery): void {
    this.settle(delivery, (session, tag) => session.ack(tag));
  }

  nack(delivery: Delivery, requeue: boolean): void {
    this.settle(delivery, (session, tag) => session.nack(tag, requeue));
  }

  async get(queue: string, opts: { noAck?: boolean } = {}): Promise<Delivery | undefined> {
    const session = await this.live();
    const got = session.get(this.declarations.actualQueue(queue), opts.noAck ?? false);
    return got ? this.toDelivery(session, got, opts.noAck ?? false) : undefined;
  }

  async deleteQueue(queue: string): Promise<void> {
    (await this.live()).deleteQueue(this.declarations.actualQueue(queue));
    this.declarations.queueDeleted(queue);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.session.close();
  }

  /**
   * Test hook: drops the connection as a broker restart would (unacked messages requeued,
   * exclusive and auto-delete queues gone, consumers cancelled), then reconnects: 'disconnected',
   * everything declared again, 'reconnected'. Deliveries from before are stale afterwards.
   */
  async simulateConnectionLoss(): Promise<void> {
    const session = await this.live();
    let reconnected!: () => void;
    this.reconnecting = new Promise<void>((resolve) => (reconnected = resolve));
    session.close();
    this.emit('disconnected', { reason: 'simulated connection loss' });
    // Operations called meanwhile wait, as on RabbitMQ, until everything is declared again.
    await new Promise((resolve) => setImmediate(resolve));
    this.session = this.broker.openSession();
    try {
      await this.declarations.redeclare(this.redeclareOps(this.session), this.log);
    } finally {
      reconnected();
    }
    this.emit('reconnected');
  }

  override on(event: 'reconnected' | 'disconnected', listener: (info?: unknown) => void): this {
    return super.on(event, listener);
  }

  private redeclareOps(session: MemorySession): RedeclareOps {
    return {
      assertExchange: async (name, type, opts) => session.declareExchange(name, type, opts),
      assertQueue: async (name, opts) => session.declareQueue(name, opts),
      bindQueue: async (queue, exchange, key) => session.bindQueue(queue, exchange, key),
      consume: async (queue, tag, consumer) => {
        this.startConsumer(session, queue, tag, consumer);
      },
    };
  }

  private startConsumer(session: MemorySession, queue: string, tag: string | undefined, consumer: RecordedConsumer): string {
    const noAck = consumer.opts.noAck ?? false;
    let assigned = tag ?? '';
    assigned = session.consume(
      queue,
      {
        prefetch: consumer.opts.prefetch ?? 0,
        noAck,
        exclusive: consumer.opts.exclusive ?? false,
        ...(tag !== undefined && { consumerTag: tag }),
      },
      {
        deliver: (d) => runHandler(consumer.handler, this.toDelivery(session, d, noAck), this.log),
        cancelled: () => {
          this.log.warn({ consumer_tag: assigned, queue: consumer.queue }, 'the broker cancelled a consumer (its queue was deleted)');
          this.declarations.consumerRemoved(assigned);
        },
      },
    );
    return assigned;
  }

  private toDelivery(session: MemorySession, d: BrokerDelivery, noAck: boolean): Delivery {
    const { message } = d;
    const delivery: Delivery = {
      body: Buffer.from(message.body),
      properties: structuredClone(message.properties),
      fields: {
        exchange: message.exchange,
        routingKey: message.routingKey,
        redelivered: message.redelivered,
        deliveryTag: d.deliveryTag,
        consumerTag: d.consumerTag,
      },
    };
    if (!noAck) this.settlers.set(delivery, { session, tag: d.deliveryTag });
    return delivery;
  }

  private settle(delivery: Delivery, fn: (session: MemorySession, tag: number) => boolean): void {
    const settler = this.settlers.get(delivery);
    this.settlers.delete(delivery);
    if (!settler || !fn(settler.session, settler.tag)) {
      this.log.debug({ delivery_tag: delivery.fields.deliveryTag }, 'ack/nack of a stale or already settled delivery ignored');
    }
  }

  private async live(): Promise<MemorySession> {
    if (this.closed) throw new BrokerError('the message bus is closed');
    await this.reconnecting;
    if (this.closed) throw new BrokerError('the message bus is closed');
    return this.session;
  }
}

/** A bus on the in-process broker of `virtualHost`. */
export function openMemoryBus(virtualHost: string, log: Logger): MemoryBus {
  return new MemoryBus(MemoryBroker.forVirtualHost(virtualHost), log);
}
