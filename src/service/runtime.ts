import path from 'node:path';
import { STRATEGIES, type Config } from '../config/schema.js';
import { SERVED_METHODS } from '../compute/rpc-args.js';
import { imageStoreFromConfig } from '../image-store/from-config.js';
import type { ImageStoreBackend } from '../image-store/image-store.js';
import { hypervisorFromConfig } from '../hypervisor/from-config.js';
import type { QemuHypervisor } from '../hypervisor/qemu/qemu-hypervisor.js';
import type { Hypervisor } from '../hypervisor/types.js';
import type { Logger } from '../log.js';
import type { AgentMetrics } from '../metrics/agent-metrics.js';
import { QemuImg, qemuImgFromConfig } from '../qemu-img/qemu-img.js';
import { SnapshotEngine } from '../snapshot/engine.js';
import { quiesceOptions } from '../snapshot/guest-freeze.js';
import type { BeforeStep } from '../snapshot/run-steps.js';
import { OperationJournal } from '../snapshot/operation-journal.js';
import { PendingSnapshots } from '../snapshot/pending.js';
import { faultPoint } from '../util/fault.js';
import { InstanceLocks } from '../snapshot/instance-locks.js';
import { Lifecycle } from '../snapshot/lifecycle.js';
import { GuestWaits } from '../util/guest-waits.js';

/** The agent's parts, wired from a config: what the CLI and the RPC server act through. */
export interface Runtime {
  config: Config;
  log: Logger;
  hv: Hypervisor;
  /** The qemu backend, when `[hypervisor] driver = qemu`: it also creates and deletes instances. */
  qemu?: QemuHypervisor;
  qemuImg: QemuImg;
  /** The image store `[image_store] backend` names (local folder or Glance). */
  store: ImageStoreBackend;
  pending: PendingSnapshots;
  lifecycle: Lifecycle;
  operations: OperationJournal;
  /** One process at a time per instance (the agent, a command, recovery). */
  locks: InstanceLocks;
  engine: SnapshotEngine;
  /**
   * This runtime's Prometheus metrics (its own registry), once made (metricsOf): `serve` records and
   * serves them; a one-shot command has none (prom-client alone costs ~12 MiB of RSS).
   */
  metrics?: AgentMetrics;
  /**
   * Aborted by a one-shot command on a signal (`snapshot`, on SIGINT, SIGTERM, SIGHUP): every
   * operation of this runtime then fails at its next step with the abort's reason, and so undoes
   * what it did (guest back in its prior state, image killed, record ended), as on any failure.
   */
  interrupt: AbortController;
}

/**
 * `metrics`: the metrics to record into (the demo keeps one across the agents it starts one after
 * the other); else the runtime has none until metricsOf() makes them.
 */
export function buildRuntime(config: Config, log: Logger, opts: { beforeStep?: BeforeStep; metrics?: AgentMetrics } = {}): Runtime {
  const qemuImg = qemuImgFromConfig(config.hypervisor, config.DEFAULT.agent_cpus);
  const { hv, qemu } = hypervisorFromConfig(config, log);
  const store = imageStoreFromConfig(config, log);
  const pending = new PendingSnapshots(path.join(config.DEFAULT.state_path, 'pending'));
  const lifecycle = new Lifecycle(hv, pending, log, { softRebootWaitMs: config.hypervisor.wait_soft_reboot_seconds * 1000 });
  const operations = new OperationJournal(path.join(config.DEFAULT.state_path, 'operations'), log);
  const locks = new InstanceLocks(path.join(config.DEFAULT.state_path, 'locks'), log);
  const interrupt = new AbortController();
  const engine = new SnapshotEngine({
    hv,
    store,
    lifecycle,
    log,
    namePrefix: config.snapshot.name_prefix,
    defaultStrategy: config.snapshot.strategy,
    quiesce: quiesceOptions(config.snapshot),
    operations,
    faultPoint,
    guestWaits: new GuestWaits(config.hypervisor.background_export_yield_seconds * 1000),
    beforeStep: async (step, index) => {
      faultPoint(`step:${step.name}`);
      faultPoint(`step:${index}:${step.name}`);
      interrupt.signal.throwIfAborted();
      await opts.beforeStep?.(step, index);
    },
  });
  return { config, log, hv, ...(qemu && { qemu }), qemuImg, store, pending, lifecycle, operations, locks, engine, ...(opts.metrics && { metrics: opts.metrics }), interrupt };
}

/** Builds the runtime of a command from its global options (the config files), once per command. */
export type RuntimeFactory = () => Promise<Runtime>;

/** The runtime's metrics, made on first use: prom-client is loaded only by what records them. */
export async function metricsOf(rt: Runtime): Promise<AgentMetrics> {
  if (rt.metrics !== undefined) return rt.metrics;
  const { AgentMetrics } = await import('../metrics/agent-metrics.js');
  rt.metrics = new AgentMetrics({
    strategies: STRATEGIES,
    rpcMethods: SERVED_METHODS,
    imageStoreFreeBytes: () => rt.store.freeBytes(),
    pendingInternalSnapshots: () => rt.pending.count(),
    log: rt.log,
  });
  return rt.metrics;
}
