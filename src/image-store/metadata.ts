import { readFile } from 'node:fs/promises';
import { isErrno, writeFileAtomic } from '../util/durable-fs.js';
import { ImageStoreCorrupt } from './errors.js';
import { IMAGE_STATUSES, type ImageMeta, type NewImage, type OsHashAlgo } from './types.js';

/** Mode of every file the store creates (data and metadata). */
export const FILE_MODE = 0o640;

/** ISO 8601 UTC with second precision, as Glance prints it: 2026-11-22T01:02:03Z. */
export function isoSeconds(d: Date): string {
  return d.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

/** The metadata of a new, empty (`queued`) image. `img.id` must already be a validated UUID. */
export function newImageMeta(img: NewImage, osHashAlgo: OsHashAlgo, now: Date): ImageMeta {
  const ts = isoSeconds(now);
  const meta: ImageMeta = {
    id: img.id,
    name: img.name,
    status: 'queued',
    disk_format: 'raw',
    container_format: 'bare',
    size: null,
    virtual_size: img.virtualSize ?? null,
    checksum: null,
    os_hash_algo: osHashAlgo,
    os_hash_value: null,
    created_at: ts,
    updated_at: ts,
    owner: img.owner ?? null,
    min_disk: img.minDisk ?? 0,
    min_ram: img.minRam ?? 0,
    visibility: 'private',
    properties: {
      image_type: img.imageType,
      instance_uuid: img.instanceUuid,
      user_id: img.userId ?? null,
      base_image_ref: img.baseImageRef ?? null,
      image_location: 'snapshot',
    },
  };
  if (img.backupType !== undefined) meta.properties.backup_type = img.backupType;
  return meta;
}

function isNullableString(v: unknown): boolean {
  return v === null || typeof v === 'string';
}

function isNullableCount(v: unknown): boolean {
  return v === null || (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0);
}

/** Parses and checks a metadata file's text; anything malformed is ImageStoreCorrupt naming the file. */
export function parseImageMeta(text: string, file: string, expectedId: string): ImageMeta {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ImageStoreCorrupt(`image metadata file ${file} is not valid JSON: ${(err as Error).message}`, {
      cause: err,
    });
  }
  const bad = (what: string): never => {
    throw new ImageStoreCorrupt(`image metadata file ${file} is malformed: ${what}`);
  };
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return bad('not a JSON object');
  const m = raw as Record<string, unknown>;
  if (m.id !== expectedId) bad(`"id" is ${JSON.stringify(m.id)}, expected ${expectedId} (the file name)`);
  if (typeof m.name !== 'string') bad('"name" is not a string');
  if (!IMAGE_STATUSES.includes(m.status as never)) bad(`"status" ${JSON.stringify(m.status)} is not a Glance status`);
  if (typeof m.os_hash_algo !== 'string') bad('"os_hash_algo" is not a string');
  for (const k of ['size', 'virtual_size'] as const) if (!isNullableCount(m[k])) bad(`"${k}" is not a byte count or null`);
  for (const k of ['checksum', 'os_hash_value', 'owner'] as const) if (!isNullableString(m[k])) bad(`"${k}" is not a string or null`);
  for (const k of ['created_at', 'updated_at'] as const) if (typeof m[k] !== 'string') bad(`"${k}" is not a string`);
  const props = m.properties;
  if (typeof props !== 'object' || props === null || Array.isArray(props)) bad('"properties" is not an object');
  if (m.status === 'active' && (typeof m.checksum !== 'string' || typeof m.os_hash_value !== 'string' || m.size === null)) {
    bad('an active image lacks size, checksum or os_hash_value');
  }
  return m as unknown as ImageMeta;
}

/** Reads one image's metadata; null when the file does not exist. */
export async function readImageMeta(file: string, id: string): Promise<ImageMeta | null> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return null;
    throw err;
  }
  return parseImageMeta(text, file, id);
}

/**
 * Writes metadata atomically and durably. With `exclusive`, fails with EEXIST when the file exists
 * (used by create so two creates of one id cannot both succeed).
 */
export async function writeImageMeta(file: string, meta: ImageMeta, opts: { exclusive?: boolean } = {}): Promise<void> {
  await writeFileAtomic(file, `${JSON.stringify(meta, null, 2)}\n`, { mode: FILE_MODE, exclusive: opts.exclusive });
}
