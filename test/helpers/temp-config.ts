import path from 'node:path';
import { defaultConfig, type Config } from '../../src/config/schema.js';

/**
 * The default config with the instances, the state and the image store in folders under `base` (no
 * space reserved), and QEMU on TCG: what every real-QEMU test runtime starts from.
 */
export function tempDirsConfig(base: string, opts: { shutdownTimeoutS: number }): Config {
  const config = defaultConfig();
  config.DEFAULT.instances_path = path.join(base, 'i');
  config.DEFAULT.state_path = path.join(base, 's');
  config.image_store.path = path.join(base, 'images');
  config.image_store.reserved_space_mb = 0;
  config.hypervisor.accel = 'tcg';
  config.hypervisor.shutdown_timeout = opts.shutdownTimeoutS;
  return config;
}
