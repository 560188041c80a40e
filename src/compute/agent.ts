import path from 'node:path';
import type { Bus } from '../messaging/bus.js';
import { OsloNotifier } from '../messaging/notifier.js';
import { RpcServer } from '../messaging/rpc-server.js';
import { rabbitTopologyFromConfig } from '../messaging/topology.js';
import { openBus } from '../messaging/transport/open-bus.js';
import { AgentAlreadyRunning } from '../errors.js';
import { PidLock } from '../util/pid-lock.js';
import { FileJournal } from './journal.js';
import { ComputeManager } from './manager.js';
import { recoverAtStart, type RecoveryReport } from './startup-recovery.js';
import type { Runtime } from './runtime.js';

/** The running agent: the RPC server on the configured transport, over the compute manager. */
export interface Agent {
  bus: Bus;
  manager: ComputeManager;
  rpc: RpcServer;
  /** What start-up recovery found and did. */
  recovery: RecoveryReport;
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
  });
  const rpc = new RpcServer({ bus, target: manager, journal, controlExchange, host, rabbit, log });
  return { journal, manager, rpc };
}

/**
 * Starts the agent: recovers what a crash interrupted (guests, images, orphaned and pending internal
 * snapshots: recoverAtStart), opens the transport, and serves — after carrying out the requests its
 * journal recorded but did not finish (those whose operation was interrupted end with an error).
 */
export async function startAgent(rt: Runtime): Promise<Agent> {
  const { config, log } = rt;
  const lock = agentLock(rt);
  const holder = await lock.acquire();
  if (holder !== undefined) {
    throw new AgentAlreadyRunning(`another agent (pid ${holder.pid}) already serves with state_path ${config.DEFAULT.state_path}`);
  }
  let bus: Bus | undefined;
  try {
    const recovery = await recoverAtStart(rt);
    bus = await openBus(config.DEFAULT.transport_url, config.oslo_messaging_rabbit, log);
    const openedBus = bus;
    const { manager, rpc } = await buildServer(rt, bus);
    await rpc.start();
    log.info({ host: config.DEFAULT.host, control_exchange: config.DEFAULT.control_exchange }, 'agent serving');
    return {
      bus: openedBus,
      manager,
      rpc,
      recovery,
      async stop() {
        await rpc.stop();
        await openedBus.close();
        await lock.release();
      },
    };
  } catch (err) {
    await bus?.close().catch(() => undefined);
    await lock.release().catch(() => undefined);
    throw err;
  }
}

/** Held by a serving agent: one agent per state_path (its request journal is for one process). */
export function agentLock(rt: Runtime): PidLock {
  return new PidLock(path.join(rt.config.DEFAULT.state_path, 'agent.lock'));
}
