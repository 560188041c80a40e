/**
 * The exchanges and queues oslo.messaging's rabbit driver declares (_drivers/impl_rabbit.py,
 * oslo.messaging 14), so that our server and a Python one are interchangeable on one broker.
 *
 * RPC server for topic T on server H (AMQPDriverBase.listen):
 * - declare_topic_consumer ×2: topic exchange `<control_exchange>`, queues `T` and `T.H` bound with
 *   the same key; exchange and queues durable = amqp_durable_queues || rabbit_quorum_queue,
 *   auto_delete = amqp_auto_delete; queue arguments: x-queue-type quorum / x-ha-policy, no TTL;
 * - declare_fanout_consumer: fanout exchange `T_fanout` (durable false, auto_delete true), queue
 *   `T_fanout_<uuid4 hex>` (durable false, auto_delete false, x-expires = rabbit_transient_queues_ttl s);
 * - basic.qos prefetch = rabbit_qos_prefetch_count (0: unlimited).
 * Notifications (notify_send → _publish_and_creates_default_queue): the same topic exchange as RPC,
 * plus a queue named after the routing key, flags as the exchange's, bound with that key.
 */
import { randomUUID } from 'node:crypto';
import type { RabbitOptions } from '../config/schema.js';
import type { Bus, QueueOptions } from './bus.js';

/** `[oslo_messaging_rabbit]` options that shape the topology (defaults are oslo's). */
export interface RabbitTopologyOptions {
  /** amqp_durable_queues (default false). */
  durableQueues: boolean;
  /** amqp_auto_delete (default false). */
  autoDelete: boolean;
  /** rabbit_quorum_queue (default false): x-queue-type quorum, and durable. */
  quorumQueues: boolean;
  /** rabbit_ha_queues (default false): x-ha-policy all. Exclusive with quorumQueues. */
  haQueues: boolean;
  /** rabbit_qos_prefetch_count (default 0 = unlimited). */
  prefetchCount: number;
  /** rabbit_transient_queues_ttl in seconds (default 1800): x-expires of fanout and reply queues. */
  transientQueuesTtlS: number;
}

export const DEFAULT_RABBIT_TOPOLOGY: Readonly<RabbitTopologyOptions> = Object.freeze({
  durableQueues: false,
  autoDelete: false,
  quorumQueues: false,
  haQueues: false,
  prefetchCount: 0,
  transientQueuesTtlS: 1800,
});

export function resolveRabbitOptions(o: Partial<RabbitTopologyOptions> = {}): RabbitTopologyOptions {
  const r = { ...DEFAULT_RABBIT_TOPOLOGY, ...o };
  if (r.quorumQueues && r.haQueues) {
    // Same refusal as oslo's _get_queue_arguments.
    throw new Error('rabbit_quorum_queue and rabbit_ha_queues are both enabled: a queue is quorum or HA (mirrored), not both');
  }
  return r;
}

/** The topology options from the config's `[oslo_messaging_rabbit]` section. */
export function rabbitTopologyFromConfig(o: RabbitOptions): Partial<RabbitTopologyOptions> {
  return {
    durableQueues: o.amqp_durable_queues,
    autoDelete: o.amqp_auto_delete,
    quorumQueues: o.rabbit_quorum_queue,
    prefetchCount: o.rabbit_qos_prefetch_count,
  };
}

/** Quorum queues are always durable (impl_rabbit Connection.durable). */
export function topicDurable(o: RabbitTopologyOptions): boolean {
  return o.durableQueues || o.quorumQueues;
}

/** _get_queue_arguments(rabbit_ha_queues, ttl, rabbit_quorum_queue, …). */
export function queueArguments(o: RabbitTopologyOptions, ttlS: number, quorumAllowed: boolean): Record<string, unknown> {
  const args: Record<string, unknown> = {};
  if (o.haQueues) args['x-ha-policy'] = 'all';
  if (quorumAllowed && o.quorumQueues) args['x-queue-type'] = 'quorum';
  if (ttlS > 0) args['x-expires'] = ttlS * 1000;
  return args;
}

function topicQueueOptions(o: RabbitTopologyOptions): QueueOptions {
  const args = queueArguments(o, 0, true);
  return {
    durable: topicDurable(o),
    autoDelete: o.autoDelete,
    ...(Object.keys(args).length > 0 && { arguments: args }),
  };
}

/** The control exchange (`[DEFAULT] control_exchange`) as oslo declares it. */
export async function declareControlExchange(bus: Bus, exchange: string, o: RabbitTopologyOptions): Promise<void> {
  await bus.assertExchange(exchange, 'topic', { durable: topicDurable(o), autoDelete: o.autoDelete });
}

export interface RpcServerQueues {
  /** Topic queues with their binding key: `T` and `T.H`. */
  topic: ReadonlyArray<{ queue: string; routingKey: string }>;
  fanoutExchange: string;
  fanoutQueue: string;
}

export async function declareRpcServerTopology(
  bus: Bus,
  where: { controlExchange: string; topic: string; server: string },
  o: RabbitTopologyOptions,
): Promise<RpcServerQueues> {
  const { controlExchange, topic, server } = where;
  await declareControlExchange(bus, controlExchange, o);
  const topicQueues = [topic, `${topic}.${server}`].map((key) => ({ queue: key, routingKey: key }));
  for (const { queue, routingKey } of topicQueues) {
    await bus.assertQueue(queue, topicQueueOptions(o));
    await bus.bindQueue(queue, controlExchange, routingKey);
  }

  const fanoutExchange = `${topic}_fanout`;
  const fanoutQueue = `${topic}_fanout_${randomUUID().replaceAll('-', '')}`;
  await bus.assertExchange(fanoutExchange, 'fanout', { durable: false, autoDelete: true });
  const fanoutArgs = queueArguments(o, o.transientQueuesTtlS, false);
  await bus.assertQueue(fanoutQueue, {
    durable: false,
    autoDelete: false,
    ...(Object.keys(fanoutArgs).length > 0 && { arguments: fanoutArgs }),
  });
  await bus.bindQueue(fanoutQueue, fanoutExchange, topic);
  return { topic: topicQueues, fanoutExchange, fanoutQueue };
}

/** The queue a notification publisher makes for its routing key, so no notification is lost. */
export async function declareNotificationQueue(
  bus: Bus,
  exchange: string,
  routingKey: string,
  o: RabbitTopologyOptions,
): Promise<void> {
  await declareControlExchange(bus, exchange, o);
  await bus.assertQueue(routingKey, topicQueueOptions(o));
  await bus.bindQueue(routingKey, exchange, routingKey);
}
