import fs, { type FileHandle } from 'node:fs/promises';
import { constants } from 'node:fs';
import { ParallelDigest, type FileDigests } from './hash.js';
import { checkPiece, SYNC_EVERY_BYTES } from './image-receiver.js';
import type { OsHashAlgo } from './types.js';

/** What O_DIRECT asks of a write's offset and length here (the logical sector). */
const DIRECT_ALIGN = 512;

/**
 * An image's raw data, received in increasing offset order (a range skipped is zeros) from an export
 * no guest waits for: each piece is copied into the hashes' ring, and each ring slot, once full, is
 * both handed to the hash threads and written into the partial file from the same memory, with
 * O_DIRECT. Nothing is read back and the page cache is not used: no page is allocated for the data,
 * no dirty page piles up to stall the host's other fsyncs (a running guest's among them), and the
 * hashes are fed as the data comes. A hole stays a hole and is hashed as zeros.
 *
 * The producer is paced by the slower of the disk and the hashes (a ring of a few slots): right for
 * an export nothing waits for, not for `cold`'s of a guest it keeps down (ImageReceiver: written
 * ahead, hashed behind).
 *
 * A write that O_DIRECT cannot take (unaligned, or a filesystem without it) goes through the page
 * cache instead.
 */
export class PacedReceiver {
  private position = 0;
  private index = 0;
  private slot: Buffer | undefined;
  /** File offset of the current slot's first byte, and how much of it is filled. */
  private slotStart = 0;
  private filled = 0;
  private closed = false;
  private failure: unknown;
  private receiving: Promise<void> = Promise.resolve();
  /**
   * The slots' writes, one after the other: a store that stalls (frozen, or a slow network
   * filesystem) then holds one of libuv's few threads, not all of them (the agent's journal, its
   * other images and its sockets' files need them meanwhile).
   */
  private writing: Promise<void> = Promise.resolve();
  private unsynced = 0;
  /** A direct write was refused as unaligned: the device wants more than DIRECT_ALIGN. */
  private directRefused = false;
  /** Bytes written with O_DIRECT so far (the rest went through the page cache). */
  writtenDirect = 0;
  private readonly endReady: Promise<void>;
  private startEnd!: () => void;
  private readonly hashing: Promise<FileDigests>;

  private constructor(
    private readonly buffered: FileHandle,
    /** The same file opened with O_DIRECT; undefined where the filesystem refuses it. */
    private readonly direct: FileHandle | undefined,
    readonly file: string,
    readonly size: number,
    private readonly digest: ParallelDigest,
  ) {
    this.endReady = new Promise<void>((r) => (this.startEnd = r));
    this.hashing = this.hashes();
    this.hashing.catch(() => undefined);
  }

  /**
   * Creates (or empties) `file`, `size` bytes of holes, mode 0600, and receives into it. `cpus`: the
   * CPU list its hash threads are pinned to (`[DEFAULT] agent_cpus`).
   */
  static async create(file: string, size: number, osHashAlgo: OsHashAlgo, onDigest?: (d: ParallelDigest) => void, cpus?: string): Promise<PacedReceiver> {
    const buffered = await fs.open(file, 'w+', 0o600);
    let direct: FileHandle | undefined;
    try {
      await buffered.truncate(size);
      direct = await fs.open(file, constants.O_WRONLY | constants.O_DIRECT).catch(() => undefined);
      const digest = ParallelDigest.forSize(['md5', osHashAlgo], size, { cpus });
      onDigest?.(digest);
      return new PacedReceiver(buffered, direct, file, size, digest);
    } catch (err) {
      await direct?.close();
      await buffered.close();
      throw err;
    }
  }

  /**
   * Takes `data` at `offset` (≥ every offset before: ranges skipped are zeros). Resolves once it is in
   * the ring (its write and its hashing follow; a failure of either fails every later call). Pieces
   * are taken one after the other in call order.
   */
  put(offset: number, data: Buffer | readonly Buffer[]): Promise<void> {
    const p = this.receiving.then(() =>
      this.take(offset, Buffer.isBuffer(data) ? [data] : data).catch((err: unknown) => {
        this.fail(err);
        // The first failure: a put waiting for a slot when an earlier slot's write failed sees the
        // hashing stopped for it (HashWorkerFailed); the producer must hear the cause (ENOSPC).
        throw this.failure;
      }),
    );
    this.receiving = p.catch(() => undefined);
    return p;
  }

  /** Everything has arrived (the rest up to `size` is zeros): resolves once it is all in the file (not fsynced). */
  async close(): Promise<void> {
    await this.receiving;
    if (this.failure) throw this.failure;
    this.flush();
    this.closed = true;
    await this.settleWrites();
    if (this.failure) throw this.failure;
    this.digest.pushZeros(this.size - this.position);
    this.position = this.size;
    this.startEnd();
  }

  /** md5 and the os_hash of all `size` bytes, once close() is done and the hashes have caught up. */
  digests(): Promise<FileDigests> {
    return this.hashing;
  }

  /** Gives up: the hashing stops, the file is closed (the caller removes it). */
  async abort(reason: Error): Promise<void> {
    this.fail(reason);
    await this.receiving;
    await this.settleWrites();
    await this.hashing.catch(() => undefined);
  }

  private async take(offset: number, data: readonly Buffer[]): Promise<void> {
    const length = data.reduce((n, b) => n + b.length, 0);
    checkPiece({ failure: this.failure, closed: this.closed, position: this.position, size: this.size }, offset, length);
    if (offset > this.position) {
      this.flush();
      this.digest.pushZeros(offset - this.position);
      this.position = offset;
    }
    for (const b of data) {
      for (let at = 0; at < b.length; ) {
        if (this.slot === undefined) {
          this.slot = await this.digest.slot(this.index);
          this.slotStart = this.position;
          if (this.failure) throw this.failure;
        }
        const n = b.copy(this.slot, this.filled, at);
        this.filled += n;
        this.position += n;
        at += n;
        if (this.filled === this.slot.length) this.flush();
      }
    }
  }

  /** Writes the current slot out and hands it to the hashes; it is free again once both are done. */
  private flush(): void {
    if (this.slot === undefined || this.filled === 0) return;
    const data = this.slot.subarray(0, this.filled);
    const offset = this.slotStart;
    const write = this.writing.then(() => this.writeOut(data, offset));
    this.writing = write.catch((err: unknown) => this.fail(err));
    this.digest.push(this.index++, this.filled, write);
    this.slot = undefined;
    this.filled = 0;
  }

  private async writeOut(data: Buffer, offset: number): Promise<void> {
    if (this.failure) throw this.failure;
    if (this.direct !== undefined && !this.directRefused && offset % DIRECT_ALIGN === 0 && data.length % DIRECT_ALIGN === 0) {
      try {
        await writeAll(this.direct, data, offset);
        this.writtenDirect += data.length;
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
        // Through the page cache from now on (and this piece again, whole).
        this.directRefused = true;
      }
    }
    // Through the page cache: fdatasynced as ImageReceiver does, for the same reason.
    await writeAll(this.buffered, data, offset);
    this.unsynced += data.length;
    if (this.unsynced >= SYNC_EVERY_BYTES) {
      this.unsynced = 0;
      await this.buffered.datasync();
    }
  }

  private async settleWrites(): Promise<void> {
    await this.writing;
  }

  private fail(err: unknown): void {
    this.failure ??= err;
    this.startEnd();
  }

  private async hashes(): Promise<FileDigests> {
    try {
      await Promise.race([this.endReady, this.digest.broken]);
      if (this.failure) throw this.failure;
      const [md5, osHash] = await this.digest.end();
      return { md5: md5!, osHash: osHash!, bytes: this.size };
    } catch (err) {
      this.fail(err);
      throw err;
    } finally {
      await this.digest.close();
      await this.settleWrites();
      await this.direct?.close().catch(() => undefined);
      await this.buffered.close().catch(() => undefined);
    }
  }
}

async function writeAll(fh: FileHandle, data: Buffer, offset: number): Promise<void> {
  for (let done = 0; done < data.length; ) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, offset + done);
    done += bytesWritten;
  }
}
