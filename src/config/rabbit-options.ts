import { z } from 'zod';
import { bool, int, num, str } from './values.js';

/** [oslo_messaging_rabbit]: the names and meanings of oslo.messaging's rabbit driver options. */
export const rabbitOptionsSchema = z
  .object({
    amqp_durable_queues: bool.default(false),
    amqp_auto_delete: bool.default(false),
    rabbit_quorum_queue: bool.default(false),
    rabbit_qos_prefetch_count: int(0, 65535).default(0),
    ssl: bool.default(false),
    ssl_ca_file: str.default(''),
    ssl_cert_file: str.default(''),
    ssl_key_file: str.default(''),
    heartbeat_timeout_threshold: int(0, 65535).default(60),
    rabbit_retry_interval: num(0).default(1),
    rabbit_retry_backoff: num(0).default(2),
    rabbit_interval_max: num(0).default(30),
  })
  .strict();
export type RabbitOptions = z.infer<typeof rabbitOptionsSchema>;
