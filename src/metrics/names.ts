/**
 * The names, buckets and label values of the agent's metrics (SPEC §9), without prom-client: what
 * records a fact imports these, and loading prom-client is left to what serves the metrics.
 */

export const METRIC_NAMES = {
  snapshots: 'snapshot_driver_snapshots_total',
  downtime: 'snapshot_driver_guest_downtime_seconds',
  duration: 'snapshot_driver_snapshot_duration_seconds',
  exportedBytes: 'snapshot_driver_exported_bytes_total',
  inProgress: 'snapshot_driver_operations_in_progress',
  waiting: 'snapshot_driver_operations_waiting',
  rpcRequests: 'snapshot_driver_rpc_requests_total',
  brokerConnected: 'snapshot_driver_broker_connected',
  brokerReconnects: 'snapshot_driver_broker_reconnects_total',
  recovered: 'snapshot_driver_recovered_operations_total',
  pending: 'snapshot_driver_pending_internal_snapshots',
  storeFreeBytes: 'snapshot_driver_image_store_free_bytes',
} as const;

/**
 * Buckets of the downtime and duration histograms, in seconds: milliseconds for `live` and
 * `monitor-snapshot` (whose downtime is the few ms their point in time holds disk I/O), up to an
 * hour for `cold` (its downtime is a whole export; `[hypervisor] export_timeout` defaults to 3600 s).
 */
export const SECONDS_BUCKETS: readonly number[] = [
  0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600,
];

export type SnapshotResultLabel = 'success' | 'failure';

/**
 * `result` of snapshot_driver_rpc_requests_total: success and failure are requests carried out;
 * refused ones were not (malformed, unknown method, incompatible version, bad arguments, a
 * duplicate `_unique_id`, or one the journal could not record).
 */
export type RpcResultLabel = 'success' | 'failure' | 'refused';

/** The `method` label of a request whose method is not one the agent serves (or could not be read). */
export const UNKNOWN_METHOD = 'unknown';

/**
 * `outcome` of snapshot_driver_recovered_operations_total: what became of the interrupted
 * operation's image (active: it had completed; killed; discarded: no step had begun, the request is
 * carried out again; deleted; missing), or `failed` when recovery could not finish (its record is
 * kept and tried again).
 */
export const RECOVERY_OUTCOMES = ['active', 'killed', 'discarded', 'deleted', 'missing', 'failed'] as const;
export type RecoveryOutcome = (typeof RECOVERY_OUTCOMES)[number];
