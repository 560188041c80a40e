import { ImageStoreCorrupt } from '../errors.js';
import { IMAGE_STATUSES, type ImageMeta, type ImageProperties, type ImageStatus, type NewImage } from '../types.js';

/** Glance v2's own image fields; every other key of an image is an (extra) property. */
const CORE_FIELDS = new Set([
  'id', 'name', 'status', 'disk_format', 'container_format', 'size', 'virtual_size', 'checksum', 'os_hash_algo',
  'os_hash_value', 'created_at', 'updated_at', 'owner', 'min_disk', 'min_ram', 'visibility', 'protected', 'tags',
  'self', 'file', 'schema', 'locations', 'direct_url', 'os_hidden', 'stores',
]);

/** Glance properties are strings of at most 255 characters. */
export const MAX_PROPERTY_CHARS = 255;

/** Glance's image JSON as the store's ImageMeta (SPEC §6 fields; Glance's extra properties in `properties`). */
export function toImageMeta(raw: unknown, id: string): ImageMeta {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new ImageStoreCorrupt(`Glance's record of image ${id} is not a JSON object`);
  const g = raw as Record<string, unknown>;
  if (typeof g.id !== 'string' || g.id.toLowerCase() !== id.toLowerCase()) throw new ImageStoreCorrupt(`Glance answered for image ${String(g.id)} when asked for ${id}`);
  const properties: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(g)) if (!CORE_FIELDS.has(k)) properties[k] = v;
  const status = IMAGE_STATUSES.includes(g.status as ImageStatus) ? (g.status as ImageStatus) : (STATUS_ALIASES[String(g.status)] ?? 'killed');
  return {
    id: g.id.toLowerCase(),
    name: typeof g.name === 'string' ? g.name : '',
    status,
    disk_format: 'raw',
    container_format: 'bare',
    size: numberOrNull(g.size),
    virtual_size: numberOrNull(g.virtual_size),
    checksum: typeof g.checksum === 'string' ? g.checksum : null,
    os_hash_algo: typeof g.os_hash_algo === 'string' ? g.os_hash_algo : '',
    os_hash_value: typeof g.os_hash_value === 'string' ? g.os_hash_value : null,
    created_at: typeof g.created_at === 'string' ? g.created_at : '',
    updated_at: typeof g.updated_at === 'string' ? g.updated_at : '',
    owner: typeof g.owner === 'string' ? g.owner : null,
    min_disk: numberOrNull(g.min_disk) ?? 0,
    min_ram: numberOrNull(g.min_ram) ?? 0,
    visibility: 'private',
    properties: properties as ImageProperties,
  };
}

/** Glance's statuses beyond SPEC §6's, as the nearest of them. */
const STATUS_ALIASES: Record<string, ImageStatus> = { uploading: 'saving', importing: 'saving', pending_delete: 'deleted', deactivated: 'active' };

/**
 * The properties nova-compute sets on a snapshot's image (nova/compute/api.py _initialize_instance_snapshot_metadata
 * and the driver's snapshot): as strings; unknown ones (null) left out.
 */
export function snapshotProperties(img: NewImage): Record<string, string> {
  const p: Record<string, string> = {
    image_type: img.imageType,
    instance_uuid: img.instanceUuid.toLowerCase(),
    image_location: 'snapshot',
    image_state: 'available',
  };
  if (img.userId !== undefined) p.user_id = img.userId;
  if (img.owner !== undefined) p.owner_id = img.owner;
  if (img.baseImageRef !== undefined) p.base_image_ref = img.baseImageRef;
  if (img.backupType !== undefined) p.backup_type = img.backupType;
  return p;
}

/**
 * The JSON-patch (application/openstack-images-v2.1-json-patch) that sets `changes` on an image
 * whose record is `current`: `replace` for what it has, `add` for what it lacks.
 */
export function patchOps(current: Record<string, unknown>, changes: Record<string, string>): { op: 'add' | 'replace'; path: string; value: string }[] {
  return Object.entries(changes).map(([k, value]) => ({
    op: current[k] === undefined || current[k] === null ? ('add' as const) : ('replace' as const),
    path: `/${k}`,
    value,
  }));
}

function numberOrNull(v: unknown): number | null {
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}
