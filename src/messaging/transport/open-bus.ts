import type { Logger } from '../../log.js';
import type { RabbitOptions } from '../../config/schema.js';
import type { Bus } from '../bus.js';
import { parseTransportUrl, TransportUrl } from '../../config/transport-url.js';
import { openMemoryBus } from './memory-bus.js';
import { RabbitBus } from './rabbit-bus.js';

/**
 * Opens the Bus a transport URL names: `memory://[/vhost]` (the in-process broker) or
 * `rabbit://…` (RabbitMQ; resolves once connected to one of its hosts, retrying until then).
 * `rabbitOptions` is the config's [oslo_messaging_rabbit]; the URL's query options override it.
 * Throws ConfigError for a bad URL (never showing the password).
 */
export async function openBus(url: string | TransportUrl, rabbitOptions: RabbitOptions, log: Logger): Promise<Bus> {
  const parsed = url instanceof TransportUrl ? url : parseTransportUrl(url, rabbitOptions);
  for (const warning of parsed.warnings) log.warn(warning);
  const busLog = log.child({ transport: parsed.toString() });
  if (parsed.scheme === 'memory') return openMemoryBus(parsed.virtualHost, busLog);
  return RabbitBus.open(parsed, busLog);
}
