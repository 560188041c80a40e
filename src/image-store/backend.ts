import type { Logger } from '../log.js';
import type { Secret } from '../util/secret.js';
import type { FileDigests } from './hash.js';
import type { ImageSink } from './incoming-image.js';
import type { NbdLog } from './nbd-server.js';
import type { ImageMeta, NewImage, OsHashAlgo, ProgressCallback, VerifyResult } from './types.js';

/**
 * Who an image store operation is for: what a remote store (Glance) sends with it. The token is the
 * RPC request's own, held in memory only.
 */
export interface StoreRequestAuth {
  requestId: string;
  /** The caller's keystone token (`_context_auth_token`); none on a replay or from the command line. */
  authToken?: Secret;
  projectId?: string;
  userId?: string;
  roles?: readonly string[];
  /** The operation's logger (request_id and instance_uuid on every line). */
  log?: Logger;
}

/** Which images list() returns; every field given must match. */
export interface ImageFilter {
  instanceUuid?: string;
  imageType?: 'snapshot' | 'backup';
  backupType?: string;
}

export interface CommitOptions {
  virtualSize?: number;
  onProgress?: ProgressCallback;
  digests?: Promise<FileDigests>;
}

export interface ReceiveOptions {
  /**
   * The export can be run again from the start (nothing waits for it, and its source is still
   * there): a store that can take the data as it comes may stream it instead of staging it.
   */
  streamable?: boolean;
  /**
   * No guest waits for the export: a store that stages it may take the data at its hashes' pace
   * (hashed as it comes, nothing read back) rather than as fast as its disk takes it.
   */
  background?: boolean;
  /**
   * Which run of the export this is (1-based): a streamed upload cut with the image back in queued
   * fails with StreamedUploadCut while `[glance] retries` allows another run, else for good.
   */
  attempt?: number;
}

export interface StoreLeftovers {
  partials: string[];
  temps: { file: string; pid: number }[];
  socketDirs: { dir: string; pid: number }[];
}

/**
 * What every layer above uses of an image store (`[image_store] backend`, chosen in
 * from-config.ts): the local folder (ImageStore) or Glance (GlanceImageStore). The data of an
 * image being made is received into a local partial file (`partialPath`), or, where the store
 * streams an export that can be run again (`receive` with `streamable`), straight into the store.
 */
export interface ImageStoreBackend {
  readonly backend: 'local' | 'glance';
  readonly osHashAlgo: OsHashAlgo;
  /** The longest image property value the store keeps (Glance: 255 characters). */
  readonly maxPropertyChars: number;
  /** The folder of partial data (`<path>/.partial`). */
  readonly partialDir: string;
  /** The same store, acting for one request (its token and ids travel with each remote call). */
  forRequest(auth: StoreRequestAuth): ImageStoreBackend;
  partialPath(id: string): string;
  create(img: NewImage): Promise<ImageMeta>;
  /**
   * Refuses (before anything is touched) an export the host has no room for. `streamable`: the
   * export will be received with `streamable` (a store that streams it needs no host disk for it).
   */
  ensureSpace(id: string, bytesNeeded: number, opts?: { streamable?: boolean }): Promise<void>;
  freeBytes(): Promise<number>;
  markSaving(id: string): Promise<ImageMeta>;
  receive(id: string, size: number, log: NbdLog, opts?: ReceiveOptions): Promise<ImageSink>;
  commit(id: string, opts?: CommitOptions): Promise<ImageMeta>;
  kill(id: string, reason?: string): Promise<void>;
  setProperties(id: string, properties: Record<string, unknown>): Promise<ImageMeta>;
  leftovers(): Promise<StoreLeftovers>;
  list(filter?: ImageFilter): Promise<ImageMeta[]>;
  /**
   * Images left queued or saving that start-up recovery may kill when no operation explains them:
   * the local store's own; none of Glance's (nova-api creates queued images there for other hosts).
   */
  unfinishedOwnImages(): Promise<ImageMeta[]>;
  show(id: string): Promise<ImageMeta>;
  verify(id: string, opts?: { onProgress?: ProgressCallback }): Promise<VerifyResult>;
  delete(id: string): Promise<void>;
}
