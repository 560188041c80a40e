import type { FileHandle } from 'node:fs/promises';
import { createHash, type Hash } from 'node:crypto';
import { Worker } from 'node:worker_threads';
import { HashWorkerFailed } from '../errors.js';
import type { OsHashAlgo, ProgressCallback } from './types.js';

/** Read size of one chunk; large so that hashing a multi-GiB image is not dominated by syscalls. */
export const HASH_CHUNK_BYTES = 4 * 1024 * 1024;
/** Niceness of the hash threads. */
const HASH_NICE = 10;
/** Chunks in flight: the file is read this far ahead of the slower hash. */
const RING_SLOTS = 4;
/**
 * Up to this many bytes are hashed on the calling thread: for a small image, handing chunks to
 * threads costs more than the hashing (and on a loaded host the low-priority threads wait for a CPU).
 */
export const INLINE_HASH_MAX_BYTES = 1024 * 1024;

export interface FileDigests {
  /** md5 hex (Glance `checksum`). */
  md5: string;
  /** Hex digest with the os_hash_algo (Glance `os_hash_value`). */
  osHash: string;
  /** Bytes read (the apparent size; holes read as zeros). */
  bytes: number;
}

/**
 * One hash per worker thread. md5 and sha512 each run at about one core's speed, so one after the
 * other on the event loop (as before) an export's hashing took their sum and the agent answered
 * nothing meanwhile. The code is evaluated (not a module file) so that the same source runs from
 * dist/ and from the TypeScript sources the tests import.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const { readlinkSync } = require('node:fs');
const { setPriority } = require('node:os');
// Background work: below the agent's own thread and the guests' QEMU (nice is per thread on Linux).
let tid;
try {
  tid = readlinkSync('/proc/thread-self').split('/').pop();
  setPriority(Number(tid), workerData.nice);
} catch {}
// On the CPUs the digest was given (affinity is per thread on Linux): [DEFAULT] agent_cpus for a
// background export, every online CPU for one a guest waits for. Messages queue until this
// returns: no chunk is hashed before the thread is pinned.
if (workerData.cpus !== undefined) {
  const r = tid === undefined ? { status: -1, stderr: 'this thread has no /proc/thread-self' } : require('node:child_process').spawnSync('taskset', ['-p', '-c', workerData.cpus, tid], { timeout: 10000, encoding: 'utf8' });
  if (r.status !== 0) parentPort.postMessage({ pinFailed: (r.error ? r.error.message : '') || String(r.stderr).trim() || 'taskset exit code ' + r.status });
}
const zeros = new Uint8Array(1 << 20);
let hash;
let ring;
parentPort.on('message', (m) => {
  if (m.start) {
    hash = createHash(m.start.algo);
    ring = new Uint8Array(m.start.ring);
  } else if (m.end) {
    parentPort.postMessage({ digest: hash.digest('hex') });
    hash = undefined;
    ring = undefined;
  } else if (m.zeros !== undefined) {
    for (let left = m.zeros; left > 0; left -= zeros.length) hash.update(left >= zeros.length ? zeros : zeros.subarray(0, left));
  } else {
    hash.update(ring.subarray(m.offset, m.offset + m.length));
    parentPort.postMessage({ done: m.slot });
  }
});
`;

/**
 * Idle hash threads, kept for the next digest (starting one costs tens of ms; an agent hashes an
 * image per snapshot), by the CPUs they are pinned to ('' for none). Unreferenced while idle: they
 * never keep the process alive.
 */
const idleWorkers = new Map<string, Worker[]>();
const MAX_IDLE_WORKERS = 4;

function takeWorker(cpus: string | undefined): Worker {
  // No inherited flags (a loader, --input-type=module): the source is plain CommonJS.
  const w = idleWorkers.get(cpus ?? '')?.pop() ?? new Worker(WORKER_SOURCE, { eval: true, execArgv: [], workerData: { nice: HASH_NICE, cpus } });
  w.ref();
  return w;
}

/** Back to the idle pool of the CPUs it was pinned to (`cpus`, as takeWorker had it). */
function giveBack(w: Worker, cpus: string | undefined): void {
  w.removeAllListeners('message');
  w.removeAllListeners('error');
  w.removeAllListeners('exit');
  const idle = idleWorkers.get(cpus ?? '') ?? [];
  idleWorkers.set(cpus ?? '', idle);
  if (idle.length >= MAX_IDLE_WORKERS) {
    void w.terminate();
    return;
  }
  w.unref();
  // An idle thread that ends is simply not reused.
  w.once('exit', () => {
    const at = idle.indexOf(w);
    if (at >= 0) idle.splice(at, 1);
  });
  idle.push(w);
}

type FromWorker = { done: number } | { digest: string } | { pinFailed: string };

const WASM_PAGE_BYTES = 64 * 1024;

/**
 * The ring's memory, page-aligned: a WebAssembly memory (V8 maps it from whole pages), not an
 * ArrayBuffer (malloc's, 16 bytes past a page). A slot can then be written to a file opened with
 * O_DIRECT as it is, and at the device's speed: a buffer aligned to the sector only, not the page,
 * made direct writes about 25 times slower here. Shared (a SharedArrayBuffer) for the
 * hash threads, or not (an inline digest).
 */
function alignedRing(bytes: number, shared: boolean): SharedArrayBuffer | ArrayBuffer {
  const pages = Math.ceil(bytes / WASM_PAGE_BYTES);
  return new WebAssembly.Memory({ initial: pages, maximum: pages, shared }).buffer;
}

/**
 * md5 and `algo` over a sequence of chunks, each hash on its own worker thread. Chunks are read into
 * a shared ring (no copy to the workers); a slot is reused once both hashes have taken its chunk.
 */
export class ParallelDigest {
  readonly chunkBytes: number;
  private readonly ring: SharedArrayBuffer | ArrayBuffer;
  private readonly workers: Worker[];
  /** The hashes of an inline digest (no workers). */
  private readonly inline: Hash[] | undefined;
  /** Per slot: workers still hashing it, and who waits for it to be free. */
  private readonly busy: number[] = new Array<number>(RING_SLOTS).fill(0);
  private readonly waiting: (() => void)[][] = Array.from({ length: RING_SLOTS }, () => []);
  private readonly digests: (string | undefined)[] = [];
  private failure: HashWorkerFailed | undefined;
  private readonly failed: Promise<never>;
  private fail!: (err: HashWorkerFailed) => void;
  private finished: (() => void) | undefined;
  private closed = false;
  /** The CPU list its threads are pinned to (their idle pool's key). */
  private readonly cpus: string | undefined;

  /** A digest of `bytes` bytes (when known): inline up to INLINE_HASH_MAX_BYTES, else on threads. */
  static forSize(algos: readonly string[], bytes: number | undefined, opts: { chunkBytes?: number; cpus?: string } = {}): ParallelDigest {
    const inline = bytes !== undefined && bytes <= INLINE_HASH_MAX_BYTES;
    return new ParallelDigest(algos, { ...opts, inline });
  }

  /**
   * `cpus`: a CPU list (taskset's form, `[DEFAULT] agent_cpus`) the hash threads are
   * pinned to; a thread that cannot be pinned fails the digest.
   */
  constructor(algos: readonly string[], opts: { chunkBytes?: number; inline?: boolean; cpus?: string } = {}) {
    this.cpus = opts.cpus;
    this.chunkBytes = opts.chunkBytes ?? (opts.inline ? INLINE_HASH_MAX_BYTES / RING_SLOTS : HASH_CHUNK_BYTES);
    this.ring = alignedRing(this.chunkBytes * RING_SLOTS, !opts.inline);
    this.failed = new Promise<never>((_, reject) => {
      this.fail = (err) => {
        if (this.failure) return;
        this.failure = err;
        reject(err);
      };
    });
    this.failed.catch(() => undefined);
    this.inline = opts.inline ? algos.map((algo) => createHash(algo)) : undefined;
    this.workers = opts.inline ? [] : algos.map((algo, i) => {
      const w = takeWorker(opts.cpus);
      w.postMessage({ start: { algo, ring: this.ring } });
      w.on('message', (m: FromWorker) => {
        if ('done' in m) this.release(m.done);
        else if ('pinFailed' in m) {
          this.fail(new HashWorkerFailed(`cannot pin the ${algo} hash thread to CPUs ${opts.cpus} ([DEFAULT] agent_cpus): ${m.pinFailed}`));
        } else {
          this.digests[i] = m.digest;
          if (this.digests.filter((d) => d !== undefined).length === this.workers.length) this.finished?.();
        }
      });
      w.on('error', (err) => this.fail(new HashWorkerFailed(`the ${algo} hash worker failed: ${err.message}`, { cause: err })));
      w.on('exit', (code) => {
        if (this.digests[i] === undefined) this.fail(new HashWorkerFailed(`the ${algo} hash worker exited (code ${code}) before its digest`));
      });
      return w;
    });
  }

  /** Rejects with the first failure of a worker (never resolves). */
  get broken(): Promise<never> {
    return this.failed;
  }

  /** The worker threads (a test stops one to see the hashing fail cleanly). */
  get threads(): readonly Worker[] {
    return this.workers;
  }

  /** A free slot's index and its bytes (waits for the workers to have taken what was there). */
  async slot(index: number): Promise<Buffer> {
    const s = index % RING_SLOTS;
    if (this.busy[s]! > 0) await Promise.race([new Promise<void>((r) => this.waiting[s]!.push(r)), this.failed]);
    if (this.failure) throw this.failure;
    return Buffer.from(this.ring, s * this.chunkBytes, this.chunkBytes);
  }

  /**
   * Hands the first `length` bytes of slot `index` to every hash. The slot is free again once they
   * have all taken it and, with `alsoUntil`, once that settles too (the same bytes written to a file).
   */
  push(index: number, length: number, alsoUntil?: Promise<unknown>): void {
    if (this.failure) throw this.failure;
    const s = index % RING_SLOTS;
    this.busy[s] = this.workers.length + (alsoUntil ? 1 : 0);
    for (const h of this.inline ?? []) h.update(new Uint8Array(this.ring, s * this.chunkBytes, length));
    for (const w of this.workers) w.postMessage({ slot: s, offset: s * this.chunkBytes, length });
    void alsoUntil?.finally(() => this.release(s)).catch(() => undefined);
  }

  /** Hands `length` zero bytes to every hash (a hole: nothing read, nothing in the ring). */
  pushZeros(length: number): void {
    if (this.failure) throw this.failure;
    if (length > 0) for (const w of this.workers) w.postMessage({ zeros: length });
    if (length > 0 && this.inline) {
      const zeros = new Uint8Array(Math.min(length, this.chunkBytes));
      for (const h of this.inline) for (let left = length; left > 0; left -= zeros.length) h.update(left >= zeros.length ? zeros : zeros.subarray(0, left));
    }
  }

  /** The hex digests, in the order of the algorithms given; the workers are gone afterwards. */
  async end(): Promise<string[]> {
    try {
      if (this.failure) throw this.failure;
      if (this.inline) return this.inline.map((h) => h.digest('hex'));
      const done = new Promise<void>((r) => (this.finished = r));
      for (const w of this.workers) w.postMessage({ end: true });
      await Promise.race([done, this.failed]);
      return this.digests as string[];
    } finally {
      await this.close();
    }
  }

  /**
   * Lets the workers go (idempotent): back to the idle pool once they gave their digest, stopped
   * otherwise (a hash left half-way is of no use to the next image).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const done = this.failure === undefined && this.digests.filter((d) => d !== undefined).length === this.workers.length;
    if (done) for (const w of this.workers) giveBack(w, this.cpus);
    else await Promise.all(this.workers.map((w) => w.terminate()));
  }

  private release(s: number): void {
    this.busy[s]! -= 1;
    if (this.busy[s] === 0) for (const wake of this.waiting[s]!.splice(0)) wake();
  }
}

/**
 * Computes md5 and the os_hash of an open file in ONE read pass from offset 0 to end of file, the
 * two hashes at once on two worker threads while the next chunks are read: the event loop only
 * issues reads. `expectedBytes` only scales the progress fraction.
 */
export async function digestFile(
  fh: FileHandle,
  osHashAlgo: OsHashAlgo,
  opts: { expectedBytes?: number; onProgress?: ProgressCallback; chunkBytes?: number; onStart?: (d: ParallelDigest) => void } = {},
): Promise<FileDigests> {
  const digest = ParallelDigest.forSize(['md5', osHashAlgo], opts.expectedBytes, { chunkBytes: opts.chunkBytes });
  opts.onStart?.(digest);
  const total = opts.expectedBytes ?? 0;
  let lastReported = -1;
  try {
    const { position } = await hashFileRange(digest, fh, { start: 0, slot: 0 }, (at) => {
      if (opts.onProgress && total > 0) {
        const fraction = Math.min(1, at / total);
        if (fraction - lastReported >= 0.01) {
          lastReported = fraction;
          opts.onProgress(fraction);
        }
      }
    });
    const [md5, osHash] = await digest.end();
    if (opts.onProgress && lastReported < 1) opts.onProgress(1);
    return { md5: md5!, osHash: osHash!, bytes: position };
  } finally {
    await digest.close();
  }
}

/**
 * Hashes a range of an open file: reads it from `start` into the digest's ring slots, from index
 * `slot` on, and pushes each chunk. With `end`, up to it (a short read is an error); without, up to
 * the end of the file. `onChunk` runs after each chunk with the position reached (it may throw to
 * stop). Resolves with the position reached and the next slot index.
 */
export async function hashFileRange(
  digest: ParallelDigest,
  fh: FileHandle,
  range: { start: number; end?: number; slot: number },
  onChunk?: (position: number) => void,
): Promise<{ position: number; slot: number }> {
  const { end } = range;
  let { start: position, slot } = range;
  while (end === undefined || position < end) {
    const buf = await digest.slot(slot);
    const n = end === undefined ? digest.chunkBytes : Math.min(digest.chunkBytes, end - position);
    const { bytesRead } = await fh.read(buf, 0, n, position);
    if (end === undefined && bytesRead === 0) break;
    if (end !== undefined && bytesRead !== n) throw new Error(`short read of image data at ${position}: ${bytesRead} of ${n} bytes`);
    digest.push(slot++, bytesRead);
    position += bytesRead;
    onChunk?.(position);
  }
  return { position, slot };
}

/**
 * md5 and the os_hash of data handed over as it passes by (buffers, and runs of zeros), on the
 * digest's threads: each buffer is copied into a ring slot (the caller keeps its own), zeros are
 * hashed without any data.
 */
export class PassingDigest {
  private index = 0;
  private slot: Buffer | undefined;
  private filled = 0;
  private bytes = 0;

  constructor(private readonly digest: ParallelDigest) {}

  async update(data: Buffer): Promise<void> {
    for (let at = 0; at < data.length; ) {
      this.slot ??= await this.digest.slot(this.index);
      const n = data.copy(this.slot, this.filled, at);
      this.filled += n;
      at += n;
      if (this.filled === this.slot.length) this.flush();
    }
    this.bytes += data.length;
  }

  zeros(length: number): void {
    this.flush();
    this.digest.pushZeros(length);
    this.bytes += length;
  }

  async end(): Promise<FileDigests> {
    this.flush();
    const [md5, osHash] = await this.digest.end();
    return { md5: md5!, osHash: osHash!, bytes: this.bytes };
  }

  close(): Promise<void> {
    return this.digest.close();
  }

  private flush(): void {
    if (this.slot !== undefined && this.filled > 0) this.digest.push(this.index++, this.filled);
    this.slot = undefined;
    this.filled = 0;
  }
}
