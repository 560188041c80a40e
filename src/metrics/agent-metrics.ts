import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Logger } from '../log.js';

/**
 * The agent's Prometheus metrics (SPEC §9), one registry per runtime (never prom-client's global
 * one: several runtimes in one process, as in the tests and the demo, keep their own counts). Each
 * fact is recorded once, where it happens, through the methods below: the compute manager (each
 * snapshot's or backup's outcome with its downtime, duration and bytes, as its reply says; the
 * operations in progress and waiting), the RPC server (requests by method and result), recovery
 * (recovered operations), the agent (the broker connection, as the bus reports it). Two gauges are read when scraped: the image store's free bytes
 * (statfs) and the pending internal snapshots (the pending records on disk, which `snapshot` and
 * `cleanup` commands in other processes change too).
 *
 * This module depends on prom-client (and the logger) only, so that every layer may record into it.
 */

export * from './names.js';
import { METRIC_NAMES, RECOVERY_OUTCOMES, SECONDS_BUCKETS, UNKNOWN_METHOD, type RecoveryOutcome, type RpcResultLabel } from './names.js';

export interface AgentMetricsOptions {
  /** Strategy names whose series start at 0 (the `strategy` label takes only these). */
  strategies?: readonly string[];
  /** Served RPC methods whose series start at 0. */
  rpcMethods?: readonly string[];
  /** Free bytes of the image store's filesystem, read at each scrape. */
  imageStoreFreeBytes?: () => Promise<number>;
  /** Internal snapshots recorded pending (deferred-delete), read at each scrape. */
  pendingInternalSnapshots?: () => Promise<number>;
  /** Where a gauge that cannot be read at a scrape is logged (debug: a scrape every few seconds). */
  log?: Logger;
}

/** A successful snapshot as the engine measured it (its SnapshotResult: milliseconds, rounded). */
export interface SnapshotMeasure {
  strategy: string;
  downtimeSeconds: number;
  durationSeconds: number;
  /** The raw image's size (what was exported into the store, holes included). */
  bytes: number;
}

export class AgentMetrics {
  readonly registry = new Registry();
  private readonly snapshots: Counter<'strategy' | 'result'>;
  private readonly downtime: Histogram<'strategy'>;
  private readonly duration: Histogram<'strategy'>;
  private readonly exportedBytes: Counter;
  private readonly inProgress: Gauge;
  private readonly waiting: Gauge;
  private readonly rpcRequests: Counter<'method' | 'result'>;
  private readonly brokerUp: Gauge;
  private readonly brokerReconnects: Counter;
  private readonly recovered: Counter<'outcome'>;
  private processMetrics = false;

  constructor(opts: AgentMetricsOptions = {}) {
    const registers = [this.registry];
    this.snapshots = new Counter({
      name: METRIC_NAMES.snapshots,
      help: 'Snapshots and backups taken, by strategy and result (success or failure).',
      labelNames: ['strategy', 'result'],
      registers,
    });
    this.downtime = new Histogram({
      name: METRIC_NAMES.downtime,
      help: "Guest downtime of each successful snapshot, in seconds: how long its vCPUs did not run (or its disk I/O was held, for live and monitor-snapshot).",
      labelNames: ['strategy'],
      buckets: [...SECONDS_BUCKETS],
      registers,
    });
    this.duration = new Histogram({
      name: METRIC_NAMES.duration,
      help: 'Duration of each successful snapshot, in seconds, from its start to its image active.',
      labelNames: ['strategy'],
      buckets: [...SECONDS_BUCKETS],
      registers,
    });
    this.exportedBytes = new Counter({
      name: METRIC_NAMES.exportedBytes,
      help: 'Bytes of the raw images of successful snapshots exported into the image store (their size, holes included).',
      registers,
    });
    this.inProgress = new Gauge({
      name: METRIC_NAMES.inProgress,
      help: 'RPC operations (snapshots, backups, power operations) running now.',
      registers,
    });
    this.waiting = new Gauge({
      name: METRIC_NAMES.waiting,
      help: "RPC operations waiting: behind another operation on the same instance, or for a snapshot slot (max_concurrent_snapshots).",
      registers,
    });
    this.rpcRequests = new Counter({
      name: METRIC_NAMES.rpcRequests,
      help: 'RPC requests by method and result: success, failure, or refused (malformed, unknown method, incompatible version, bad arguments, duplicate, not journaled).',
      labelNames: ['method', 'result'],
      registers,
    });
    this.brokerUp = new Gauge({
      name: METRIC_NAMES.brokerConnected,
      help: 'Whether the connection to the message broker is up (1) or not (0).',
      registers,
    });
    this.brokerReconnects = new Counter({
      name: METRIC_NAMES.brokerReconnects,
      help: 'Times the connection to the message broker was lost and restored.',
      registers,
    });
    this.recovered = new Counter({
      name: METRIC_NAMES.recovered,
      help: 'Interrupted operations recovered (at start-up, or left by a process that died), by outcome: the image active, killed, discarded (carried out again), deleted or missing, or failed (tried again later).',
      labelNames: ['outcome'],
      registers,
    });
    new Gauge({
      name: METRIC_NAMES.pending,
      help: 'Internal snapshots recorded pending (deferred-delete), to be deleted when their guest next has no QEMU process.',
      registers,
      collect: scraped(METRIC_NAMES.pending, opts.pendingInternalSnapshots, opts.log),
    });
    new Gauge({
      name: METRIC_NAMES.storeFreeBytes,
      help: "Free bytes of the image store's filesystem (available to unprivileged users, before reserved_space_mb).",
      registers,
      collect: scraped(METRIC_NAMES.storeFreeBytes, opts.imageStoreFreeBytes, opts.log),
    });
    // Series that exist from the start, at 0: rate() and increase() see the first event.
    for (const strategy of opts.strategies ?? []) {
      for (const result of ['success', 'failure'] as const) this.snapshots.inc({ strategy, result }, 0);
      this.downtime.zero({ strategy });
      this.duration.zero({ strategy });
    }
    for (const method of opts.rpcMethods ?? []) {
      for (const result of ['success', 'failure', 'refused'] as const) this.rpcRequests.inc({ method, result }, 0);
    }
    this.rpcRequests.inc({ method: UNKNOWN_METHOD, result: 'refused' }, 0);
    for (const outcome of RECOVERY_OUTCOMES) this.recovered.inc({ outcome }, 0);
  }

  /** Adds prom-client's default process metrics (CPU, memory, file descriptors, event loop lag…), once. */
  collectProcessMetrics(): void {
    if (this.processMetrics) return;
    this.processMetrics = true;
    collectDefaultMetrics({ register: this.registry });
  }

  /** The Prometheus text exposition of every metric. */
  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  snapshotSucceeded(m: SnapshotMeasure): void {
    this.snapshots.inc({ strategy: m.strategy, result: 'success' });
    this.downtime.observe({ strategy: m.strategy }, m.downtimeSeconds);
    this.duration.observe({ strategy: m.strategy }, m.durationSeconds);
    this.exportedBytes.inc(m.bytes);
  }

  snapshotFailed(strategy: string): void {
    this.snapshots.inc({ strategy, result: 'failure' });
  }

  /** `method`: a served method, or UNKNOWN_METHOD (the caller keeps the label's values bounded). */
  rpcRequest(method: string, result: RpcResultLabel): void {
    this.rpcRequests.inc({ method, result });
  }

  brokerConnected(up: boolean): void {
    this.brokerUp.set(up ? 1 : 0);
  }

  brokerReconnected(): void {
    this.brokerReconnects.inc();
    this.brokerUp.set(1);
  }

  operationRecovered(outcome: RecoveryOutcome): void {
    this.recovered.inc({ outcome });
  }

  /** A new operation, counted as waiting until it runs (see OperationTrack). */
  trackOperation(): OperationTrack {
    return new OperationTrack(this.waiting, this.inProgress);
  }
}

/**
 * One operation in the in-progress and waiting gauges: in exactly one of them (starting as waiting)
 * until end(), after which it is in neither and moves no more.
 */
export class OperationTrack {
  private place: 'waiting' | 'running' | 'ended' = 'waiting';

  constructor(
    private readonly waitingGauge: Gauge,
    private readonly runningGauge: Gauge,
  ) {
    waitingGauge.inc();
  }

  wait(): void {
    this.move('waiting');
  }

  run(): void {
    this.move('running');
  }

  end(): void {
    this.move('ended');
  }

  private move(to: 'waiting' | 'running' | 'ended'): void {
    if (this.place === to || this.place === 'ended') return;
    (this.place === 'waiting' ? this.waitingGauge : this.runningGauge).dec();
    if (to !== 'ended') (to === 'waiting' ? this.waitingGauge : this.runningGauge).inc();
    this.place = to;
  }
}

/** A gauge's collect(): the value read now; NaN (unknown) when it cannot be read; none given: 0. */
function scraped(name: string, read: (() => Promise<number>) | undefined, log: Logger | undefined): ((this: Gauge) => Promise<void>) | undefined {
  if (read === undefined) return undefined;
  return async function (this: Gauge) {
    let value: number;
    try {
      value = await read();
    } catch (err) {
      log?.debug({ err, metric: name }, 'cannot read a gauge for a scrape: NaN');
      value = Number.NaN;
    }
    this.set(value);
  };
}
