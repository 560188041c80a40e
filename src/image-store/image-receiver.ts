import fs, { type FileHandle } from 'node:fs/promises';
import { hashFileRange, ParallelDigest, type FileDigests } from './hash.js';
import type { OsHashAlgo } from './types.js';

/** Data received ahead of the hashes before the next piece waits (in the page cache, not in memory). */
const MAX_AHEAD_BYTES = 1024 * 1024 * 1024;
/**
 * Data written between two fdatasyncs. GiBs of dirty pages would stall every fsync on the same
 * filesystem (ext4's ordered mode writes them out with each journal commit), a running guest's own
 * included, for hundreds of ms; flushed as it comes, they never pile up (what `qemu-img convert -t
 * none` gave when it wrote the file itself), and stay in the page cache, clean, for the hashes.
 */
export const SYNC_EVERY_BYTES = 32 * 1024 * 1024;

/**
 * Throws unless a piece of `length` bytes at `offset` may be taken now: nothing failed, not closed,
 * at or after everything received so far, within the image's size.
 */
export function checkPiece(
  rx: { readonly failure: unknown; readonly closed: boolean; readonly position: number; readonly size: number },
  offset: number,
  length: number,
): void {
  if (rx.failure) throw rx.failure;
  if (rx.closed) throw new Error('image data received after its end');
  if (!Number.isSafeInteger(offset) || offset < rx.position) {
    throw new RangeError(`image data out of order: ${length} bytes at ${offset}, before ${rx.position} already received`);
  }
  if (offset + length > rx.size) throw new RangeError(`image data beyond its size: ${length} bytes at ${offset}, size ${rx.size}`);
}

/** A received byte range, in the file. */
interface Extent {
  start: number;
  end: number;
}

/**
 * An image's raw data as an export produces it, in increasing offset order (a range skipped is
 * zeros): each piece is written into the partial file at once (a skipped range stays a hole), and
 * hashed behind the writing on worker threads: the data read back while the page cache still holds
 * it, the holes hashed as zeros without reading anything. The writer does not wait for the hashes
 * (a `cold` guest is down until its data is written, not until it is hashed) unless it runs more
 * than MAX_AHEAD_BYTES ahead of them.
 */
export class ImageReceiver {
  /** Bytes received so far (everything before it is in the file or a hole). */
  private position = 0;
  private readonly extents: Extent[] = [];
  private closed = false;
  private failure: unknown;
  private wake: (() => void) | undefined;
  private hashedTo = 0;
  private aheadWaiters: (() => void)[] = [];
  private readonly hashing: Promise<FileDigests>;
  private writing: Promise<void> = Promise.resolve();
  private unsynced = 0;

  private constructor(
    private readonly fh: FileHandle,
    readonly file: string,
    readonly size: number,
    osHashAlgo: OsHashAlgo,
    onDigest?: (d: ParallelDigest) => void,
    private readonly aheadBytes = MAX_AHEAD_BYTES,
    cpus?: string,
  ) {
    const digest = ParallelDigest.forSize(['md5', osHashAlgo], size, { cpus });
    onDigest?.(digest);
    this.hashing = this.follow(digest);
    this.hashing.catch(() => undefined);
  }

  /** Creates (or empties) `file`, `size` bytes of holes, mode 0600, and receives into it. */
  static async create(
    file: string,
    size: number,
    osHashAlgo: OsHashAlgo,
    onDigest?: (d: ParallelDigest) => void,
    /** `cpus`: the CPU list its hash threads are pinned to. */
    opts: { aheadBytes?: number; cpus?: string } = {},
  ): Promise<ImageReceiver> {
    const fh = await fs.open(file, 'w+', 0o600);
    try {
      await fh.truncate(size);
    } catch (err) {
      await fh.close();
      throw err;
    }
    return new ImageReceiver(fh, file, size, osHashAlgo, onDigest, opts.aheadBytes, opts.cpus);
  }

  /** Where the next byte is expected. */
  get received(): number {
    return this.position;
  }

  /**
   * Writes `data` at `offset` (≥ every offset before: ranges skipped are zeros). Resolves once it is
   * in the file. Pieces are written one after the other in call order.
   */
  put(offset: number, data: Buffer | readonly Buffer[]): Promise<void> {
    // A piece that cannot be written ends the whole image (the hashes would wait for it forever).
    const p = this.writing.then(() =>
      this.write(offset, data).catch((err: unknown) => {
        this.fail(err);
        throw err;
      }),
    );
    this.writing = p.catch(() => undefined);
    return p;
  }

  /**
   * Everything has arrived (the rest up to `size` is zeros): resolves once it is all in the file
   * (not fsynced). The file stays open until the hashes have read it.
   */
  async close(): Promise<void> {
    await this.writing;
    if (this.failure) throw this.failure;
    this.closed = true;
    this.wake?.();
  }

  /** md5 and the os_hash of all `size` bytes, once close() is done and the hashes have caught up. */
  digests(): Promise<FileDigests> {
    return this.hashing;
  }

  /** Gives up: the hashing stops, the file is closed (the caller removes it). */
  async abort(reason: Error): Promise<void> {
    this.fail(reason);
    await this.writing;
    await this.hashing.catch(() => undefined);
  }

  private async write(offset: number, pieces: Buffer | readonly Buffer[]): Promise<void> {
    const data = Buffer.isBuffer(pieces) ? [pieces] : pieces;
    const length = data.reduce((n, b) => n + b.length, 0);
    checkPiece({ failure: this.failure, closed: this.closed, position: this.position, size: this.size }, offset, length);
    // What was skipped up to here is zeros: the hashes may take it now.
    this.position = offset;
    this.wake?.();
    while (offset - this.hashedTo > this.aheadBytes && !this.failure) await new Promise<void>((r) => this.aheadWaiters.push(r));
    if (this.failure) throw this.failure;
    let done = (await this.fh.writev(data, offset)).bytesWritten;
    // A short write (rare on a regular file): the rest piece by piece.
    for (let skip = done, i = 0; done < length && i < data.length; i++) {
      const b = data[i]!;
      if (skip >= b.length) {
        skip -= b.length;
        continue;
      }
      for (let from = skip; from < b.length; ) {
        const { bytesWritten } = await this.fh.write(b, from, b.length - from, offset + done);
        from += bytesWritten;
        done += bytesWritten;
      }
      skip = 0;
    }
    const last = this.extents.at(-1);
    if (last !== undefined && last.end === offset) last.end += length;
    else if (length > 0) this.extents.push({ start: offset, end: offset + length });
    this.position = offset + length;
    this.wake?.();
    this.unsynced += length;
    if (this.unsynced >= SYNC_EVERY_BYTES) {
      this.unsynced = 0;
      await this.fh.datasync();
    }
  }

  private fail(err: unknown): void {
    this.failure ??= err;
    this.wake?.();
    for (const w of this.aheadWaiters.splice(0)) w();
  }

  /** The hashes have taken everything before `at`: a writer waiting for them may go on. */
  private hashedUpTo(at: number): void {
    this.hashedTo = at;
    for (const w of this.aheadWaiters.splice(0)) w();
  }

  /** The hashes, following the writing: holes as zeros, data read back from the file. */
  private async follow(digest: ParallelDigest): Promise<FileDigests> {
    let at = 0;
    let slot = 0;
    try {
      for (;;) {
        if (this.failure) throw this.failure;
        const extent = this.extents[0];
        if (extent !== undefined && at >= extent.end && this.extents.length > 1) {
          this.extents.shift(); // read; the next one is not contiguous with it
          continue;
        }
        if (extent !== undefined && extent.start > at) {
          digest.pushZeros(extent.start - at);
          at = extent.start;
        } else if (extent !== undefined && at < extent.end) {
          ({ position: at, slot } = await hashFileRange(digest, this.fh, { start: at, end: extent.end, slot }, (position) => {
            this.hashedUpTo(position);
            if (this.failure) throw this.failure;
          }));
        } else if (at < this.position) {
          digest.pushZeros(this.position - at); // skipped: a hole
          at = this.position;
        } else if (this.closed) {
          digest.pushZeros(this.size - at);
          at = this.size;
          break;
        } else {
          await Promise.race([new Promise<void>((r) => (this.wake = r)), digest.broken]);
          this.wake = undefined;
          continue;
        }
        this.hashedUpTo(at);
      }
      const [md5, osHash] = await digest.end();
      return { md5: md5!, osHash: osHash!, bytes: this.size };
    } catch (err) {
      this.fail(err);
      throw err;
    } finally {
      await digest.close();
      await this.fh.close().catch(() => undefined);
    }
  }
}
