import { errorMessage, ImageNotFound } from '../errors.js';
import type { ImageMeta, ImageStoreBackend } from '../image-store/image-store.js';
import type { Logger } from '../log.js';

export interface RotationRequest {
  instanceUuid: string;
  backupType: string;
  /** How many backups of this instance and type to keep; 0 keeps none (not even the new one). */
  rotation: number;
  /** The backup just made: counted as the newest whatever the clock says. */
  newImageId?: string;
}

/**
 * Deletes an instance's backups of one type beyond the newest `rotation`, like nova's
 * ComputeManager._rotate_backups: list the backups newest first, delete the excess from the oldest
 * end; a failed delete is logged and the rest go on. Only `active` backups count: a killed attempt
 * neither takes a place nor pushes a good backup out. Returns the ids deleted.
 */
export async function rotateBackups(store: ImageStoreBackend, req: RotationRequest, log: Logger): Promise<string[]> {
  const uuid = req.instanceUuid.toLowerCase();
  const newId = req.newImageId?.toLowerCase();
  // The filter goes to Glance as property filters (the local store applies it itself); checked again here.
  const backups = (await store.list({ instanceUuid: uuid, imageType: 'backup', backupType: req.backupType })).filter(
    (m) =>
      m.status === 'active' &&
      m.properties.image_type === 'backup' &&
      m.properties.backup_type === req.backupType &&
      String(m.properties.instance_uuid).toLowerCase() === uuid,
  );
  backups.sort((a, b) => newestFirst(a, b, newId));
  const excess = backups.slice(req.rotation);
  log.debug({ backups: backups.length, rotation: req.rotation, backup_type: req.backupType }, `rotating out ${excess.length} backups`);
  const deleted: string[] = [];
  for (const image of excess.reverse()) {
    try {
      await store.delete(image.id);
      deleted.push(image.id);
      log.info({ image_id: image.id, backup_type: req.backupType }, 'deleted excess backup');
    } catch (err) {
      if (err instanceof ImageNotFound) log.info({ image_id: image.id }, 'excess backup already gone');
      else log.warn({ image_id: image.id, err }, `could not delete excess backup: ${errorMessage(err)}; continuing`);
    }
  }
  return deleted;
}

/** created_at has one-second precision: ties fall back to updated_at (commit time), then id. */
function newestFirst(a: ImageMeta, b: ImageMeta, newId: string | undefined): number {
  if (a.id === newId) return -1;
  if (b.id === newId) return 1;
  return cmpDesc(a.created_at, b.created_at) || cmpDesc(a.updated_at, b.updated_at) || cmpDesc(a.id, b.id);
}

function cmpDesc(a: string, b: string): number {
  return a < b ? 1 : a > b ? -1 : 0;
}
