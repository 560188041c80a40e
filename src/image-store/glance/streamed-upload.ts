import type { Logger } from '../../log.js';
import type { StoreRequestAuth } from '../backend.js';
import { ParallelDigest, PassingDigest, type FileDigests } from '../hash.js';
import { HoldBack, serveIncoming, type ImageSink } from '../incoming-image.js';
import type { NbdExport, NbdLog } from '../nbd-server.js';
import type { OsHashAlgo } from '../types.js';
import type { GlanceClient } from './client.js';
import { Counter, putBody, type Sent, type Unreached } from './upload.js';

/**
 * Data Glance has not taken yet, at most (each side of the body's pipe): beyond it a write waits,
 * so the NBD server stops reading and qemu-img waits for its replies. Memory stays bounded.
 */
const BODY_BUFFER_BYTES = 1024 * 1024;
/** The body takes data in pieces of at most this (no copy): a larger write waits as any other. */
const SEND_PIECE_BYTES = 256 * 1024;
/** Ranges qemu-img skips (zeros on a zero target) are sent as this, over and over (never written to). */
const ZEROS = Buffer.alloc(SEND_PIECE_BYTES);

/** How an upload that did not take every byte ended (Glance's answer, a cut, a server not reached). */
export type UploadEnd = Exclude<Sent, { kind: 'done' }> | Unreached;

export interface StreamedUploadOptions {
  client: GlanceClient;
  /** The API server the PUT goes to (one that answered just before). */
  server: string;
  imageId: string;
  size: number;
  osHashAlgo: OsHashAlgo;
  /** The CPU list the hash threads are pinned to (`[DEFAULT] agent_cpus`): nothing waits for a streamed export. */
  cpus?: string;
  auth: StoreRequestAuth | undefined;
  nbdLog: NbdLog;
  log: Logger;
  /** The error an upload that ended early means (the store's rules: retry, 409/410, …). */
  failed: (end: UploadEnd) => Promise<Error>;
  /** Glance answered the PUT once it had every byte: the image is active there. */
  uploaded: (bytes: number) => void;
}

/**
 * An export streamed straight into one PUT /v2/images/{id}/file: qemu-img writes into an NBD export
 * (as when staging), each write goes into the request body as it comes, in offset order, the ranges
 * it skipped sent as zeros, and everything is hashed (md5 and the os_hash) as it passes. Nothing is
 * written to disk. The PUT starts at once; finish() resolves when Glance has answered it.
 */
export class StreamedUpload implements ImageSink {
  readonly streamed = true;
  readonly holdBack = new HoldBack();
  readonly file: string;
  private readonly body: Counter;
  private readonly abortController = new AbortController();
  private readonly hasher: PassingDigest;
  /** Settles when the PUT has: undefined when Glance took every byte, else what ended it. */
  private readonly upload: Promise<Error | undefined>;
  private readonly hashes: Promise<FileDigests>;
  private settleHashes!: { resolve: (d: Promise<FileDigests>) => void; reject: (e: unknown) => void };
  private serving: { nbd: NbdExport; stop: () => Promise<void> } | undefined;
  private position = 0;
  private writing: Promise<void> = Promise.resolve();
  /** The upload ended early on its own (not by abort()): what it ended with explains the export's failure. */
  private failedOnItsOwn = false;
  private abortReason: unknown;

  private constructor(private readonly o: StreamedUploadOptions) {
    this.file = `${o.server}/v2/images/${o.imageId}/file`;
    this.hasher = new PassingDigest(ParallelDigest.forSize(['md5', o.osHashAlgo], o.size, { cpus: o.cpus }));
    this.hashes = new Promise<FileDigests>((resolve, reject) => (this.settleHashes = { resolve, reject }));
    this.hashes.catch(() => undefined);
    this.body = new Counter(o.size, undefined, BODY_BUFFER_BYTES);
    // undici destroys the body with the request's error; that error is the request's to report.
    this.body.on('error', () => undefined);
    this.upload = this.run();
  }

  static async open(o: StreamedUploadOptions): Promise<StreamedUpload> {
    const up = new StreamedUpload(o);
    try {
      up.serving = await serveIncoming({ size: o.size, put: (offset, data) => up.put(offset, data) }, o.nbdLog);
      return up;
    } catch (err) {
      await up.abort(err);
      throw err;
    }
  }

  get nbdUri(): string {
    if (this.serving === undefined) throw new Error('streamed upload not served');
    return this.serving.nbd.uri;
  }

  /** Pieces in increasing offset order (a range skipped is zeros); resolves once the body has taken them. */
  async put(offset: number, data: Buffer | readonly Buffer[]): Promise<void> {
    await this.holdBack.pass();
    const p = this.writing.then(() => this.write(offset, Buffer.isBuffer(data) ? [data] : data));
    this.writing = p.catch(() => undefined);
    return p;
  }

  async finish(): Promise<void> {
    try {
      if (this.serving?.nbd.connected) await this.serving.nbd.done;
      await this.serving?.stop();
      await this.put(this.size, []);
      if (!this.body.destroyed) this.body.end();
      const err = await this.upload;
      if (err !== undefined) throw err;
      this.settleHashes.resolve(this.hasher.end());
    } catch (err) {
      if (this.failedOnItsOwn) throw await this.upload;
      throw err;
    }
  }

  digests(): Promise<FileDigests> {
    return this.hashes;
  }

  async abort(reason: unknown): Promise<unknown> {
    const own = this.failedOnItsOwn;
    if (!own) {
      this.abortReason ??= reason instanceof Error ? reason : new Error(String(reason));
      this.abortController.abort(this.abortReason);
      this.body.destroy();
    }
    await this.serving?.stop();
    await this.writing;
    const ended = await this.upload;
    this.settleHashes.reject(this.abortReason ?? ended);
    await this.hasher.close();
    return own ? ended : reason;
  }

  private get size(): number {
    return this.o.size;
  }

  private async write(offset: number, pieces: readonly Buffer[]): Promise<void> {
    const length = pieces.reduce((n, b) => n + b.length, 0);
    if (!Number.isSafeInteger(offset) || offset < this.position) {
      throw new RangeError(`image data out of order: ${length} bytes at ${offset}, before ${this.position} already received`);
    }
    if (offset + length > this.size) throw new RangeError(`image data beyond its size: ${length} bytes at ${offset}, size ${this.size}`);
    if (offset > this.position) {
      this.hasher.zeros(offset - this.position);
      for (let left = offset - this.position; left > 0; left -= SEND_PIECE_BYTES) await this.send(ZEROS.subarray(0, Math.min(left, SEND_PIECE_BYTES)));
      this.position = offset;
    }
    for (const piece of pieces) {
      await this.hasher.update(piece);
      for (let at = 0; at < piece.length; at += SEND_PIECE_BYTES) await this.send(piece.subarray(at, at + SEND_PIECE_BYTES));
      this.position += piece.length;
    }
  }

  /** Into the body; waits while it is full (Glance has not taken what is there). */
  private async send(chunk: Buffer): Promise<void> {
    if (this.body.destroyed) throw await this.ended();
    if (this.body.write(chunk)) return;
    await new Promise<void>((resolve) => {
      const done = () => {
        this.body.off('drain', done);
        this.body.off('close', done);
        resolve();
      };
      this.body.on('drain', done);
      this.body.on('close', done);
    });
    if (this.body.destroyed) throw await this.ended();
  }

  private async ended(): Promise<Error> {
    return (await this.upload) ?? new Error('the upload ended before all of the data was sent');
  }

  private async run(): Promise<Error | undefined> {
    const body = this.body;
    const sent = await putBody(
      { client: this.o.client, server: this.o.server, imageId: this.o.imageId, size: this.size, auth: this.o.auth, what: `upload image ${this.o.imageId} to Glance`, abort: this.abortController },
      { stream: body, sent: () => body.bytes, waitsForGlance: () => body.writableLength > 0 || body.readableLength > 0 || body.writableEnded },
    );
    if (sent.kind === 'done') {
      this.o.uploaded(sent.bytes);
      return undefined;
    }
    if (this.abortReason !== undefined) return this.abortReason as Error;
    // Before the body is destroyed: a write woken by that must find what ended it.
    this.failedOnItsOwn = true;
    const error = this.o.failed(sent);
    body.destroy();
    return error;
  }
}
