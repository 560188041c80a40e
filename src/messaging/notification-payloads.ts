/**
 * Snapshot notification payloads, shaped like nova's:
 * - versioned: `InstanceActionSnapshotPayload` 1.10 (nova/notifications/objects/instance.py), a
 *   nova-object primitive whose data holds InstancePayload's fields, `fault` and `snapshot_image_id`;
 * - legacy (unversioned): a flat dict in the style of nova.compute.utils.info_from_instance.
 * Both add `downtime_ms`, `strategy` and `bytes` (SPEC §5). What the agent does not know (network,
 * block devices, shares) is left empty or null, as nova does when those are not configured.
 */
import { errorMessage, errorName } from '../errors.js';

export interface SnapshotNotificationInfo {
  instanceUuid: string;
  imageId: string;
  strategy?: string;
  requestId: string;
  userId?: string;
  projectId?: string;
  /** `args.instance` as received: a nova Instance primitive, or a plain `{"uuid": …}`. */
  instance?: unknown;
}

export interface SnapshotEndInfo extends SnapshotNotificationInfo {
  downtimeMs?: number;
  bytes?: number;
}

export interface SnapshotErrorInfo extends SnapshotNotificationInfo {
  /** The failure (or pass it as snapshotError's second argument). */
  error?: unknown;
  downtimeMs?: number;
  bytes?: number;
}

/** The parts of the snapshot engine's result (SnapshotResult) that go into the end notification. */
export interface SnapshotOutcome {
  downtime_ms?: number;
  /** Bytes of the exported image. */
  size?: number;
  strategy?: string;
}

export interface NovaObjectPrimitive {
  'nova_object.name': string;
  'nova_object.namespace': 'nova';
  'nova_object.version': string;
  'nova_object.data': Record<string, unknown>;
}

export const SNAPSHOT_PAYLOAD_VERSION = '1.10';
const FLAVOR_PAYLOAD_VERSION = '1.4';
const EXCEPTION_PAYLOAD_VERSION = '1.1';

/** nova.objects.fields.InstancePowerState: the int in Instance, the name in notifications. */
const POWER_STATES: Record<number, string> = {
  0: 'pending',
  1: 'running',
  3: 'paused',
  4: 'shutdown',
  6: 'crashed',
  7: 'suspended',
};

function novaObject(name: string, version: string, data: Record<string, unknown>): NovaObjectPrimitive {
  return {
    'nova_object.name': name,
    'nova_object.namespace': 'nova',
    'nova_object.version': version,
    'nova_object.data': data,
  };
}

function asRecord(v: unknown): Record<string, unknown> | undefined {
  return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
}

/** The fields of a nova object primitive (its `nova_object.data`), or the plain dict itself. */
function objectData(v: unknown): Record<string, unknown> {
  const o = asRecord(v) ?? {};
  return asRecord(o['nova_object.data']) ?? o;
}

const orNull = (v: unknown): unknown => (v === undefined ? null : v);

function flavorPayload(flavor: unknown): NovaObjectPrimitive | null {
  if (asRecord(flavor) === undefined) return null;
  const f = objectData(flavor);
  const keys = ['flavorid', 'name', 'memory_mb', 'vcpus', 'root_gb', 'ephemeral_gb', 'swap', 'rxtx_factor',
    'vcpu_weight', 'disabled', 'is_public', 'extra_specs', 'projects', 'description'];
  return novaObject('FlavorPayload', FLAVOR_PAYLOAD_VERSION, Object.fromEntries(keys.map((k) => [k, orNull(f[k])])));
}

function powerState(v: unknown): unknown {
  if (typeof v === 'number') return POWER_STATES[v] ?? null;
  return orNull(v);
}

function autoDiskConfig(v: unknown): unknown {
  if (typeof v === 'boolean') return v ? 'AUTO' : 'MANUAL';
  return v ?? 'MANUAL';
}

/** nova ExceptionPayload 1.1. */
export function exceptionPayload(err: unknown, functionName = 'snapshot_instance'): NovaObjectPrimitive {
  return novaObject('ExceptionPayload', EXCEPTION_PAYLOAD_VERSION, {
    module_name: 'snapshot_driver',
    function_name: functionName,
    exception: errorName(err),
    exception_message: errorMessage(err),
    traceback: err instanceof Error && err.stack ? err.stack : `${errorName(err)}: ${errorMessage(err)}`,
  });
}

interface PayloadExtras {
  host: string;
  fault?: unknown;
  downtimeMs?: number;
  bytes?: number;
}

export function versionedSnapshotPayload(info: SnapshotNotificationInfo, x: PayloadExtras): NovaObjectPrimitive {
  const i = objectData(info.instance);
  return novaObject('InstanceActionSnapshotPayload', SNAPSHOT_PAYLOAD_VERSION, {
    uuid: info.instanceUuid,
    user_id: orNull(i.user_id ?? info.userId),
    tenant_id: orNull(i.project_id ?? info.projectId),
    reservation_id: orNull(i.reservation_id),
    display_name: orNull(i.display_name),
    display_description: orNull(i.display_description),
    host_name: orNull(i.hostname),
    host: i.host ?? x.host,
    node: orNull(i.node),
    os_type: orNull(i.os_type),
    architecture: orNull(i.architecture),
    availability_zone: orNull(i.availability_zone),
    flavor: flavorPayload(i.flavor),
    image_uuid: orNull(i.image_ref),
    key_name: orNull(i.key_name),
    kernel_id: orNull(i.kernel_id),
    ramdisk_id: orNull(i.ramdisk_id),
    created_at: orNull(i.created_at),
    launched_at: orNull(i.launched_at),
    terminated_at: orNull(i.terminated_at),
    deleted_at: orNull(i.deleted_at),
    updated_at: orNull(i.updated_at),
    state: orNull(i.vm_state),
    power_state: powerState(i.power_state),
    task_state: orNull(i.task_state),
    progress: orNull(i.progress),
    ip_addresses: [],
    block_devices: null,
    metadata: asRecord(i.metadata) ?? {},
    locked: i.locked === true,
    auto_disk_config: autoDiskConfig(i.auto_disk_config),
    request_id: info.requestId,
    action_initiator_user: orNull(info.userId),
    action_initiator_project: orNull(info.projectId),
    locked_reason: null,
    shares: null,
    fault: x.fault === undefined ? null : exceptionPayload(x.fault),
    snapshot_image_id: info.imageId,
    downtime_ms: orNull(x.downtimeMs),
    strategy: orNull(info.strategy),
    bytes: orNull(x.bytes),
  });
}

export function legacySnapshotPayload(info: SnapshotNotificationInfo, x: PayloadExtras): Record<string, unknown> {
  const i = objectData(info.instance);
  return {
    tenant_id: orNull(i.project_id ?? info.projectId),
    user_id: orNull(i.user_id ?? info.userId),
    instance_id: info.instanceUuid,
    display_name: orNull(i.display_name),
    reservation_id: orNull(i.reservation_id),
    hostname: orNull(i.hostname),
    host: i.host ?? x.host,
    node: orNull(i.node),
    availability_zone: orNull(i.availability_zone),
    created_at: orNull(i.created_at),
    launched_at: orNull(i.launched_at),
    image_ref_url: orNull(i.image_ref),
    os_type: orNull(i.os_type),
    architecture: orNull(i.architecture),
    state: orNull(i.vm_state),
    state_description: orNull(i.task_state),
    metadata: asRecord(i.metadata) ?? {},
    request_id: info.requestId,
    snapshot_image_id: info.imageId,
    downtime_ms: orNull(x.downtimeMs),
    strategy: orNull(info.strategy),
    bytes: orNull(x.bytes),
  };
}
