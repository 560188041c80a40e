import path from 'node:path';
import type { Bus } from '../messaging/bus.js';
import { OsloNotifier } from '../messaging/notifier.js';
import { RpcServer } from '../messaging/rpc-server.js';
import { rabbitTopologyFromConfig } from '../messaging/topology.js';
import { openBus } from '../messaging/transport/open-bus.js';
import { errorMessage } from '../errors.js';
import { FileJournal } from './journal.js';
import { ComputeManager } from './manager.js';
import type { Runtime } from './runtime.js';

/** The running agent: the RPC server on the configured transport, over the compute manager. */
export interface Agent {
  bus: Bus;
  manager: ComputeManager;
  rpc: RpcServer;
  /** Stops consuming, waits for running operations, closes the connection. */
  stop(): Promise<void>;
}

/**
 * Starts the agent: deletes the pending snapshots of guests that have no QEMU process (the safety rule
 * allows it now), opens the transport, and serves — after carrying out the requests its journal
 * recorded but did not finish.
 */
export async function startAgent(rt: Runtime): Promise<Agent> {
  const { config, log } = rt;
  for (const inst of await rt.hv.list()) {
    await rt.lifecycle.deletePendingIfOffline(inst.uuid).catch((err: unknown) => {
      log.error({ instance_uuid: inst.uuid, err }, `cannot delete pending snapshots: ${errorMessage(err)}`);
    });
  }
  const rabbit = rabbitTopologyFromConfig(config.oslo_messaging_rabbit);
  const { host, control_exchange: controlExchange } = config.DEFAULT;
  const bus = await openBus(config.DEFAULT.transport_url, config.oslo_messaging_rabbit, log);
  try {
    const journal = await new FileJournal({ dir: path.join(config.DEFAULT.state_path, 'journal'), log }).open();
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
    });
    const rpc = new RpcServer({ bus, target: manager, journal, controlExchange, host, rabbit, log });
    await rpc.start();
    log.info({ host, control_exchange: controlExchange }, 'agent serving');
    return {
      bus,
      manager,
      rpc,
      async stop() {
        await rpc.stop();
        await bus.close();
      },
    };
  } catch (err) {
    await bus.close().catch(() => undefined);
    throw err;
  }
}
