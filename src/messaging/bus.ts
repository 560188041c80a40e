/**
 * The AMQP 0-9-1 operations the agent needs, over one connection and channel that reconnect by
 * themselves. Two implementations: `rabbit://` (amqplib) and `memory://` (the in-process broker).
 * The same contract tests run on both, so the in-memory broker cannot drift from RabbitMQ.
 */

export interface MessageProperties {
  contentType?: string;
  contentEncoding?: string;
  correlationId?: string;
  replyTo?: string;
  messageId?: string;
  /** 2 = persistent. */
  deliveryMode?: 1 | 2;
  /** Per-message TTL in ms (as a string on the wire, like amqplib's `expiration`). */
  expiration?: string;
  headers?: Record<string, unknown>;
}

export interface Delivery {
  body: Buffer;
  properties: MessageProperties;
  fields: {
    exchange: string;
    routingKey: string;
    redelivered: boolean;
    deliveryTag: number;
    consumerTag: string;
  };
}

export interface ExchangeOptions {
  durable: boolean;
  autoDelete: boolean;
}

export interface QueueOptions {
  durable: boolean;
  autoDelete: boolean;
  exclusive?: boolean;
  /** e.g. {"x-queue-type": "quorum"}, {"x-expires": 1800000}. */
  arguments?: Record<string, unknown>;
}

export interface ConsumeOptions {
  /** Unacknowledged deliveries at most (basic.qos on the consumer); 0 = unlimited. */
  prefetch?: number;
  noAck?: boolean;
  exclusive?: boolean;
}

export type DeliveryHandler = (delivery: Delivery) => void | Promise<void>;

export interface Bus {
  assertExchange(name: string, type: 'topic' | 'fanout' | 'direct', opts: ExchangeOptions): Promise<void>;
  /** `name` '' → a server-named queue; resolves with the queue's name. */
  assertQueue(name: string, opts: QueueOptions): Promise<string>;
  bindQueue(queue: string, exchange: string, routingKey: string): Promise<void>;
  /** Exchange '' is the default exchange (routing key = queue name). Resolves once the broker has it. */
  publish(exchange: string, routingKey: string, body: Buffer, props?: MessageProperties): Promise<void>;
  consume(queue: string, handler: DeliveryHandler, opts?: ConsumeOptions): Promise<string>;
  cancel(consumerTag: string): Promise<void>;
  ack(delivery: Delivery): void;
  nack(delivery: Delivery, requeue: boolean): void;
  /** basic.get, for tests and tools: one message or undefined. */
  get(queue: string, opts?: { noAck?: boolean }): Promise<Delivery | undefined>;
  deleteQueue(queue: string): Promise<void>;
  close(): Promise<void>;
  /**
   * 'reconnected' after a lost connection came back with its exchanges, queues, bindings and
   * consumers restored; 'disconnected' when it was lost. Deliveries from before a reconnect can no
   * longer be acked (the broker redelivers them); ack/nack of such a delivery is a no-op.
   */
  on(event: 'reconnected' | 'disconnected', listener: (info?: unknown) => void): this;
}
