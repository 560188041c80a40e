import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { startAgent } from '../compute/agent.js';
import { buildRuntime } from '../compute/runtime.js';
import { loadConfig } from '../config/load.js';
import { STRATEGIES, type Config } from '../config/schema.js';
import type { Bus } from '../messaging/bus.js';
import { unwrap } from '../messaging/envelope.js';
import { RpcClient } from '../messaging/rpc-client.js';
import { openBus } from '../messaging/transport/open-bus.js';
import { DISK_QOM_PATH } from '../hypervisor/qemu/launch.js';
import { SnapshotFailed } from '../errors.js';
import { createLogger, type Logger } from '../log.js';
import { printTable } from './output.js';

const MiB = 2 ** 20;
const END_TIMEOUT_MS = 300_000;

interface SnapshotEvent {
  eventType: string;
  data: Record<string, unknown>;
}

/** Collects versioned snapshot notifications (a queue of our own on versioned_notifications.*). */
async function listenForSnapshotEvents(bus: Bus, exchange: string): Promise<(imageId: string) => Promise<SnapshotEvent>> {
  const seen = new Map<string, SnapshotEvent>();
  const waiting = new Map<string, (e: SnapshotEvent) => void>();
  const queue = await bus.assertQueue('', { durable: false, autoDelete: true, exclusive: true });
  for (const key of ['versioned_notifications.info', 'versioned_notifications.error']) await bus.bindQueue(queue, exchange, key);
  await bus.consume(
    queue,
    (d) => {
      const msg = unwrap(d.body) as { event_type?: string; payload?: { 'nova_object.data'?: Record<string, unknown> } };
      const data = msg.payload?.['nova_object.data'] ?? {};
      const imageId = data.snapshot_image_id;
      if (typeof imageId !== 'string' || !msg.event_type || msg.event_type === 'instance.snapshot.start') return;
      const event = { eventType: msg.event_type, data };
      seen.set(imageId, event);
      waiting.get(imageId)?.(event);
    },
    { noAck: true },
  );
  return (imageId) =>
    new Promise((resolve, reject) => {
      const done = seen.get(imageId);
      if (done) return resolve(done);
      const timer = setTimeout(() => reject(new Error(`no end notification for image ${imageId} in ${END_TIMEOUT_MS} ms`)), END_TIMEOUT_MS);
      waiting.set(imageId, (e) => {
        clearTimeout(timer);
        resolve(e);
      });
    });
}

function demoConfig(config: Config, base: string): Config {
  config.DEFAULT.instances_path = path.join(base, 'instances');
  config.DEFAULT.state_path = path.join(base, 'state');
  config.DEFAULT.transport_url = 'memory:///snapdrv-demo';
  config.DEFAULT.host = 'demo-host';
  config.image_store.path = path.join(base, 'images');
  config.image_store.reserved_space_mb = 0;
  config.hypervisor.shutdown_timeout = 1;
  return config;
}

/**
 * The whole path on the embedded broker: a throw-away real QEMU guest, the agent serving on memory://,
 * one `snapshot_instance` cast per strategy (the agent restarted with that strategy), each end
 * notification awaited, every image verified, a table printed.
 */
export function registerDemoCommand(program: Command): void {
  program
    .command('demo')
    .description('the whole path on the embedded broker: a demo guest snapshotted with every strategy over RPC')
    .option('--keep', 'keep the temporary folder (guest stopped, images kept)')
    .action(async (opts: { keep?: boolean }) => {
      const base = await fs.mkdtemp(path.join(os.tmpdir(), 'snapdrv-demo-'));
      const config = demoConfig(await loadConfig(program.opts<{ configFile: string[] }>().configFile), base);
      const log: Logger = createLogger({ level: config.DEFAULT.debug ? 'debug' : 'warn' });
      const rt = buildRuntime(config, log);
      const hv = rt.hv;
      const uuid = randomUUID();
      const bus = await openBus(config.DEFAULT.transport_url, config.oslo_messaging_rabbit, log);
      try {
        process.stderr.write(`demo: creating guest ${uuid} (128 MiB RAM, 1 GiB qcow2) in ${base}\n`);
        await hv.createInstance({ uuid, name: 'demo', memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: 1024 * MiB });
        await rt.lifecycle.start(uuid);
        for (const [i, offsetMiB] of [0, 100, 500].entries()) {
          await hv.hmp(uuid, `qemu-io -d ${DISK_QOM_PATH} "write -P 0x${(0x41 + i).toString(16)} ${offsetMiB}M 8M"`);
        }
        const client = await new RpcClient(bus, { exchange: config.DEFAULT.control_exchange, server: config.DEFAULT.host }).open();
        const instance = {
          'nova_object.name': 'Instance',
          'nova_object.namespace': 'nova',
          'nova_object.version': '2.7',
          'nova_object.data': { uuid, display_name: 'demo', user_id: 'demo-user', project_id: 'demo-project' },
        };
        let waitForEnd: ((imageId: string) => Promise<SnapshotEvent>) | undefined;
        const rows: unknown[][] = [];
        for (const strategy of STRATEGIES) {
          config.snapshot.strategy = strategy;
          const agent = await startAgent(buildRuntime(config, log));
          try {
            waitForEnd ??= await listenForSnapshotEvents(bus, config.DEFAULT.control_exchange);
            const imageId = randomUUID();
            process.stderr.write(`demo: cast snapshot_instance (${strategy})\n`);
            const castAt = performance.now();
            await client.cast('snapshot_instance', { instance, image_id: imageId });
            const end = await waitForEnd(imageId);
            const durationMs = Math.round(performance.now() - castAt);
            if (end.eventType !== 'instance.snapshot.end') throw new SnapshotFailed(`${strategy}: ${end.eventType}`);
            const image = await rt.store.show(imageId);
            const verified = await rt.store.verify(imageId);
            if (!verified.ok) process.exitCode = 1;
            rows.push([
              strategy,
              end.data.downtime_ms,
              durationMs,
              imageId,
              image.size,
              `${(image.os_hash_value ?? '').slice(0, 16)}…`,
              verified.ok ? 'ok' : 'MISMATCH',
              (await hv.info(uuid)).state,
            ]);
          } finally {
            await agent.stop();
          }
        }
        await client.close();
        printTable(['strategy', 'downtime_ms', 'cast_to_end_ms', 'image_id', 'size', 'sha512', 'verify', 'guest'], rows);
      } finally {
        await bus.close().catch(() => undefined);
        await hv.stop(uuid, { graceful: false }).catch(() => undefined);
        if (opts.keep) process.stderr.write(`demo: kept ${base}\n`);
        else await fs.rm(base, { recursive: true, force: true });
      }
    });
}
