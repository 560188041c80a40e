import { createReadStream } from 'node:fs';
import { Transform, type Readable, type TransformCallback } from 'node:stream';
import type { Logger } from '../../log.js';
import { GlanceUnavailable } from '../errors.js';
import type { StoreRequestAuth } from '../backend.js';
import { describeAnswer, glanceError, NoAnswer, noAnswer, type GlanceClient } from './client.js';

/** Read size of the staged file: large enough that hashing and writing stay cheap per chunk. */
const CHUNK = 1024 * 1024;

export interface UploadResult {
  /** Bytes sent. */
  bytes: number;
  /** Attempts made (1 when the first one went through). */
  attempts: number;
}

export interface UploadOptions {
  client: GlanceClient;
  imageId: string;
  file: string;
  size: number;
  auth: StoreRequestAuth | undefined;
  log: Logger;
  /** The image's status in Glance now (to tell whether a cut upload may be tried again). */
  status: () => Promise<string>;
  /** Progress of the bytes sent (0..1). */
  onProgress?: (fraction: number) => void;
}

/**
 * PUT /v2/images/{id}/file of a staged file: streamed from disk with backpressure (undici sends a
 * chunk only when the socket has taken the last), chunked. It is not hashed again on its way out:
 * the receiver hashed it as the export made it, and Glance's own hash of what it took must equal
 * that (the commit checks), which no change of the data between the two can pass. An answer other than
 * 204 ends it with GlanceError naming Glance's answer (a 4xx is never tried again, nor is a 5xx
 * unless the image went back to `queued`). A connection cut, an answer that does not come, or a
 * server that takes no data for `[glance] timeout` is tried again (up to `[glance] retries`) only
 * when Glance has put the image back to `queued`, as it does after a failed upload.
 */
export async function uploadImageFile(o: UploadOptions): Promise<UploadResult> {
  const { client } = o;
  const what = `upload image ${o.imageId} to Glance`;
  let last: string | undefined;
  for (let attempt = 1; attempt <= client.retries + 1; attempt++) {
    if (attempt > 1) await client.pause(attempt - 1);
    const sent = await putOnce(o, what);
    if (sent.kind === 'done') return { bytes: sent.bytes, attempts: attempt };
    if (sent.kind === 'refused') throw sent.error;
    last = sent.why;
    let status: string;
    try {
      status = await o.status();
    } catch (err) {
      o.log.warn({ image_id: o.imageId, attempt }, `upload failed (${sent.why}); cannot read the image's status: ${(err as Error).message}`);
      if (attempt <= client.retries) continue;
      throw err;
    }
    const notAgain = notBackInQueued(what, sent.why, status);
    if (notAgain !== undefined) throw notAgain;
    o.log.warn({ image_id: o.imageId, attempt, retries: client.retries }, `upload failed (${sent.why}); the image is back in queued`);
  }
  throw new GlanceUnavailable(`cannot ${what}: ${last ?? 'failed'} (${client.retries + 1} attempts)`);
}

/**
 * Glance puts an image back in `queued` after an upload that failed: only then may it be uploaded
 * again. Else the error that ends the upload (`why` it failed), naming the status.
 */
export function notBackInQueued(what: string, why: string, status: string): GlanceUnavailable | undefined {
  return status === 'queued' ? undefined : new GlanceUnavailable(`cannot ${what}: ${why}; the image is ${status} in Glance, not queued: not tried again`);
}

export type Sent = { kind: 'done'; bytes: number } | { kind: 'refused'; error: Error } | { kind: 'again'; why: string };

/** One attempt: the servers in order, the next one only when one could not be reached. */
async function putOnce(o: UploadOptions, what: string): Promise<Sent> {
  let why = 'no Glance API server';
  for (const server of o.client.apiServers) {
    const sent = await putTo(server, o, what);
    if (sent.kind !== 'unreached') return sent;
    why = `${server}: ${sent.why}`;
    o.log.warn({ glance: server, image_id: o.imageId }, `Glance not reached: ${sent.why}`);
  }
  return { kind: 'again', why };
}

async function putTo(server: string, o: UploadOptions, what: string): Promise<Sent | Unreached> {
  const counter = new Counter(o.size, o.onProgress);
  const source = createReadStream(o.file, { highWaterMark: CHUNK });
  source.on('error', (err) => counter.destroy(err));
  const stream = source.pipe(counter);
  try {
    return await putBody({ ...o, server, what, abort: new AbortController() }, { stream, sent: () => counter.bytes, waitsForGlance: () => true });
  } finally {
    source.destroy();
    counter.destroy();
  }
}

/** The body of one PUT as putBody sends it. */
export interface UploadBody {
  readonly stream: Readable;
  /** Bytes Glance has taken so far. */
  sent(): number;
  /**
   * Data is there for Glance to take, or the whole body was sent (then an answer is awaited): a
   * body that waits for its producer (a streamed export) does not count against `[glance] timeout`.
   */
  waitsForGlance(): boolean;
}

export type Unreached = { kind: 'unreached'; why: string };

export interface PutBodyOptions {
  client: GlanceClient;
  server: string;
  imageId: string;
  size: number;
  auth: StoreRequestAuth | undefined;
  what: string;
  /** Aborting it ends the request (the caller gives up). */
  abort: AbortController;
}

/**
 * One PUT /v2/images/{id}/file of `body` to one server: done (every byte of `size` sent and a 2xx),
 * refused (any other answer below 500: never tried again), again (a cut, a 5xx, no answer, a 2xx
 * before every byte: may be tried again once the image is back in queued), or unreached (the
 * server could not be connected to).
 */
export async function putBody(o: PutBodyOptions, body: UploadBody): Promise<Sent | Unreached> {
  const timeoutMs = o.client.timeoutMs;
  const { stream } = body;
  // A server that stops reading stalls the socket, and undici's timeouts do not cover a request's
  // body: no progress (data taken, or an answer once all was sent) for timeoutMs aborts the request.
  let seen = -1;
  let lastProgress = performance.now();
  const watchdog = setInterval(() => {
    const now = performance.now();
    if (body.sent() !== seen || !body.waitsForGlance()) {
      seen = body.sent();
      lastProgress = now;
      return;
    }
    if (now - lastProgress < timeoutMs) return;
    const why = stream.readableEnded
      ? `Glance did not answer within ${timeoutMs / 1000} s of the last byte`
      : `Glance took no data for ${timeoutMs / 1000} s after ${body.sent()} of ${o.size} bytes`;
    o.abort.abort(new NoAnswer(why, true));
  }, Math.max(10, timeoutMs / 4));
  watchdog.unref();
  try {
    const answer = await o.client.put(o.server, `/v2/images/${o.imageId}/file`, stream, {
      auth: o.auth,
      what: o.what,
      contentType: 'application/octet-stream',
      signal: o.abort.signal,
    });
    if (answer.status === 204 || answer.status === 201 || answer.status === 200) {
      if (!stream.readableEnded || body.sent() !== o.size) {
        return { kind: 'again', why: `Glance answered ${answer.status} after ${body.sent()} of ${o.size} bytes` };
      }
      return { kind: 'done', bytes: body.sent() };
    }
    if (answer.status >= 500) return { kind: 'again', why: `Glance answered ${describeAnswer(answer.status, answer.body)}` };
    return { kind: 'refused', error: glanceError(o.what, answer.status, answer.body, o.auth?.authToken?.reveal()) };
  } catch (err) {
    const e = noAnswer(err, timeoutMs);
    if (!e.reached) return { kind: 'unreached', why: e.message };
    return { kind: 'again', why: e.message };
  } finally {
    clearInterval(watchdog);
  }
}

/** Passes the data through, counting it. */
export class Counter extends Transform {
  bytes = 0;
  private lastReported = 0;

  constructor(
    private readonly size: number,
    private readonly onProgress?: (fraction: number) => void,
    highWaterMark?: number,
  ) {
    super(highWaterMark === undefined ? {} : { writableHighWaterMark: highWaterMark, readableHighWaterMark: highWaterMark });
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.onProgress && this.size > 0 && this.bytes - this.lastReported >= this.size / 100) {
      this.lastReported = this.bytes;
      this.onProgress(Math.min(1, this.bytes / this.size));
    }
    cb(null, chunk);
  }
}
