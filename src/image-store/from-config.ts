import type { Config } from '../config/schema.js';
import type { Logger } from '../log.js';
import { GlanceClient } from './glance/client.js';
import { GlanceImageStore } from './glance/store.js';
import { ImageStore } from './image-store.js';
import type { ImageStoreBackend } from './backend.js';

/** The image store `[image_store] backend` names: the one place the backend is chosen. */
export function imageStoreFromConfig(config: Config, log: Logger): ImageStoreBackend {
  const opts = {
    reservedSpaceMb: config.image_store.reserved_space_mb,
    osHashAlgo: config.image_store.os_hash_algo,
    agentCpus: config.DEFAULT.agent_cpus || undefined,
  };
  if (config.image_store.backend === 'local') return new ImageStore({ path: config.image_store.path, ...opts });
  const client = new GlanceClient({
    apiServers: config.glance.api_servers,
    timeoutMs: config.glance.timeout * 1000,
    retries: config.glance.retries,
    authStrategy: config.glance.auth_strategy,
    log: log.child({ component: 'glance' }),
  });
  return new GlanceImageStore({ client, stagingPath: config.image_store.path, ...opts, log });
}
