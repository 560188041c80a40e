import path from 'node:path';
import type { Bus } from '../messaging/bus.js';
import { OsloNotifier } from '../messaging/notifier.js';
import { RpcServer } from '../messaging/rpc-server.js';
import { rabbitTopologyFromConfig } from '../messaging/topology.js';
import { openBus } from '../messaging/transport/open-bus.js';
import { AgentAlreadyRunning, errorMessage } from '../errors.js';
import { recoverOperations } from '../snapshot/recovery.js';
import { isRunning } from '../util/process-identity.js';
import { PidLock } from '../util/pid-lock.js';
import { FileJournal } from '../compute/journal.js';
import { ComputeManager } from '../compute/manager.js';
import { startMetricsServer, type MetricsServer } from './metrics-server.js';
import { Readiness } from './readiness.js';
import { recoverAtStart, recoveryDeps, type RecoveryReport } from './startup-recovery.js';
import { metricsOf, type Runtime } from './runtime.js';
import type { AgentMetrics } from '../metrics/agent-metrics.js';

/** The running agent: the RPC server on the configured transport, over the compute manager. */
export interface Agent {
  bus: Bus;
  manager: ComputeManager;
  rpc: RpcServer;
  /** What start-up recovery found and did. */
  recovery: RecoveryReport;
  /** The metrics endpoint (`[metrics] listen`), unless turned off. */
  metricsServer?: MetricsServer;
  /** What `/readyz` answers. */
  readiness: Readiness;
  /** Stops consuming, waits for running operations, closes the connection. */
  stop(): Promise<void>;
}

/** The agent's request journal, under `<state_path>/journal`. */
export function requestJournal(rt: Runtime): FileJournal {
  return new FileJournal({ dir: path.join(rt.config.DEFAULT.state_path, 'journal'), log: rt.log });
}

/** The request journal (one given, or the agent's), the notifier, the compute manager and the RPC server, on an open bus. */
export async function buildServer(
  rt: Runtime,
  bus: Bus,
  given?: FileJournal,
): Promise<{ journal: FileJournal; manager: ComputeManager; rpc: RpcServer }> {
  const { config, log } = rt;
  const rabbit = rabbitTopologyFromConfig(config.oslo_messaging_rabbit);
  const { host, control_exchange: controlExchange } = config.DEFAULT;
  const journal = await (given ?? requestJournal(rt)).open();
  const notifier = new OsloNotifier({
    bus,
    controlExchange,
    host,
    format: config.notifications.notification_format,
    driver: config.oslo_messaging_notifications.driver,
    rabbit,
    log,
  });
  const manager = new ComputeManager({
    engine: rt.engine,
    lifecycle: rt.lifecycle,
    store: rt.store,
    hv: rt.hv,
    log,
    maxConcurrentSnapshots: config.DEFAULT.max_concurrent_snapshots,
    defaultStrategy: config.snapshot.strategy,
    notifier,
    locks: rt.locks,
    metrics: rt.metrics,
  });
  const rpc = new RpcServer({ bus, target: manager, journal, controlExchange, host, rabbit, log, metrics: rt.metrics });
  return { journal, manager, rpc };
}

/**
 * Starts the agent: listens at `[metrics] listen` (unless off; not ready yet), recovers what a crash
 * interrupted (guests, images, orphaned and pending internal snapshots: recoverAtStart), opens the
 * transport, and serves — after carrying out the requests its journal recorded but did not finish
 * (those whose operation was interrupted end with an error). Ready from then on, while the broker
 * connection is up.
 */
export async function startAgent(rt: Runtime): Promise<Agent> {
  const { config, log } = rt;
  const lock = agentLock(rt);
  const holder = await lock.acquire();
  if (holder !== undefined) {
    throw new AgentAlreadyRunning(`another agent (pid ${holder.pid}) already serves with state_path ${config.DEFAULT.state_path}`);
  }
  const readiness = new Readiness();
  const metrics = await metricsOf(rt);
  let bus: Bus | undefined;
  let metricsServer: MetricsServer | undefined;
  try {
    // First: a port in use stops the agent before it touches anything, and /readyz answers meanwhile.
    metricsServer = await serveMetrics(rt, metrics, readiness);
    const recovery = await recoverAtStart(rt);
    readiness.recovered();
    bus = await openBus(config.DEFAULT.transport_url, config.oslo_messaging_rabbit, log);
    const openedBus = bus;
    watchBroker(metrics, bus, readiness);
    const { manager, rpc } = await buildServer(rt, bus);
    await rpc.start();
    readiness.serving();
    const orphans = watchOrphanedOperations(rt);
    log.info({ host: config.DEFAULT.host, control_exchange: config.DEFAULT.control_exchange }, 'agent serving');
    const served = metricsServer;
    return {
      bus: openedBus,
      manager,
      rpc,
      recovery,
      ...(served && { metricsServer: served }),
      readiness,
      async stop() {
        readiness.stopping();
        await orphans.stop();
        await rpc.stop();
        await openedBus.close();
        metrics.brokerConnected(false);
        await served?.close();
        await lock.release();
      },
    };
  } catch (err) {
    await bus?.close().catch(() => undefined);
    await metricsServer?.close().catch(() => undefined);
    await lock.release().catch(() => undefined);
    throw err;
  }
}

/** The metrics endpoint at `[metrics] listen`, with the process metrics; none when the option is empty. */
async function serveMetrics(rt: Runtime, metrics: AgentMetrics, readiness: Readiness): Promise<MetricsServer | undefined> {
  const listen = rt.config.metrics.listen;
  if (listen === null) return undefined;
  metrics.collectProcessMetrics();
  return startMetricsServer({ listen, metrics, readiness: () => readiness.state(), log: rt.log });
}

/** The broker connection's state, as the bus reports it: readiness, and the broker metrics. */
function watchBroker(metrics: AgentMetrics, bus: Bus, readiness: Readiness): void {
  readiness.broker(true);
  metrics.brokerConnected(true);
  bus.on('disconnected', () => {
    readiness.broker(false);
    metrics.brokerConnected(false);
  });
  bus.on('reconnected', () => {
    readiness.broker(true);
    metrics.brokerReconnected();
  });
}

/** Held by a serving agent: one agent per state_path (its request journal is for one process). */
export function agentLock(rt: Runtime): PidLock {
  return new PidLock(path.join(rt.config.DEFAULT.state_path, 'agent.lock'));
}

/**
 * How often a serving agent looks for operations whose process died (a `snapshot` command killed
 * while the guest was managed-saved): not a config option.
 */
export const ORPHANED_OPERATION_SCAN_MS = 3_000;

/**
 * While the agent serves: every ORPHANED_OPERATION_SCAN_MS, the operation journal's records whose
 * owner is another process that is gone (its instance lock released, the kernel saw to that, with the
 * record left), and those abandoned (an operation that ended with an undo that failed, in this
 * process or another), are recovered as start-up recovery does (src/snapshot/recovery.ts: the guest back in
 * its prior state, the image killed, the record removed), instead of waiting for the next start.
 * Records of running processes (this agent's own operations, a `snapshot` command under way) are
 * left alone, and so is an instance another process holds (recovery takes its lock, not waiting).
 */
export function watchOrphanedOperations(rt: Runtime, everyMs = ORPHANED_OPERATION_SCAN_MS): { stop(): Promise<void> } {
  const { log } = rt;
  let scanning: Promise<void> | undefined;
  let stopped = false;
  const scan = async (): Promise<void> => {
    const orphaned = new Set<string>();
    for (const rec of await rt.operations.list()) {
      // This agent's own operations under way, or a command's: theirs to end. An abandoned one
      // (ended with an undo that failed, e.g. a guest left paused) is recovery's now, whoever owns it.
      if (rec.abandoned !== true && (await isRunning(rec.owner))) continue;
      orphaned.add(rec.instance_uuid.toLowerCase());
    }
    for (const uuid of orphaned) {
      if (stopped) return;
      log.warn({ instance_uuid: uuid }, 'an operation on this instance was left by a process that is gone: recovering it');
      const recovered = await recoverOperations(recoveryDeps(rt), uuid);
      for (const r of recovered) {
        if (r.error !== undefined) log.error({ ...r }, `recovery of an orphaned operation failed (tried again later): ${r.error}`);
      }
    }
  };
  const timer = setInterval(() => {
    if (stopped || scanning !== undefined) return;
    scanning = scan()
      .catch((err: unknown) => log.error({ err }, `scan for orphaned operations failed: ${errorMessage(err)}`))
      .finally(() => (scanning = undefined));
  }, everyMs);
  timer.unref();
  return {
    async stop() {
      stopped = true;
      clearInterval(timer);
      await scanning;
    },
  };
}
