import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { startAgent } from '../service/agent.js';
import { buildRuntime, metricsOf } from '../service/runtime.js';
import { loadConfig } from '../config/load.js';
import { STRATEGIES, type Config } from '../config/schema.js';
import type { Bus } from '../messaging/bus.js';
import { unwrap } from '../messaging/envelope.js';
import { RpcClient } from '../messaging/rpc-client.js';
import { openBus } from '../messaging/transport/open-bus.js';
import { SnapshotFailed } from '../errors.js';
import { GuestConsole } from '../guest-check/console.js';
import { checkGuestImage, type GuestImageReport } from '../guest-check/ext4.js';
import { defaultGuestDir, readGuestImage } from '../guest-check/guest-image.js';
import { observeRunningGuest } from '../guest-check/observe.js';
import { waitForGuestReady } from '../guest-check/ready.js';
import { createLogger, type Logger } from '../log.js';
import { printTable } from './output.js';
import { localStore } from '../image-store/image-store.js';

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
  config.image_store.backend = 'local'; // the demo reads the images' files
  config.image_store.reserved_space_mb = 0;
  config.hypervisor.shutdown_timeout = 1;
  // The demo guest is made on the spot: the qemu backend's own instance, whatever the config says.
  config.hypervisor.driver = 'qemu';
  // TCG: the demo's guest is small, and a host's /dev/kvm may be one that cannot run it (a nested
  // kvm-pvm here hangs a guest at its first instructions, and kvm:tcg would pick it).
  config.hypervisor.accel = 'tcg';
  // Its agents start one after the other, beside any agent of the host's: they serve no metrics,
  // and the demo prints what they recorded at the end.
  config.metrics.listen = null;
  return config;
}

/** How the image's filesystem looks: mountable as it is, after a journal replay, or damaged. */
function fsVerdict(r: GuestImageReport): string {
  if (r.cleanWithoutReplay) return 'clean';
  return r.cleanAfterReplay ? 'clean after replay' : 'DAMAGED';
}

/**
 * The whole path on the embedded broker: a throw-away real Linux guest (scripts/guest-image.sh) whose
 * writer appends fsynced records, the agent serving on memory://, one `snapshot_instance` cast per
 * strategy (the agent restarted with that strategy), each end notification awaited, every image
 * verified, its filesystem and records checked, and a table printed beside the pause the guest saw.
 */
export function registerDemoCommand(program: Command): void {
  program
    .command('demo')
    .description('the whole path on the embedded broker: a real Linux guest snapshotted with every strategy over RPC')
    .option('--guest-dir <dir>', 'the test guest built by scripts/guest-image.sh', defaultGuestDir())
    .option('--keep', 'keep the temporary folder (guest stopped, images kept)')
    .action(async (opts: { guestDir: string; keep?: boolean }) => {
      const guest = await readGuestImage(opts.guestDir);
      const base = await fs.mkdtemp(path.join(os.tmpdir(), 'snapdrv-demo-'));
      const config = demoConfig(await loadConfig(program.opts<{ configFile: string[] }>().configFile), base);
      const log: Logger = createLogger({ level: config.DEFAULT.debug ? 'debug' : 'warn' });
      const rt = buildRuntime(config, log);
      const metrics = await metricsOf(rt);
      const hv = rt.qemu!;
      const uuid = randomUUID();
      const bus = await openBus(config.DEFAULT.transport_url, config.oslo_messaging_rabbit, log);
      try {
        process.stderr.write(`demo: booting Linux guest ${uuid} (kernel ${guest.kernelVersion}, 128 MiB RAM, ext4 root) in ${base}\n`);
        await hv.createInstance({
          uuid,
          name: 'demo',
          memoryMb: 128,
          vcpus: 1,
          machine: 'pc',
          baseImage: guest.rootDisk,
          baseImageFormat: guest.rootDiskFormat,
          kernel: guest.kernel,
          initrd: guest.initrd,
          cmdline: guest.cmdline,
        });
        const guestConsole = new GuestConsole(path.join(config.DEFAULT.instances_path, uuid, 'console.log'));
        const bootStart = performance.now();
        await rt.lifecycle.start(uuid);
        await waitForGuestReady(hv, uuid, guestConsole);
        process.stderr.write(`demo: guest up, its agent answering, after ${Math.round(performance.now() - bootStart)} ms; its writer is running\n`);
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
          const agent = await startAgent(buildRuntime(config, log, { metrics }));
          try {
            waitForEnd ??= await listenForSnapshotEvents(bus, config.DEFAULT.control_exchange);
            const imageId = randomUUID();
            process.stderr.write(`demo: cast snapshot_instance (${strategy})\n`);
            const castAt = performance.now();
            const waitEnd = waitForEnd;
            const { result: end, guest: seen, fsyncedBefore } = await observeRunningGuest(guestConsole, async () => {
              await client.cast('snapshot_instance', { instance, image_id: imageId });
              return waitEnd(imageId);
            });
            const durationMs = Math.round(performance.now() - castAt);
            if (end.eventType !== 'instance.snapshot.end') throw new SnapshotFailed(`${strategy}: ${end.eventType}`);
            const image = await rt.store.show(imageId);
            const verified = await rt.store.verify(imageId);
            const fsReport = await checkGuestImage(localStore(rt.store).dataPath(imageId), path.join(base, 'check', imageId));
            const recordsOk = fsReport.records.problems.length === 0 && Number(fsReport.records.last) >= fsyncedBefore;
            if (!verified.ok || !fsReport.cleanAfterReplay || !recordsOk) process.exitCode = 1;
            rows.push([
              strategy,
              end.data.downtime_ms,
              Math.round(seen.stoppedMs),
              durationMs,
              imageId,
              image.size,
              `${(image.os_hash_value ?? '').slice(0, 16)}…`,
              verified.ok ? 'ok' : 'MISMATCH',
              fsVerdict(fsReport),
              recordsOk ? String(fsReport.records.last) : `BAD: ${fsReport.records.problems[0] ?? 'before the snapshot'}`,
              (await hv.info(uuid)).state,
            ]);
          } finally {
            await agent.stop();
          }
        }
        await client.close();
        printTable(
          ['strategy', 'downtime_ms', 'guest_saw_ms', 'cast_to_end_ms', 'image_id', 'size', 'sha512', 'verify', 'filesystem', 'last_record', 'guest'],
          rows,
        );
        // What GET /metrics would have answered after these snapshots: the agent's own series, but
        // for the histograms' buckets (their _sum and _count stay).
        const exposition = await metrics.text();
        const ours = exposition.split('\n').filter((l) => /^(# (HELP|TYPE) )?snapshot_driver_/.test(l) && !/^snapshot_driver_\w+_bucket\{/.test(l));
        process.stdout.write(`\n# GET /metrics after the demo: the snapshot_driver_* series, without histogram buckets\n${ours.join('\n')}\n`);
      } finally {
        await bus.close().catch(() => undefined);
        await hv.stop(uuid, { graceful: false }).catch(() => undefined);
        if (opts.keep) process.stderr.write(`demo: kept ${base}\n`);
        else await fs.rm(base, { recursive: true, force: true });
      }
    });
}
