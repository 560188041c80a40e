/** Glance v2 image statuses used by the store (SPEC §6). */
export type ImageStatus = 'queued' | 'saving' | 'active' | 'killed' | 'deleted';

export type OsHashAlgo = 'sha512' | 'sha384' | 'sha256';

export const OS_HASH_ALGOS: readonly OsHashAlgo[] = ['sha512', 'sha384', 'sha256'];

export const IMAGE_STATUSES: readonly ImageStatus[] = ['queued', 'saving', 'active', 'killed', 'deleted'];

export interface ImageProperties {
  image_type: 'snapshot' | 'backup';
  instance_uuid: string;
  user_id: string | null;
  base_image_ref: string | null;
  image_location: 'snapshot';
  backup_type?: string;
  [k: string]: unknown;
}

/** The metadata of one image, Glance v2 style; stored as `<path>/<id>.json`. */
export interface ImageMeta {
  id: string;
  name: string;
  status: ImageStatus;
  disk_format: 'raw';
  container_format: 'bare';
  /** Apparent size of the raw data in bytes (null until committed). */
  size: number | null;
  virtual_size: number | null;
  /** md5 hex of the data (null until committed). */
  checksum: string | null;
  os_hash_algo: string;
  os_hash_value: string | null;
  /** ISO 8601 UTC, second precision, e.g. 2026-11-22T01:02:03Z. */
  created_at: string;
  updated_at: string;
  owner: string | null;
  min_disk: number;
  min_ram: number;
  visibility: 'private';
  properties: ImageProperties;
}

export interface NewImage {
  id: string;
  name: string;
  instanceUuid: string;
  imageType: 'snapshot' | 'backup';
  backupType?: string;
  userId?: string;
  owner?: string;
  baseImageRef?: string;
  minDisk?: number;
  minRam?: number;
  virtualSize?: number;
}

export type ProgressCallback = (fraction: number) => void;

export interface VerifyResult {
  ok: boolean;
  checksum: string;
  os_hash_value: string;
  expected_checksum: string;
  expected_os_hash_value: string;
  size_ok: boolean;
}

