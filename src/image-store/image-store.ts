import { constants, mkdir, open, readdir, rename, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { ImageExists, ImageNotFound, InvalidInstanceId } from '../errors.js';
import { isUuid } from '../util/uuid.js';
import { fsyncDir, isErrno, pathExists, unlinkIfExists } from '../util/durable-fs.js';
import { ImageInvalidState, ImageStoreCorrupt } from './errors.js';
import { digestFile, type ParallelDigest } from './hash.js';
import { IncomingImage, incomingSocketDirs } from './incoming-image.js';
import type { NbdLog } from './nbd-server.js';
import { FILE_MODE, isoSeconds, newImageMeta, readImageMeta, writeImageMeta } from './metadata.js';
import { StorePaths, validateImageId } from './paths.js';
import { KeyedMutex } from './keyed-mutex.js';
import { PidLock } from '../util/pid-lock.js';
import { checkFreeSpace, defaultStatfs, freeBytes, type StatfsFn } from './space.js';
import {
  OS_HASH_ALGOS,
  type ImageMeta,
  type ImageStatus,
  type NewImage,
  type OsHashAlgo,
  type ProgressCallback,
  type VerifyResult,
} from './types.js';

export * from './types.js';
export * from './backend.js';
import type { CommitOptions, ImageFilter, ImageStoreBackend, ReceiveOptions, StoreLeftovers } from './backend.js';
export { ImageInvalidState, ImageStoreCorrupt } from './errors.js';

const DIR_MODE = 0o750;
/**
 * How long a change of an image waits for another process's change of the same image (a commit
 * hashes the whole image under it): as long as the agent waits for an instance, then LockTimeout
 * naming the holder. A holder that is stopped (not dead: the kernel frees a dead one's lock) must not
 * hold the agent forever.
 */
const STORE_LOCK_WAIT_MS = 15 * 60 * 1000;
/** Properties set when an image is created, which say what it is: setProperties leaves them alone. */
const FIXED_PROPERTIES: ReadonlySet<string> = new Set(['image_type', 'instance_uuid', 'user_id', 'base_image_ref', 'image_location', 'backup_type']);

export interface ImageStoreOptions {
  path: string;
  reservedSpaceMb: number;
  osHashAlgo: OsHashAlgo;
  /** Injectable for tests; defaults to fs.statfs. */
  statfs?: StatfsFn;
  /** Injectable clock for created_at/updated_at; defaults to the system clock. */
  now?: () => Date;
  /** Test hook at named points of the store's work (awaited): see StoreHookPoint. */
  hook?: StoreHook;
  /**
   * Take each image's kernel lock around its changes (default true). Only a store that no other
   * process ever opens (the unit tests' fake environments) may leave it out.
   */
  lockAcrossProcesses?: boolean;
  /** `[DEFAULT] agent_cpus`: the CPU list the hash threads of a background export run on (IncomingImage.open). */
  agentCpus?: string;
}

/**
 * - `lock-wait`: another process holds the image's lock; this one is about to wait for it;
 * - `receive:hashing`: the hash workers of data being received have started (`digest` is theirs);
 * - `commit:hashing`: a commit's hash workers have started (`digest` is theirs);
 * - `commit:renamed`: a commit has renamed the data into place, its metadata not yet `active`.
 */
export type StoreHookPoint = 'lock-wait' | 'receive:hashing' | 'commit:hashing' | 'commit:renamed';
export type StoreHook = (point: StoreHookPoint, id: string, digest?: ParallelDigest) => void | Promise<void>;

/**
 * The local image store (SPEC §6): `<path>/<id>` raw data, `<path>/<id>.json` Glance-style
 * metadata, `<path>/.partial/<id>` data being written. Data is renamed into place only once it is
 * complete, fsynced and hashed; only then is the image `active`.
 *
 * Ids are lower-cased UUIDs: an upper-case UUID is accepted and stored under its lower-case form.
 * Operations that change one image (create, markSaving, commit, kill, setProperties, delete) are serialised per id:
 * within this process by a keyed mutex, and across processes (the agent, `images delete`, `cleanup`,
 * a `snapshot` command) by a kernel lock on `<path>/.locks/<id>.lock` held for the whole operation.
 */
export class ImageStore implements ImageStoreBackend {
  readonly backend = 'local';
  readonly maxPropertyChars = Number.POSITIVE_INFINITY;
  readonly paths: StorePaths;
  readonly osHashAlgo: OsHashAlgo;
  private readonly agentCpus: string | undefined;
  readonly reservedSpaceMb: number;
  private readonly statfs: StatfsFn;
  private readonly now: () => Date;
  private readonly mutex = new KeyedMutex();
  private readonly hook: StoreHook | undefined;
  private readonly lockAcrossProcesses: boolean;

  constructor(opts: ImageStoreOptions) {
    if (!OS_HASH_ALGOS.includes(opts.osHashAlgo)) {
      throw new TypeError(`os_hash_algo ${JSON.stringify(opts.osHashAlgo)}: expected one of ${OS_HASH_ALGOS.join(', ')}`);
    }
    if (!Number.isSafeInteger(opts.reservedSpaceMb) || opts.reservedSpaceMb < 0) {
      throw new TypeError(`reserved_space_mb ${opts.reservedSpaceMb}: expected an integer >= 0`);
    }
    this.paths = new StorePaths(opts.path);
    this.osHashAlgo = opts.osHashAlgo;
    this.agentCpus = opts.agentCpus;
    this.reservedSpaceMb = opts.reservedSpaceMb;
    this.statfs = opts.statfs ?? defaultStatfs;
    this.now = opts.now ?? (() => new Date());
    this.hook = opts.hook;
    this.lockAcrossProcesses = opts.lockAcrossProcesses ?? true;
  }

  /**
   * Runs `task` as the only change of image `id` under way: first in this process (keyed mutex),
   * then across processes (the image's lock, waited for). A store folder that does not exist yet
   * holds no image to change: `task` then runs unlocked (it finds nothing) and creates nothing —
   * except for `create`, which makes the folders first.
   */
  private exclusive<T>(id: string, what: string, task: () => Promise<T>, opts: { create?: boolean } = {}): Promise<T> {
    return this.mutex.run(id, async () => {
      if (opts.create) await this.makeDirs();
      else if (!(await pathExists(this.paths.root))) return task();
      if (!this.lockAcrossProcesses) return task();
      const lock = new PidLock(this.paths.lock(id), `image store: ${what} ${id}`);
      let waiting: Promise<void> | undefined;
      await lock.acquire({ wait: { timeoutMs: STORE_LOCK_WAIT_MS, onWait: () => void (waiting = Promise.resolve(this.hook?.('lock-wait', id))) } });
      try {
        await waiting;
        return await task();
      } finally {
        await lock.release();
      }
    });
  }

  /** Throws InvalidImageId unless `id` is a UUID. */
  static validateId(id: unknown): asserts id is string {
    validateImageId(id);
  }

  /** The local store keeps no credentials: the same store for every request. */
  forRequest(): this {
    return this;
  }

  get partialDir(): string {
    return this.paths.partialDir;
  }

  /** The store's directory (absolute). */
  get path(): string {
    return this.paths.root;
  }

  /** Where the exporter writes the raw data of image `id` before commit. */
  partialPath(id: string): string {
    return this.paths.partial(canonicalId(id));
  }

  /** Path of the committed raw data of image `id`. */
  dataPath(id: string): string {
    return this.paths.data(canonicalId(id));
  }

  /** Path of the metadata file of image `id`. */
  metadataPath(id: string): string {
    return this.paths.meta(canonicalId(id));
  }

  /** Records a new `queued` image. ImageExists if its metadata or data already exist. */
  async create(img: NewImage): Promise<ImageMeta> {
    const id = canonicalId(img.id);
    if (!isUuid(img.instanceUuid)) throw new InvalidInstanceId(String(img.instanceUuid));
    if (img.imageType !== 'snapshot' && img.imageType !== 'backup') {
      throw new TypeError(`image type ${JSON.stringify(img.imageType)}: expected snapshot or backup`);
    }
    if (typeof img.name !== 'string') throw new TypeError('image name must be a string');
    return this.exclusive(id, 'create', async () => {
      if ((await pathExists(this.paths.meta(id))) || (await pathExists(this.paths.data(id)))) throw new ImageExists(id);
      await this.makeDirs();
      // A partial without metadata is debris of an attempt that crashed before recording the image.
      await unlinkIfExists(this.paths.partial(id));
      const meta = newImageMeta({ ...img, id }, this.osHashAlgo, this.now());
      try {
        await writeImageMeta(this.paths.meta(id), meta, { exclusive: true });
      } catch (err) {
        if (isErrno(err, 'EEXIST')) throw new ImageExists(id);
        throw err;
      }
      return meta;
    }, { create: true });
  }

  /** Throws InsufficientSpace unless `bytesNeeded` fit on the store's filesystem above the reserve. */
  async ensureSpace(id: string, bytesNeeded: number): Promise<void> {
    const cid = canonicalId(id);
    if (!Number.isFinite(bytesNeeded) || bytesNeeded < 0) {
      throw new TypeError(`bytesNeeded ${bytesNeeded}: expected a byte count >= 0`);
    }
    await checkFreeSpace({
      statfs: this.statfs,
      dir: this.paths.root,
      reservedSpaceMb: this.reservedSpaceMb,
      bytesNeeded,
      what: `image ${cid}`,
    });
  }

  /** Bytes free for unprivileged users on the store's filesystem (the reserve not taken off). */
  freeBytes(): Promise<number> {
    return freeBytes(this.statfs, this.paths.root);
  }

  /** queued → saving (idempotent for saving). */
  async markSaving(id: string): Promise<ImageMeta> {
    const cid = canonicalId(id);
    return this.exclusive(cid, 'mark saving', async () => {
      const meta = await this.mustRead(cid);
      if (meta.status === 'saving') return meta;
      requireStatus(meta, ['queued'], 'mark as saving');
      return this.update(meta, { status: 'saving' });
    });
  }

  /**
   * Receives the raw data of a `saving` image (`size` bytes) into its partial file, hashing it as it
   * is written: the export writes into the IncomingImage; commit then takes its digests.
   */
  async receive(id: string, size: number, log: NbdLog, opts: ReceiveOptions = {}): Promise<IncomingImage> {
    const cid = canonicalId(id);
    const meta = await this.mustRead(cid);
    requireStatus(meta, ['saving'], 'receive data for');
    if (!Number.isSafeInteger(size) || size < 0) throw new TypeError(`image size ${size}: expected a byte count >= 0`);
    return IncomingImage.open(this.paths.partial(cid), size, storedHashAlgo(meta, this.paths.meta(cid)), log, {
      background: opts.background,
      agentCpus: this.agentCpus,
      onDigest: (d) => void this.hook?.('receive:hashing', cid, d),
    });
  }

  /**
   * Makes the partial data the image: fsync it, hash it (md5 and os_hash in one pass) unless
   * `digests` were computed as it was received, chmod 0640, rename it into place (no copy, so a
   * sparse file stays sparse), fsync both directories, and only then record size, checksums and
   * status `active`. On failure the status is left unchanged.
   */
  async commit(id: string, opts: CommitOptions = {}): Promise<ImageMeta> {
    const cid = canonicalId(id);
    return this.exclusive(cid, 'commit', async () => {
      const meta = await this.mustRead(cid);
      requireStatus(meta, ['queued', 'saving'], 'commit');
      const algo = storedHashAlgo(meta, this.paths.meta(cid));
      const partial = this.paths.partial(cid);
      const fh = await openRegularFile(partial, () => new ImageInvalidState(`image ${cid} has no data to commit: ${partial} does not exist`));
      let digests;
      try {
        await fh.sync();
        await fh.chmod(FILE_MODE);
        const { size } = await fh.stat();
        if (opts.digests !== undefined) {
          digests = await opts.digests;
          if (digests.bytes !== size) throw new ImageStoreCorrupt(`image ${cid}: ${digests.bytes} bytes were received and hashed, but ${partial} holds ${size}`);
        } else {
          digests = await digestFile(fh, algo, { expectedBytes: size, onProgress: opts.onProgress, onStart: (d) => void this.hook?.('commit:hashing', cid, d) });
        }
      } finally {
        await fh.close();
      }
      await rename(partial, this.paths.data(cid));
      await fsyncDir(this.paths.root);
      await fsyncDir(this.paths.partialDir);
      await this.hook?.('commit:renamed', cid);
      return this.update(meta, {
        status: 'active',
        size: digests.bytes,
        virtual_size: opts.virtualSize ?? meta.virtual_size ?? digests.bytes,
        checksum: digests.md5,
        os_hash_value: digests.osHash,
      });
    });
  }

  /**
   * Marks an unfinished image `killed`: removes its partial data (and data renamed into place by a
   * commit that did not finish), keeps the metadata. Idempotent for killed images; refuses active
   * or deleted ones (ImageInvalidState). `reason` is kept as properties.kill_reason.
   */
  async kill(id: string, reason?: string): Promise<void> {
    const cid = canonicalId(id);
    await this.exclusive(cid, 'kill', async () => {
      const meta = await this.mustRead(cid);
      requireStatus(meta, ['queued', 'saving', 'killed'], 'kill');
      const removedPartial = await unlinkIfExists(this.paths.partial(cid));
      const removedData = await unlinkIfExists(this.paths.data(cid));
      if (removedPartial) await fsyncDir(this.paths.partialDir);
      if (removedData) await fsyncDir(this.paths.root);
      if (meta.status === 'killed') return;
      const properties = reason === undefined ? meta.properties : { ...meta.properties, kill_reason: reason };
      await this.update(meta, { status: 'killed', properties });
    });
  }

  /**
   * Adds (or replaces) properties of an image, durably (the metadata is rewritten atomically and
   * fsynced before this resolves); nothing else changes but updated_at. Refuses a deleted image
   * (ImageInvalidState) and the properties that say what the image is (image_type, instance_uuid,
   * user_id, base_image_ref, image_location, backup_type: TypeError). ImageNotFound if none.
   */
  async setProperties(id: string, properties: Record<string, unknown>): Promise<ImageMeta> {
    const cid = canonicalId(id);
    const fixed = Object.keys(properties).filter((k) => FIXED_PROPERTIES.has(k));
    if (fixed.length > 0) throw new TypeError(`image properties ${fixed.join(', ')} cannot be changed`);
    return this.exclusive(cid, 'set properties of', async () => {
      const meta = await this.mustRead(cid);
      requireStatus(meta, ['queued', 'saving', 'active', 'killed'], 'set properties of');
      return this.update(meta, { properties: { ...meta.properties, ...properties } });
    });
  }

  /**
   * Leftovers on disk, for start-up recovery: the names in `.partial/`, and the temp files of metadata
   * writes (`.<id>.json.tmp-<pid>-<hex>`) in the store's folder, with the pid that wrote each.
   */
  async leftovers(): Promise<StoreLeftovers> {
    const names = async (dir: string) => readdir(dir).catch((err: unknown) => (isErrno(err, 'ENOENT') ? [] : Promise.reject(err)));
    const temps: { file: string; pid: number }[] = [];
    for (const name of await names(this.paths.root)) {
      const m = /^\.[^/]+\.tmp-(\d+)-[0-9a-f]+$/.exec(name);
      if (m) temps.push({ file: path.join(this.paths.root, name), pid: Number(m[1]) });
    }
    return { partials: await names(this.paths.partialDir), temps, socketDirs: await incomingSocketDirs() };
  }

  /** The images with metadata in the store (those `filter` takes), oldest first (created_at, then id). */
  async list(filter?: ImageFilter): Promise<ImageMeta[]> {
    const all = await this.listAll();
    return filter === undefined ? all : all.filter((m) => matches(m, filter));
  }

  /** Images left queued or saving: all of this store's are the agent's own. */
  async unfinishedOwnImages(): Promise<ImageMeta[]> {
    return (await this.listAll()).filter((m) => m.status === 'queued' || m.status === 'saving');
  }

  private async listAll(): Promise<ImageMeta[]> {
    let names: string[];
    try {
      names = await readdir(this.paths.root);
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return [];
      throw err;
    }
    const images: ImageMeta[] = [];
    for (const name of names) {
      if (!name.endsWith('.json')) continue;
      const id = name.slice(0, -'.json'.length);
      if (!isUuid(id) || id !== id.toLowerCase()) continue;
      const meta = await readImageMeta(this.paths.meta(id), id);
      if (meta) images.push(meta); // null: deleted since readdir
    }
    return images.sort((a, b) => cmp(a.created_at, b.created_at) || cmp(a.id, b.id));
  }

  /** The metadata of image `id`; ImageNotFound if it has none. */
  async show(id: string): Promise<ImageMeta> {
    return this.mustRead(canonicalId(id));
  }

  /** Recomputes md5 and os_hash of an active image's data and compares them (and the size) with its metadata. */
  async verify(id: string, opts: { onProgress?: ProgressCallback } = {}): Promise<VerifyResult> {
    const cid = canonicalId(id);
    const meta = await this.mustRead(cid);
    requireStatus(meta, ['active'], 'verify');
    const algo = storedHashAlgo(meta, this.paths.meta(cid));
    const dataFile = this.paths.data(cid);
    const fh = await openRegularFile(
      dataFile,
      () => new ImageStoreCorrupt(`image ${cid} is active but its data file ${dataFile} is missing`),
    );
    let digests;
    try {
      digests = await digestFile(fh, algo, { expectedBytes: meta.size ?? undefined, onProgress: opts.onProgress });
    } finally {
      await fh.close();
    }
    const expectedChecksum = meta.checksum ?? '';
    const expectedOsHash = meta.os_hash_value ?? '';
    const sizeOk = digests.bytes === meta.size;
    return {
      ok: sizeOk && digests.md5 === expectedChecksum && digests.osHash === expectedOsHash,
      checksum: digests.md5,
      os_hash_value: digests.osHash,
      expected_checksum: expectedChecksum,
      expected_os_hash_value: expectedOsHash,
      size_ok: sizeOk,
    };
  }

  /**
   * Removes an image: status `deleted` first (so a crash midway leaves no `active` image without
   * data), then data, partial and metadata; on a full filesystem, where that status cannot be
   * written, the metadata goes first. Works on any status, and on unparseable metadata.
   * ImageNotFound when there is nothing of the image.
   */
  async delete(id: string): Promise<void> {
    const cid = canonicalId(id);
    await this.exclusive(cid, 'delete', async () => {
      const metaFile = this.paths.meta(cid);
      let meta: ImageMeta | null = null;
      let corrupt = false;
      try {
        meta = await readImageMeta(metaFile, cid);
      } catch (err) {
        if (!(err instanceof ImageStoreCorrupt)) throw err;
        corrupt = true;
      }
      if (!meta && !corrupt && !(await pathExists(this.paths.data(cid))) && !(await pathExists(this.paths.partial(cid)))) {
        throw new ImageNotFound(cid);
      }
      if (meta && meta.status !== 'deleted') {
        try {
          await this.update(meta, { status: 'deleted' });
        } catch (err) {
          if (!isNoSpace(err)) throw err;
          // A full filesystem is exactly when images are deleted to make room, and the status write
          // needs a new block. Remove the metadata first instead: a crash midway then leaves data
          // without metadata (no image: not listed, removed by the next delete), never an active
          // image without its data.
          await unlinkIfExists(metaFile);
          await fsyncDir(this.paths.root);
        }
      }
      const removedPartial = await unlinkIfExists(this.paths.partial(cid));
      await unlinkIfExists(this.paths.data(cid));
      await unlinkIfExists(metaFile);
      if (removedPartial) await fsyncDir(this.paths.partialDir);
      await fsyncDir(this.paths.root);
    });
  }

  private async mustRead(id: string): Promise<ImageMeta> {
    const meta = await readImageMeta(this.paths.meta(id), id);
    if (!meta) throw new ImageNotFound(id);
    return meta;
  }

  private async update(meta: ImageMeta, changes: Partial<ImageMeta>): Promise<ImageMeta> {
    const next: ImageMeta = { ...meta, ...changes, updated_at: isoSeconds(this.now()) };
    await writeImageMeta(this.paths.meta(meta.id), next);
    return next;
  }

  private async makeDirs(): Promise<void> {
    const firstCreated = await mkdir(this.paths.root, { recursive: true, mode: DIR_MODE });
    const partialCreated = await mkdir(this.paths.partialDir, { recursive: true, mode: DIR_MODE });
    if (partialCreated) await fsyncDir(this.paths.root);
    if (firstCreated) await fsyncDir(path.dirname(firstCreated));
  }
}

/** The filesystem (or the user's quota on it) is full. */
function isNoSpace(err: unknown): boolean {
  return isErrno(err, 'ENOSPC') || isErrno(err, 'EDQUOT');
}

/** Validates `id` (InvalidImageId) and returns its canonical lower-case form. */
function canonicalId(id: unknown): string {
  validateImageId(id);
  return id.toLowerCase();
}

function requireStatus(meta: ImageMeta, allowed: readonly ImageStatus[], action: string): void {
  if (!allowed.includes(meta.status)) {
    throw new ImageInvalidState(
      `cannot ${action} image ${meta.id}: its status is ${meta.status} (expected ${allowed.join(' or ')})`,
    );
  }
}

function storedHashAlgo(meta: ImageMeta, file: string): OsHashAlgo {
  const algo = meta.os_hash_algo as OsHashAlgo;
  if (!OS_HASH_ALGOS.includes(algo)) {
    throw new ImageStoreCorrupt(`image metadata file ${file}: unsupported os_hash_algo ${JSON.stringify(meta.os_hash_algo)}`);
  }
  return algo;
}

/** Opens a regular file for reading without following a symlink; `missing()` is thrown on ENOENT. */
async function openRegularFile(file: string, missing: () => Error): Promise<FileHandle> {
  let fh: FileHandle;
  try {
    fh = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW);
  } catch (err) {
    if (isErrno(err, 'ENOENT')) throw missing();
    if (isErrno(err, 'ELOOP')) throw new ImageStoreCorrupt(`${file} is a symbolic link; refusing to follow it`);
    throw err;
  }
  const st = await fh.stat();
  if (!st.isFile()) {
    await fh.close();
    throw new ImageStoreCorrupt(`${file} is not a regular file`);
  }
  return fh;
}

function matches(m: ImageMeta, f: ImageFilter): boolean {
  return (
    (f.instanceUuid === undefined || String(m.properties.instance_uuid).toLowerCase() === f.instanceUuid.toLowerCase()) &&
    (f.imageType === undefined || m.properties.image_type === f.imageType) &&
    (f.backupType === undefined || m.properties.backup_type === f.backupType)
  );
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The local store behind `store`, for what reads its files (the demo, tests); throws for another backend. */
export function localStore(store: ImageStoreBackend): ImageStore {
  if (!(store instanceof ImageStore)) throw new TypeError(`[image_store] backend = ${store.backend}: this needs the local store's files`);
  return store;
}
