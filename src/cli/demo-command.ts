import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { loadConfig } from '../config/load.js';
import { STRATEGIES } from '../config/schema.js';
import { buildRuntime } from '../compute/runtime.js';
import { DISK_QOM_PATH } from '../hypervisor/qemu/launch.js';
import type { QemuHypervisor } from '../hypervisor/qemu/qemu-hypervisor.js';
import { createLogger } from '../log.js';
import { printTable } from './output.js';

const MiB = 2 ** 20;

/**
 * The whole path on a throw-away guest: create and start a real QEMU guest in a temporary folder,
 * write data through it, snapshot it once with every strategy, verify every image, print a table.
 */
export function registerDemoCommand(program: Command): void {
  program
    .command('demo')
    .description('snapshot a temporary demo guest with every strategy and verify the images')
    .option('--keep', 'keep the temporary folder (guest stopped, images kept)')
    .action(async (opts: { keep?: boolean }) => {
      const base = await fs.mkdtemp(path.join(os.tmpdir(), 'snapdrv-demo-'));
      const config = await loadConfig(program.opts<{ configFile: string[] }>().configFile);
      config.DEFAULT.instances_path = path.join(base, 'instances');
      config.DEFAULT.state_path = path.join(base, 'state');
      config.image_store.path = path.join(base, 'images');
      config.image_store.reserved_space_mb = 0;
      config.hypervisor.shutdown_timeout = 1;
      const log = createLogger({ level: config.DEFAULT.debug ? 'debug' : 'warn' });
      const rt = buildRuntime(config, log);
      const hv = rt.hv as QemuHypervisor;
      const uuid = randomUUID();
      try {
        process.stderr.write(`demo: creating guest ${uuid} (128 MiB RAM, 1 GiB qcow2) in ${base}\n`);
        await hv.createInstance({ uuid, name: 'demo', memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: 1024 * MiB });
        await rt.lifecycle.start(uuid);
        for (const [i, offsetMiB] of [0, 100, 500].entries()) {
          await hv.hmp(uuid, `qemu-io -d ${DISK_QOM_PATH} "write -P 0x${(0x41 + i).toString(16)} ${offsetMiB}M 8M"`);
        }
        const rows: unknown[][] = [];
        for (const strategy of STRATEGIES) {
          process.stderr.write(`demo: snapshot with ${strategy}\n`);
          const r = await rt.engine.take({ requestId: `req-${randomUUID()}`, instanceUuid: uuid, imageId: randomUUID(), strategy });
          const verified = await rt.store.verify(r.image_id);
          const state = (await hv.info(uuid)).state;
          rows.push([strategy, r.downtime_ms, r.duration_ms, r.image_id, r.size, `${r.os_hash_value.slice(0, 16)}…`, verified.ok ? 'ok' : 'MISMATCH', state, r.internal_snapshots]);
          if (!verified.ok) process.exitCode = 1;
        }
        printTable(['strategy', 'downtime_ms', 'duration_ms', 'image_id', 'size', 'sha512', 'verify', 'guest', 'snapshots_left'], rows);
      } finally {
        await hv.stop(uuid, { graceful: false }).catch(() => undefined);
        if (opts.keep) process.stderr.write(`demo: kept ${base}\n`);
        else await fs.rm(base, { recursive: true, force: true });
      }
    });
}
