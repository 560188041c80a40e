import type { DeliveryHandler, Delivery, MessageProperties } from '../bus.js';
import type { Logger } from '../../log.js';
import { errorMessage } from '../../errors.js';

const PROPERTY_NAMES = [
  'contentType',
  'contentEncoding',
  'correlationId',
  'replyTo',
  'messageId',
  'deliveryMode',
  'expiration',
  'headers',
] as const satisfies ReadonlyArray<keyof MessageProperties>;

/**
 * The properties the Bus carries, from whatever a client library or caller gave: only the known
 * ones, without undefined values and without an empty `headers` table, so that both buses hand the
 * same object to a consumer.
 */
export function normalizeProperties(source: object | undefined): MessageProperties {
  const out: Record<string, unknown> = {};
  if (!source) return out;
  const from = source as Record<string, unknown>;
  for (const name of PROPERTY_NAMES) {
    const value = from[name];
    if (value === undefined || value === null) continue;
    if (name === 'headers' && typeof value === 'object' && Object.keys(value).length === 0) continue;
    out[name] = value;
  }
  return out as MessageProperties;
}

/** Runs a consumer's handler; a throw or rejection is logged (the handler owns ack/nack). */
export function runHandler(handler: DeliveryHandler, delivery: Delivery, log: Logger): void {
  const report = (err: unknown): void => {
    log.error(
      { err: errorMessage(err), queue_routing_key: delivery.fields.routingKey, consumer_tag: delivery.fields.consumerTag },
      'message handler failed',
    );
  };
  try {
    const result = handler(delivery);
    if (result instanceof Promise) result.catch(report);
  } catch (err) {
    report(err);
  }
}
