import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import { errorMessage, ImageExists, ImageNotFound, InvalidInstanceId } from '../../errors.js';
import type { Logger } from '../../log.js';
import { isErrno } from '../../util/durable-fs.js';
import { faultPoint } from '../../util/fault.js';
import { isUuid } from '../../util/uuid.js';
import { GlanceError, GlanceUnavailable, GlanceUploadMismatch, ImageInvalidState, StreamedUploadCut } from '../errors.js';
import { digestFile, type FileDigests } from '../hash.js';
import { IncomingImage, incomingSocketDirs, type ImageSink } from '../incoming-image.js';
import type { NbdLog } from '../nbd-server.js';
import { StorePaths, validateImageId } from '../paths.js';
import { checkFreeSpace, defaultStatfs, freeBytes, type StatfsFn } from '../space.js';
import type { CommitOptions, ImageFilter, ImageStoreBackend, ReceiveOptions, StoreLeftovers, StoreRequestAuth } from '../backend.js';
import type { ImageMeta, NewImage, OsHashAlgo, ProgressCallback, VerifyResult } from '../types.js';
import type { GlanceClient } from './client.js';
import { MAX_PROPERTY_CHARS, patchOps, snapshotProperties, toImageMeta } from './images.js';
import { StreamedUpload } from './streamed-upload.js';
import { notBackInQueued, uploadImageFile } from './upload.js';

const PATCH_TYPE = 'application/openstack-images-v2.1-json-patch';
/** Images per page of a list; pages followed at most this many times. */
const PAGE = 200;
const MAX_PAGES = 1000;

export interface GlanceStoreOptions {
  client: GlanceClient;
  /** `[image_store] path`: where exports are staged (`<path>/.partial/<id>`) before the upload. */
  stagingPath: string;
  reservedSpaceMb: number;
  osHashAlgo: OsHashAlgo;
  log: Logger;
  statfs?: StatfsFn;
  /** `[DEFAULT] agent_cpus`: the CPU list the hash threads of a background export run on (IncomingImage.open). */
  agentCpus?: string;
}

/** What every view of one store shares (forRequest makes views). */
interface Shared {
  /**
   * Images this process adopted whose upload is not its own (another agent's PUT was taken first:
   * Glance answered 409, or the record was past queued). A failure never deletes those.
   */
  notOurs: Set<string>;
  /** Images whose streamed upload Glance took whole (active there): commit only verifies them. Bytes sent. */
  streamed: Map<string, number>;
}

/**
 * The Glance v2 image store (SPEC §6.1). An export that can be run again (`receive` with
 * `streamable`) goes straight into PUT /v2/images/{id}/file as it is made (StreamedUpload, nothing
 * staged; a cut upload with the image back in queued is StreamedUploadCut: the caller runs the export
 * again, within `[glance] retries`), and commit() only checks Glance's record of it. Any other export
 * is received into a local staging file (the local store's partial path: the NBD receiver hashes it
 * as it arrives), then commit() streams it to Glance. Either way commit checks Glance's record
 * (active, size, os_hash, checksum) against the receiver's hashes. The staging file is removed in
 * every outcome.
 * A failed snapshot's image is deleted in Glance (nova's delete_image_on_error), unless the upload
 * Glance took was another's.
 */
export class GlanceImageStore implements ImageStoreBackend {
  readonly backend = 'glance';
  readonly maxPropertyChars = MAX_PROPERTY_CHARS;
  readonly osHashAlgo: OsHashAlgo;
  private readonly agentCpus: string | undefined;
  readonly paths: StorePaths;
  private readonly client: GlanceClient;
  private readonly reservedSpaceMb: number;
  private readonly statfs: StatfsFn;
  private readonly baseLog: Logger;
  private readonly shared: Shared;
  private readonly auth: StoreRequestAuth | undefined;
  private readonly opts: GlanceStoreOptions;

  constructor(opts: GlanceStoreOptions, view?: { shared: Shared; auth: StoreRequestAuth }) {
    this.client = opts.client;
    this.paths = new StorePaths(opts.stagingPath);
    this.osHashAlgo = opts.osHashAlgo;
    this.agentCpus = opts.agentCpus;
    this.reservedSpaceMb = opts.reservedSpaceMb;
    this.statfs = opts.statfs ?? defaultStatfs;
    this.baseLog = opts.log;
    this.shared = view?.shared ?? { notOurs: new Set(), streamed: new Map() };
    this.auth = view?.auth;
    this.opts = opts;
  }

  forRequest(auth: StoreRequestAuth): GlanceImageStore {
    return new GlanceImageStore(this.opts, { shared: this.shared, auth });
  }

  get partialDir(): string {
    return this.paths.partialDir;
  }

  partialPath(id: string): string {
    return this.paths.partial(canonicalId(id));
  }

  private get log(): Logger {
    return this.auth?.log ?? this.baseLog;
  }

  /**
   * Adopts the record nova-api made (status queued), or creates it when there is none (the
   * command line), and sets what nova-compute sets before an upload: disk_format raw,
   * container_format bare, and the snapshot's properties (one JSON-patch).
   */
  async create(img: NewImage): Promise<ImageMeta> {
    const id = canonicalId(img.id);
    if (!isUuid(img.instanceUuid)) throw new InvalidInstanceId(String(img.instanceUuid));
    if (img.imageType !== 'snapshot' && img.imageType !== 'backup') throw new TypeError(`image type ${JSON.stringify(img.imageType)}: expected snapshot or backup`);
    let raw = await this.getRaw(id);
    const adopted = raw !== undefined;
    if (raw === undefined) raw = await this.createRecord(id, img);
    const status = String(raw.status);
    if (status !== 'queued') {
      this.shared.notOurs.add(id);
      if (status === 'active') throw new ImageExists(id);
      throw new ImageInvalidState(`image ${id} is ${status} in Glance (expected queued): another upload has it`);
    }
    const changes: Record<string, string> = { disk_format: 'raw', container_format: 'bare', ...snapshotProperties(img) };
    const patched = await this.client.call('PATCH', `/v2/images/${id}`, {
      auth: this.auth,
      what: `set the formats and properties of image ${id} in Glance`,
      ok: [200],
      json: patchOps(raw, changes),
      contentType: PATCH_TYPE,
    });
    this.log.info({ image_id: id, glance: patched.server, adopted }, 'Glance image record ready for upload');
    return toImageMeta(parse(patched.body, id), id);
  }

  private async createRecord(id: string, img: NewImage): Promise<Record<string, unknown>> {
    const body: Record<string, unknown> = {
      id,
      name: img.name,
      disk_format: 'raw',
      container_format: 'bare',
      visibility: 'private',
      ...(img.minDisk !== undefined && { min_disk: img.minDisk }),
      ...(img.minRam !== undefined && { min_ram: img.minRam }),
    };
    try {
      const created = await this.client.call('POST', '/v2/images', { auth: this.auth, what: `create image ${id} in Glance`, ok: [201], json: body });
      this.log.info({ image_id: id }, 'Glance image record created (none existed)');
      return parse(created.body, id);
    } catch (err) {
      // Created meanwhile (nova-api, or another agent): adopt it as found.
      if (!(err instanceof GlanceError) || err.status !== 409) throw err;
      const raw = await this.getRaw(id);
      if (raw === undefined) throw err; // deleted ids cannot be used again in Glance
      return raw;
    }
  }

  /** Room to stage the export; a streamed one is staged nowhere. */
  async ensureSpace(id: string, bytesNeeded: number, opts: { streamable?: boolean } = {}): Promise<void> {
    const cid = canonicalId(id);
    if (opts.streamable === true) return;
    await checkFreeSpace({ statfs: this.statfs, dir: this.paths.root, reservedSpaceMb: this.reservedSpaceMb, bytesNeeded, what: `image ${cid} (staged before its upload to Glance)` });
  }

  freeBytes(): Promise<number> {
    return freeBytes(this.statfs, this.paths.root);
  }

  /** Glance marks the image saving itself when the upload starts: here it must still be queued. */
  async markSaving(id: string): Promise<ImageMeta> {
    const meta = await this.show(id);
    if (meta.status !== 'queued') {
      this.shared.notOurs.add(meta.id);
      throw new ImageInvalidState(`cannot upload image ${meta.id}: it is ${meta.status} in Glance (expected queued): another upload has it`);
    }
    return meta;
  }

  async receive(id: string, size: number, log: NbdLog, opts: ReceiveOptions = {}): Promise<ImageSink> {
    const cid = canonicalId(id);
    if (!Number.isSafeInteger(size) || size < 0) throw new TypeError(`image size ${size}: expected a byte count >= 0`);
    if (opts.streamable === true) return this.receiveStreamed(cid, size, log, opts.attempt ?? 1);
    await fs.mkdir(this.paths.partialDir, { recursive: true, mode: 0o750 });
    return IncomingImage.open(this.paths.partial(cid), size, this.osHashAlgo, log, { background: opts.background, agentCpus: this.agentCpus });
  }

  /** The upload of one run of the export, to the first API server that answers about the image now. */
  private async receiveStreamed(cid: string, size: number, nbdLog: NbdLog, attempt: number): Promise<ImageSink> {
    if (attempt > 1) await this.client.pause(attempt - 1);
    const answer = await this.client.call('GET', `/v2/images/${cid}`, { auth: this.auth, what: `read image ${cid} in Glance`, ok: [200] });
    const status = String(parse(answer.body, cid).status);
    if (status !== 'queued') {
      this.shared.notOurs.add(cid);
      throw new ImageInvalidState(`cannot upload image ${cid}: it is ${status} in Glance (expected queued): another upload has it`);
    }
    const what = `upload image ${cid} to Glance`;
    this.log.info({ image_id: cid, glance: answer.server, attempt, bytes: size }, 'streaming the export into Glance (nothing staged)');
    if (attempt === 1) faultPoint('streamed-upload');
    return StreamedUpload.open({
      client: this.client,
      server: answer.server,
      imageId: cid,
      size,
      osHashAlgo: this.osHashAlgo,
      cpus: this.agentCpus,
      auth: this.auth,
      nbdLog,
      log: this.log,
      uploaded: (bytes) => this.shared.streamed.set(cid, bytes),
      failed: async (end) => {
        if (end.kind === 'refused') return this.refusedUpload(cid, end.error);
        const why = end.kind === 'unreached' ? `${answer.server}: ${end.why}` : end.why;
        let now: string;
        try {
          now = (await this.show(cid)).status;
        } catch (err) {
          return new GlanceUnavailable(`cannot ${what}: ${why}; the image's status cannot be read (${errorMessage(err)}): not tried again`);
        }
        const notAgain = notBackInQueued(what, why, now);
        if (notAgain !== undefined) return notAgain;
        if (attempt > this.client.retries) return new GlanceUnavailable(`cannot ${what}: ${why} (${attempt} attempts)`);
        this.log.warn({ image_id: cid, attempt, retries: this.client.retries }, `streamed upload failed (${why}); the image is back in queued: the export is run again`);
        return new StreamedUploadCut(`cannot ${what}: ${why}; the image is back in queued`);
      },
    });
  }

  /**
   * 409: another upload had already marked the image saving. 410: Glance's answer to the upload that
   * loses the race to mark it saving (or to an image deleted meanwhile). Either way the image is not
   * this upload's to delete: deleting it would fail the winner's upload too.
   */
  private refusedUpload(cid: string, err: Error): Error {
    if (err instanceof GlanceError && (err.status === 409 || err.status === 410)) {
      this.shared.notOurs.add(cid);
      return new GlanceError(`${err.message} (another upload has the image, or it was deleted: it is left to that)`, err.status, err.glanceMessage);
    }
    return err;
  }

  /**
   * Uploads the staged data (a streamed image is in Glance already) and checks what Glance made of
   * it: active, the size sent, and its hashes those the receiver computed as the export made the
   * data. The staged file is removed in every outcome.
   */
  async commit(id: string, opts: CommitOptions = {}): Promise<ImageMeta> {
    const cid = canonicalId(id);
    const file = this.paths.partial(cid);
    const streamed = this.shared.streamed.get(cid);
    try {
      if (streamed !== undefined) {
        if (opts.digests === undefined) throw new ImageInvalidState(`image ${cid} was streamed to Glance, but its hashes are not known: it cannot be verified`);
        const image = await this.verifyUploaded(cid, streamed, await opts.digests, opts.virtualSize);
        this.log.info({ image_id: cid, bytes: streamed }, 'streamed image verified in Glance');
        return image;
      }
      let size: number;
      try {
        size = (await fs.stat(file)).size;
      } catch (err) {
        if (isErrno(err, 'ENOENT')) throw new ImageInvalidState(`image ${cid} has no data to upload: ${file} does not exist`);
        throw err;
      }
      const received = opts.digests !== undefined ? await opts.digests : await digestFileAt(file, this.osHashAlgo, size);
      if (received.bytes !== size) throw new GlanceUploadMismatch(`image ${cid}: ${received.bytes} bytes were received and hashed, but ${file} holds ${size}`);
      const started = performance.now();
      const sent = await uploadImageFile({
        client: this.client,
        imageId: cid,
        file,
        size,
        auth: this.auth,
        log: this.log,
        status: async () => (await this.show(cid)).status,
        onProgress: opts.onProgress,
      }).catch((err: unknown) => {
        throw err instanceof Error ? this.refusedUpload(cid, err) : err;
      });
      const seconds = (performance.now() - started) / 1000;
      const image = await this.verifyUploaded(cid, sent.bytes, received, opts.virtualSize);
      this.log.info(
        { image_id: cid, bytes: sent.bytes, attempts: sent.attempts, upload_s: Number(seconds.toFixed(3)), mib_per_s: Number((sent.bytes / 1048576 / Math.max(seconds, 1e-6)).toFixed(1)) },
        'image uploaded to Glance and verified',
      );
      return image;
    } finally {
      this.shared.streamed.delete(cid);
      await fs.rm(file, { force: true });
    }
  }

  /** Glance's record of an upload that went through: active, `bytes` long, hashed as `received`. */
  private async verifyUploaded(cid: string, bytes: number, received: FileDigests, virtualSize: number | undefined): Promise<ImageMeta> {
    const image = await this.show(cid);
    const problems: string[] = [];
    if (received.bytes !== bytes) problems.push(`${bytes} bytes sent, but ${received.bytes} hashed`);
    if (image.status !== 'active') problems.push(`status ${image.status} (expected active)`);
    if (image.size !== bytes) problems.push(`size ${image.size} (sent ${bytes})`);
    if (image.os_hash_algo !== this.osHashAlgo) problems.push(`os_hash_algo ${image.os_hash_algo} (the agent's is ${this.osHashAlgo}: set [image_store] os_hash_algo to Glance's hashing_algorithm)`);
    else if (image.os_hash_value !== received.osHash) problems.push(`os_hash_value ${image.os_hash_value} (the data exported hashes to ${received.osHash})`);
    if (image.checksum !== null && image.checksum !== received.md5) problems.push(`checksum ${image.checksum} (received data's md5 is ${received.md5})`);
    if (problems.length > 0) throw new GlanceUploadMismatch(`image ${cid} in Glance is not the data uploaded: ${problems.join('; ')}`);
    this.shared.notOurs.delete(cid);
    return { ...image, virtual_size: image.virtual_size ?? virtualSize ?? image.size };
  }

  /**
   * A failed snapshot's image: its staged data removed and, as nova's delete_image_on_error, the
   * image deleted in Glance, unless the upload Glance took was another's (a racing agent's).
   */
  async kill(id: string, reason?: string): Promise<void> {
    const cid = canonicalId(id);
    await fs.rm(this.paths.partial(cid), { force: true });
    this.shared.streamed.delete(cid);
    if (this.shared.notOurs.delete(cid)) {
      this.log.warn({ image_id: cid, reason }, 'image left in Glance: the upload it took was not ours');
      return;
    }
    try {
      await this.delete(cid);
      this.log.warn({ image_id: cid, reason }, 'failed snapshot: image deleted in Glance');
    } catch (err) {
      if (!(err instanceof ImageNotFound)) throw err;
    }
  }

  async setProperties(id: string, properties: Record<string, unknown>): Promise<ImageMeta> {
    const cid = canonicalId(id);
    const changes: Record<string, string> = {};
    for (const [k, v] of Object.entries(properties)) {
      const s = typeof v === 'string' ? v : JSON.stringify(v);
      if (s.length > MAX_PROPERTY_CHARS) throw new TypeError(`image property ${k}: ${s.length} characters, Glance takes at most ${MAX_PROPERTY_CHARS}`);
      changes[k] = s;
    }
    const raw = await this.getRaw(cid);
    if (raw === undefined) throw new ImageNotFound(cid);
    const answer = await this.client.call('PATCH', `/v2/images/${cid}`, {
      auth: this.auth,
      what: `set properties of image ${cid} in Glance`,
      ok: [200],
      json: patchOps(raw, changes),
      contentType: PATCH_TYPE,
    });
    return toImageMeta(parse(answer.body, cid), cid);
  }

  /** Staged files and the NBD sockets' folders; Glance keeps no temp files of ours. */
  async leftovers(): Promise<StoreLeftovers> {
    const partials = await fs.readdir(this.paths.partialDir).catch((err: unknown) => (isErrno(err, 'ENOENT') ? [] : Promise.reject(err)));
    return { partials, temps: [], socketDirs: await incomingSocketDirs() };
  }

  /** Images Glance shows, oldest first; `filter` goes to Glance as property filters. */
  async list(filter?: ImageFilter): Promise<ImageMeta[]> {
    const q = new URLSearchParams({ limit: String(PAGE), sort_key: 'created_at', sort_dir: 'asc' });
    if (filter?.instanceUuid !== undefined) q.set('instance_uuid', filter.instanceUuid.toLowerCase());
    if (filter?.imageType !== undefined) q.set('image_type', filter.imageType);
    if (filter?.backupType !== undefined) q.set('backup_type', filter.backupType);
    const out: ImageMeta[] = [];
    let path: string | undefined = `/v2/images?${q}`;
    for (let page = 0; path !== undefined && page < MAX_PAGES; page++) {
      const answer = await this.client.call('GET', path, { auth: this.auth, what: 'list images in Glance', ok: [200] });
      const body = parse(answer.body, 'list') as { images?: unknown; next?: unknown };
      if (!Array.isArray(body.images)) throw new GlanceError('cannot list images in Glance: its answer has no "images" array', answer.status, '');
      for (const raw of body.images) {
        const rid = (raw as { id?: unknown }).id;
        if (typeof rid === 'string' && isUuid(rid)) out.push(toImageMeta(raw, rid));
      }
      // `next` is Glance's own path with the marker (e.g. /v2/images?marker=…&limit=200…).
      path = typeof body.next === 'string' && body.next.startsWith('/v2/images?') ? body.next : undefined;
    }
    // Glance's own filters are exact; the same rule applied here keeps the two backends alike.
    return out.filter(
      (m) =>
        (filter?.instanceUuid === undefined || String(m.properties.instance_uuid).toLowerCase() === filter.instanceUuid.toLowerCase()) &&
        (filter?.imageType === undefined || m.properties.image_type === filter.imageType) &&
        (filter?.backupType === undefined || m.properties.backup_type === filter.backupType),
    );
  }

  /** Glance's queued images are nova-api's as much as ours: none are swept. */
  async unfinishedOwnImages(): Promise<ImageMeta[]> {
    return [];
  }

  async show(id: string): Promise<ImageMeta> {
    const cid = canonicalId(id);
    const raw = await this.getRaw(cid);
    if (raw === undefined) throw new ImageNotFound(cid);
    return toImageMeta(raw, cid);
  }

  /** Downloads an active image's data and hashes it (md5 and its os_hash_algo), against Glance's record. */
  async verify(id: string, opts: { onProgress?: ProgressCallback } = {}): Promise<VerifyResult> {
    const meta = await this.show(id);
    if (meta.status !== 'active') throw new ImageInvalidState(`cannot verify image ${meta.id}: its status is ${meta.status} (expected active)`);
    const algo = meta.os_hash_algo as OsHashAlgo;
    if (!['sha512', 'sha384', 'sha256'].includes(algo)) throw new ImageInvalidState(`cannot verify image ${meta.id}: Glance's os_hash_algo ${JSON.stringify(meta.os_hash_algo)} is not one the agent knows`);
    const body = await this.client.download(`/v2/images/${meta.id}/file`, { auth: this.auth, what: `download image ${meta.id} from Glance` });
    const md5 = createHash('md5');
    const os = createHash(algo);
    let bytes = 0;
    let reported = 0;
    for await (const chunk of body as AsyncIterable<Buffer>) {
      md5.update(chunk);
      os.update(chunk);
      bytes += chunk.length;
      if (opts.onProgress && meta.size && bytes - reported >= meta.size / 100) {
        reported = bytes;
        opts.onProgress(Math.min(1, bytes / meta.size));
      }
    }
    const checksum = md5.digest('hex');
    const osHash = os.digest('hex');
    const sizeOk = bytes === meta.size;
    return {
      ok: sizeOk && checksum === meta.checksum && osHash === meta.os_hash_value,
      checksum,
      os_hash_value: osHash,
      expected_checksum: meta.checksum ?? '',
      expected_os_hash_value: meta.os_hash_value ?? '',
      size_ok: sizeOk,
    };
  }

  async delete(id: string): Promise<void> {
    const cid = canonicalId(id);
    await fs.rm(this.paths.partial(cid), { force: true });
    try {
      await this.client.call('DELETE', `/v2/images/${cid}`, { auth: this.auth, what: `delete image ${cid} in Glance`, ok: [204] });
    } catch (err) {
      if (err instanceof GlanceError && err.status === 404) throw new ImageNotFound(cid);
      throw err;
    }
  }

  /** Glance's record of the image, or undefined when it has none (404). */
  private async getRaw(id: string): Promise<Record<string, unknown> | undefined> {
    try {
      const answer = await this.client.call('GET', `/v2/images/${id}`, { auth: this.auth, what: `read image ${id} in Glance`, ok: [200] });
      return parse(answer.body, id);
    } catch (err) {
      if (err instanceof GlanceError && err.status === 404) return undefined;
      throw err;
    }
  }
}

function canonicalId(id: unknown): string {
  validateImageId(id);
  return id.toLowerCase();
}

function parse(body: Buffer, what: string): Record<string, unknown> {
  try {
    const v = JSON.parse(body.toString('utf8')) as unknown;
    if (typeof v === 'object' && v !== null && !Array.isArray(v)) return v as Record<string, unknown>;
  } catch {
    // below
  }
  throw new GlanceError(`Glance's answer about ${what} is not a JSON object`, 200, body.toString('utf8').slice(0, 200));
}

async function digestFileAt(file: string, algo: OsHashAlgo, size: number) {
  const fh = await fs.open(file, 'r');
  try {
    return await digestFile(fh, algo, { expectedBytes: size });
  } finally {
    await fh.close();
  }
}
