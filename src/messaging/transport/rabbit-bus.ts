import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import type { ConnectionOptions } from 'node:tls';
import { connect, credentials, type Channel, type ChannelModel, type ConfirmChannel, type ConsumeMessage, type Message } from 'amqplib';
import { BrokerError, ConfigError, errorMessage } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { RabbitOptions } from '../../config/schema.js';
import type {
  Bus,
  ConsumeOptions,
  Delivery,
  DeliveryHandler,
  ExchangeOptions,
  MessageProperties,
  QueueOptions,
} from '../bus.js';
import type { BrokerHost, TransportUrl } from '../../config/transport-url.js';
import { Declarations, type ExchangeType, type RecordedConsumer, type RedeclareOps } from './declarations.js';
import { normalizeProperties, runHandler } from './properties.js';

/**
 * The Bus over RabbitMQ (amqplib). One connection with two channels: one for consumers (with
 * per-consumer prefetch) and one confirm channel for declarations, publishes and basic.get, so that
 * a refusal there (RabbitMQ closes the channel on 404 NOT_FOUND, 406 PRECONDITION_FAILED …) never
 * disturbs the consumers; that channel is simply opened again for the next operation.
 *
 * When the connection is lost it reconnects as oslo.messaging does (kombu's ensure_connection):
 * each round tries every host of the URL in turn, starting after the one that was lost; between
 * rounds it waits rabbit_retry_interval + round × rabbit_retry_backoff seconds, at most
 * rabbit_interval_max. After reconnecting it declares again every exchange, queue and binding, and
 * starts every consumer again with its old consumer tag, then emits 'reconnected'. Operations
 * called meanwhile wait for that; a publish whose confirm was lost with the connection is sent
 * again (at-least-once; oslo consumers drop duplicates by _unique_id).
 *
 * amqplib's own opt-in recovery is not used: it reconnects to a single URL (no failover across
 * hosts), and it does not reopen a channel the broker closed on a live connection.
 */

/** Broker replies that refuse the operation itself; anything else means the channel or connection went away. */
const REFUSAL_CODES = new Set([403, 404, 405, 406, 502, 503, 530, 540]);
const CONNECT_TIMEOUT_MS = 10_000;

interface ChannelState<C extends Channel = Channel> {
  channel: C;
  closed: boolean;
  /** What the broker said when it closed the channel, if it did. */
  error?: Error;
}

interface Session {
  connection: ChannelModel;
  host: BrokerHost;
  consume: ChannelState;
  ops?: Promise<ChannelState<ConfirmChannel>>;
  lost: boolean;
}

/** A promise that operations wait on until the bus is connected (and its declarations restored). */
class Gate {
  readonly promise: Promise<void>;
  opened = false;
  private open!: () => void;
  private fail!: (err: Error) => void;
  constructor() {
    this.promise = new Promise<void>((resolve, reject) => {
      this.open = resolve;
      this.fail = reject;
    });
    this.promise.catch(() => {});
  }
  resolve(): void {
    this.opened = true;
    this.open();
  }
  reject(err: Error): void {
    this.fail(err);
  }
}

export class RabbitBus extends EventEmitter implements Bus {
  private session?: Session;
  private ready = new Gate();
  private closed = false;
  private readonly declarations = new Declarations();
  private readonly settlers = new WeakMap<Delivery, { state: ChannelState; tag: number }>();
  private readonly tls: ConnectionOptions | undefined;
  /** Index in url.hosts of the host to try first. */
  private nextHost = 0;
  private wakeUp?: () => void;
  /** A connectLoop is running (first connection or reconnect). */
  private connecting = false;
  private consumeQueue: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly url: TransportUrl,
    private readonly log: Logger,
  ) {
    super();
    this.tls = url.options.ssl ? tlsOptions(url.options, log) : undefined;
  }

  /** Connects (retrying, with failover, until a host answers) and resolves with the open bus. */
  static async open(url: TransportUrl, log: Logger): Promise<RabbitBus> {
    if (url.scheme !== 'rabbit') throw new ConfigError(`RabbitBus needs a rabbit:// URL, got ${url}`);
    const bus = new RabbitBus(url, log);
    await bus.connectLoop(false);
    return bus;
  }

  async assertExchange(name: string, type: ExchangeType, opts: ExchangeOptions): Promise<void> {
    await this.withOps((ch) => ch.assertExchange(name, type, { durable: opts.durable, autoDelete: opts.autoDelete }));
    this.declarations.exchangeDeclared(name, type, opts);
  }

  async assertQueue(name: string, opts: QueueOptions): Promise<string> {
    const ok = await this.withOps((ch) => ch.assertQueue(name, queueArgs(opts)));
    return this.declarations.queueDeclared(name, ok.queue, opts);
  }

  async bindQueue(queue: string, exchange: string, routingKey: string): Promise<void> {
    await this.withOps((ch) => ch.bindQueue(this.declarations.actualQueue(queue), exchange, routingKey));
    this.declarations.bound(queue, exchange, routingKey);
  }

  async publish(exchange: string, routingKey: string, body: Buffer, props?: MessageProperties): Promise<void> {
    const properties = normalizeProperties(props);
    for (;;) {
      await this.whenReady();
      const session = this.session!;
      const key = exchange === '' ? this.declarations.actualQueue(routingKey) : routingKey;
      let state: ChannelState<ConfirmChannel> | undefined;
      try {
        state = await this.opsChannel(session);
        const ch = state.channel;
        await new Promise<void>((resolve, reject) => {
          ch.publish(exchange, key, body, properties, (err: unknown) => (err ? reject(err) : resolve()));
        });
        return;
      } catch (err) {
        if (this.closed) throw closedError();
        if (errorMessage(err) === 'message nacked') {
          throw new BrokerError(`the broker did not accept the message for exchange '${exchange}' (basic.nack)`);
        }
        // The confirm callback only says "channel closed": what the broker said is on the channel.
        const refusal = refusalOf(state?.error ?? err);
        if (refusal && refusal.code === 404 && refusal.message.includes(`exchange '${exchange}'`)) throw refusal;
        if (refusal && !state) throw refusal;
        this.log.debug({ err: errorMessage(err) }, 'publish interrupted; sending again');
        await this.pauseIfSessionAlive(session);
      }
    }
  }

  async consume(queue: string, handler: DeliveryHandler, opts: ConsumeOptions = {}): Promise<string> {
    const consumer: RecordedConsumer = { queue, handler, opts };
    for (;;) {
      await this.whenReady();
      const session = this.session!;
      try {
        const tag = await this.startConsumer(session, this.declarations.actualQueue(queue), undefined, consumer);
        this.declarations.consumerAdded(tag, consumer);
        return tag;
      } catch (err) {
        this.rethrowUnlessTransient(err);
        await this.pauseIfSessionAlive(session);
      }
    }
  }

  async cancel(consumerTag: string): Promise<void> {
    this.declarations.consumerRemoved(consumerTag);
    const session = this.session;
    if (this.closed || !session || session.lost) return;
    try {
      await session.consume.channel.cancel(consumerTag);
    } catch (err) {
      // Gone with the connection: nothing is left to cancel.
      this.rethrowUnlessTransient(err);
    }
  }

  ack(delivery: Delivery): void {
    this.settle(delivery, (ch, message) => ch.ack(message));
  }

  nack(delivery: Delivery, requeue: boolean): void {
    this.settle(delivery, (ch, message) => ch.nack(message, false, requeue));
  }

  async get(queue: string, opts: { noAck?: boolean } = {}): Promise<Delivery | undefined> {
    const noAck = opts.noAck ?? false;
    const { message, state } = await this.withOps(async (ch, state) => ({
      message: await ch.get(this.declarations.actualQueue(queue), { noAck }),
      state,
    }));
    if (message === false) return undefined;
    return this.toDelivery(state, message, '', noAck);
  }

  async deleteQueue(queue: string): Promise<void> {
    await this.withOps((ch) => ch.deleteQueue(this.declarations.actualQueue(queue)));
    this.declarations.queueDeleted(queue);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.ready.reject(closedError());
    this.wakeUp?.();
    const session = this.session;
    this.session = undefined;
    if (session && !session.lost) {
      session.lost = true;
      // Channels first: a channel's close-ok comes after the broker has handled the acks sent on
      // it, whereas amqplib may write the connection's close before acks still buffered.
      const ops = await session.ops?.catch(() => undefined);
      await Promise.all([closeChannel(session.consume), ops && closeChannel(ops)]);
      await session.connection.close().catch(() => {});
    }
  }

  override on(event: 'reconnected' | 'disconnected', listener: (info?: unknown) => void): this {
    return super.on(event, listener);
  }

  /** The host the bus is connected to now (redacted form), for logs and tests. */
  get connectedHost(): string | undefined {
    return this.session && !this.session.lost ? this.session.host.toString() : undefined;
  }

  // --- connection ----------------------------------------------------------------------------------

  private async connectLoop(reconnecting: boolean): Promise<void> {
    this.connecting = true;
    try {
      await this.tryHostsUntilConnected(reconnecting);
    } finally {
      this.connecting = false;
    }
  }

  private async tryHostsUntilConnected(reconnecting: boolean): Promise<void> {
    const hosts = this.url.hosts;
    const { rabbit_retry_interval: start, rabbit_retry_backoff: step, rabbit_interval_max: max } = this.url.options;
    for (let round = 0; !this.closed; round++) {
      for (let i = 0; i < hosts.length && !this.closed; i++) {
        const index = (this.nextHost + i) % hosts.length;
        const host = hosts[index]!;
        try {
          const session = await this.openSession(host);
          this.nextHost = index;
          if (reconnecting) await this.declarations.redeclare(this.redeclareOps(session), this.log);
          if (session.lost) throw new Error('connection lost while restoring declarations');
          this.log.info({ broker: host.toString(), vhost: this.url.virtualHost }, reconnecting ? 'reconnected to the message broker' : 'connected to the message broker');
          this.ready.resolve();
          if (reconnecting) this.emit('reconnected', { broker: host.toString() });
          return;
        } catch (err) {
          if (this.closed) break;
          this.log.warn({ broker: host.toString(), err: errorMessage(err) }, 'cannot connect to the message broker');
          this.dropSession();
        }
      }
      const delayS = Math.min(start + round * step, max);
      this.log.info({ retry_in_s: delayS }, 'no message broker reachable; retrying');
      await this.sleep(delayS * 1000);
    }
    throw closedError();
  }

  private async openSession(host: BrokerHost): Promise<Session> {
    const connection = await connect(
      {
        protocol: this.tls ? 'amqps' : 'amqp',
        hostname: host.hostname,
        port: host.port,
        // amqplib percent-decodes the vhost once more: hand it over encoded.
        vhost: encodeURIComponent(this.url.virtualHost),
        heartbeat: this.url.options.heartbeat_timeout_threshold,
      },
      {
        credentials: credentials.plain(host.username, host.password),
        timeout: CONNECT_TIMEOUT_MS,
        // Without it every small reply waits ~40 ms for a delayed ACK (Nagle): 20 vs 500 calls/s.
        noDelay: true,
        clientProperties: { connection_name: `snapshot-driver:${process.pid}` },
        ...this.tls,
      },
    );
    // Listeners first: an 'error' event with no listener would be thrown.
    let session: Session | undefined;
    connection.on('error', (err: Error) => this.log.warn({ err: err.message }, 'message broker connection error'));
    connection.on('blocked', (reason: string) => this.log.warn({ reason }, 'the message broker blocked publishing'));
    connection.on('unblocked', () => this.log.info('the message broker unblocked publishing'));
    connection.on('close', (err?: Error) => {
      if (session) this.onConnectionLost(session, err);
    });
    const consume = channelState(
      await connection.createChannel().catch(async (err: unknown) => {
        await connection.close().catch(() => {});
        throw err;
      }),
    );
    session = { connection, host, consume, lost: false };
    this.session = session;
    consume.channel.on('close', () => {
      // The consumers' channel closed under a live connection: restart everything, consumers included.
      if (session && !session.lost && !this.closed) {
        this.log.warn({ err: consume.error?.message }, 'the consumer channel was closed by the broker; reconnecting');
        void session.connection.close().catch(() => {});
      }
    });
    return session;
  }

  private onConnectionLost(session: Session, err: Error | undefined): void {
    if (session.lost) return;
    session.lost = true;
    if (this.closed || this.session !== session) return;
    this.session = undefined;
    // Lost while (re)connecting, before the bus was ready: that loop goes on to the next host.
    if (this.connecting) return;
    if (this.ready.opened) this.ready = new Gate();
    this.nextHost = (this.nextHost + 1) % this.url.hosts.length;
    this.log.warn({ broker: session.host.toString(), err: err?.message }, 'lost the connection to the message broker');
    this.emit('disconnected', { broker: session.host.toString(), error: err?.message });
    this.connectLoop(true).catch((e: unknown) => {
      if (!this.closed) this.log.error({ err: errorMessage(e) }, 'reconnecting failed');
    });
  }

  private dropSession(): void {
    const session = this.session;
    this.session = undefined;
    if (session && !session.lost) {
      session.lost = true;
      void session.connection.close().catch(() => {});
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.wakeUp = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  private whenReady(): Promise<void> {
    if (this.closed) return Promise.reject(closedError());
    return this.ready.promise;
  }

  /** After a transient failure: on a live connection go on at once (a new channel), else wait for the reconnect. */
  private async pauseIfSessionAlive(session: Session): Promise<void> {
    if (this.closed) throw closedError();
    if (!session.lost) await new Promise((resolve) => setTimeout(resolve, 10));
  }

  // --- channels and operations ---------------------------------------------------------------------

  private opsChannel(session: Session): Promise<ChannelState<ConfirmChannel>> {
    if (session.ops) return session.ops;
    const opened = session.connection.createConfirmChannel().then((channel) => {
      const state = channelState(channel);
      channel.on('close', () => {
        if (session.ops === opened) session.ops = undefined;
      });
      return state;
    });
    session.ops = opened;
    opened.catch(() => {
      if (session.ops === opened) session.ops = undefined;
    });
    return opened;
  }

  /** Runs a declaration-like operation once on the current session's ops channel; refusals become BrokerErrors. */
  private async onOps<T>(session: Session, fn: (ch: ConfirmChannel, state: ChannelState) => Promise<T>): Promise<T> {
    const state = await this.opsChannel(session);
    try {
      return await fn(state.channel, state);
    } catch (err) {
      throw refusalOfOperation(err) ?? err;
    }
  }

  /** An operation that waits for the connection and is tried again when the connection or channel is lost. */
  private async withOps<T>(fn: (ch: ConfirmChannel, state: ChannelState) => Promise<T>): Promise<T> {
    for (;;) {
      await this.whenReady();
      const session = this.session!;
      try {
        return await this.onOps(session, fn);
      } catch (err) {
        this.rethrowUnlessTransient(err);
        await this.pauseIfSessionAlive(session);
      }
    }
  }

  private rethrowUnlessTransient(err: unknown): void {
    if (this.closed) throw closedError();
    const refusal = refusalOfOperation(err);
    if (refusal) throw refusal;
    this.log.debug({ err: errorMessage(err) }, 'broker operation interrupted; trying again');
  }

  private redeclareOps(session: Session): RedeclareOps {
    return {
      assertExchange: async (name, type, opts) => {
        await this.onOps(session, (ch) => ch.assertExchange(name, type, { durable: opts.durable, autoDelete: opts.autoDelete }));
      },
      assertQueue: async (name, opts) => (await this.onOps(session, (ch) => ch.assertQueue(name, queueArgs(opts)))).queue,
      bindQueue: async (queue, exchange, key) => {
        await this.onOps(session, (ch) => ch.bindQueue(queue, exchange, key));
      },
      consume: async (queue, tag, consumer) => {
        await this.startConsumer(session, queue, tag, consumer);
      },
    };
  }

  /**
   * basic.qos then basic.consume, one consumer at a time on the channel: RabbitMQ applies a
   * non-global qos to the consumers started after it, which gives each consumer its own prefetch.
   * The queue is checked on the ops channel first, so that a missing or locked queue is refused
   * there rather than closing the consumers' channel.
   */
  private startConsumer(session: Session, queue: string, tag: string | undefined, consumer: RecordedConsumer): Promise<string> {
    const run = async (): Promise<string> => {
      await this.onOps(session, (ch) => ch.checkQueue(queue));
      const state = session.consume;
      const noAck = consumer.opts.noAck ?? false;
      await state.channel.prefetch(consumer.opts.prefetch ?? 0, false);
      let assigned = tag ?? '';
      const ok = await state.channel.consume(
        queue,
        (message: ConsumeMessage | null) => {
          if (message === null) {
            this.log.warn({ consumer_tag: assigned, queue: consumer.queue }, 'the broker cancelled a consumer (its queue was deleted)');
            this.declarations.consumerRemoved(assigned);
            return;
          }
          runHandler(consumer.handler, this.toDelivery(state, message, assigned, noAck), this.log);
        },
        { noAck, exclusive: consumer.opts.exclusive ?? false, ...(tag !== undefined && { consumerTag: tag }) },
      );
      assigned = ok.consumerTag;
      return assigned;
    };
    const result = this.consumeQueue.then(run, run);
    this.consumeQueue = result.catch(() => {});
    return result;
  }

  private toDelivery(state: ChannelState, message: Message, consumerTag: string, noAck: boolean): Delivery {
    const fields = message.fields as Message['fields'] & { consumerTag?: string };
    const delivery: Delivery = {
      body: message.content,
      properties: normalizeProperties(message.properties),
      fields: {
        exchange: fields.exchange,
        routingKey: fields.routingKey,
        redelivered: fields.redelivered,
        deliveryTag: fields.deliveryTag,
        consumerTag: fields.consumerTag ?? consumerTag,
      },
    };
    if (!noAck) this.settlers.set(delivery, { state, tag: fields.deliveryTag });
    return delivery;
  }

  /** ack/nack on the channel that got the delivery; a no-op once that channel is gone (the broker requeued it). */
  private settle(delivery: Delivery, fn: (ch: Channel, message: Message) => void): void {
    const settler = this.settlers.get(delivery);
    this.settlers.delete(delivery);
    if (!settler || settler.state.closed) {
      this.log.debug({ delivery_tag: delivery.fields.deliveryTag }, 'ack/nack of a stale or already settled delivery ignored');
      return;
    }
    try {
      fn(settler.state.channel, { fields: { deliveryTag: settler.tag } } as Message);
    } catch (err) {
      this.log.debug({ err: errorMessage(err) }, 'ack/nack on a closing channel ignored');
    }
  }
}

async function closeChannel(state: ChannelState): Promise<void> {
  if (state.closed) return;
  await state.channel.close().catch(() => {});
}

function channelState<C extends Channel>(channel: C): ChannelState<C> {
  const state: ChannelState<C> = { channel, closed: false };
  channel.on('error', (err: Error) => {
    state.error = err;
  });
  channel.on('close', () => {
    state.closed = true;
  });
  return state;
}

function queueArgs(opts: QueueOptions): { durable: boolean; autoDelete: boolean; exclusive: boolean; arguments?: Record<string, unknown> } {
  return {
    durable: opts.durable,
    autoDelete: opts.autoDelete,
    exclusive: opts.exclusive ?? false,
    ...(opts.arguments && { arguments: opts.arguments }),
  };
}

/** The BrokerError for an amqplib error that carries a refusing reply code, else undefined. */
export function refusalOf(err: unknown): BrokerError | undefined {
  if (err instanceof BrokerError) return err;
  if (!(err instanceof Error)) return undefined;
  const code = (err as Error & { code?: unknown }).code;
  if (typeof code !== 'number' || !REFUSAL_CODES.has(code)) return undefined;
  const text = /with message "(.*)"$/s.exec(err.message)?.[1] ?? err.message;
  return new BrokerError(text, code, { cause: err });
}

/**
 * The BrokerError when the broker refused this very operation. amqplib says "Operation failed: …"
 * when the channel.close names the method that was waiting for its reply; "Channel closed by
 * server: …" means another operation on the channel was refused, and this one can be tried again.
 */
function refusalOfOperation(err: unknown): BrokerError | undefined {
  if (err instanceof BrokerError) return err;
  if (!(err instanceof Error) || !err.message.startsWith('Operation failed:')) return undefined;
  return refusalOf(err);
}

function closedError(): BrokerError {
  return new BrokerError('the message bus is closed');
}

/**
 * TLS as oslo.messaging's rabbit driver sets it up: with ssl_ca_file the broker's certificate
 * chain is verified against it (the host name is not, as in oslo by default); without it the
 * certificate is not verified at all. ssl_cert_file / ssl_key_file give a client certificate.
 */
export function tlsOptions(options: RabbitOptions, log?: Logger): ConnectionOptions {
  const read = (option: 'ssl_ca_file' | 'ssl_cert_file' | 'ssl_key_file'): Buffer | undefined => {
    const file = options[option];
    if (file === '') return undefined;
    try {
      return readFileSync(file);
    } catch (err) {
      throw new ConfigError(`[oslo_messaging_rabbit] ${option} = ${file}: cannot read it (${errorMessage(err)})`);
    }
  };
  const ca = read('ssl_ca_file');
  const cert = read('ssl_cert_file');
  const key = read('ssl_key_file');
  if (!ca) log?.warn('ssl without ssl_ca_file: the broker certificate is not verified (as in oslo.messaging)');
  return {
    ...(ca && { ca: [ca] }),
    ...(cert && { cert }),
    ...(key && { key }),
    rejectUnauthorized: ca !== undefined,
    checkServerIdentity: () => undefined,
  };
}
