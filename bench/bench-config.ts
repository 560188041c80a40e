import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { defaultConfig, type Config, type QuiesceMode } from '../src/config/schema.js';

/** A default config whose instances, state and image store live in a new temp folder (`base`). */
export async function benchConfig(prefix: string, quiesce: QuiesceMode): Promise<{ base: string; config: Config }> {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  const config = defaultConfig();
  config.DEFAULT.instances_path = path.join(base, 'i');
  config.DEFAULT.state_path = path.join(base, 's');
  config.image_store.path = path.join(base, 'images');
  config.image_store.reserved_space_mb = 0;
  config.snapshot.quiesce = quiesce;
  // TCG, as the figures in the notes: a /dev/kvm on these machines may be a nested kvm-pvm that cannot
  // run the guest (it hangs at its first instructions), and kvm:tcg would pick it.
  config.hypervisor.accel = 'tcg';
  return { base, config };
}
