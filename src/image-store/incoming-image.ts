import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { FileDigests, ParallelDigest } from './hash.js';
import { ImageReceiver } from './image-receiver.js';
import { PacedReceiver } from './paced-receiver.js';
import { cpusFor } from '../util/affinity.js';
import { serveNbdExport, type NbdExport, type NbdLog, type NbdSink } from './nbd-server.js';
import type { OsHashAlgo } from './types.js';

/**
 * The private folders of the NBD sockets: `<tmpdir>/snapshot-driver-nbd-<pid>-<random>`, the pid of
 * the agent serving it, so that what a crashed agent left can be told from what a running one uses.
 */
const SOCKET_DIR_PREFIX = 'snapshot-driver-nbd-';

const SOCKET_DIR_NAME = new RegExp(`^${SOCKET_DIR_PREFIX}(\\d+)-[A-Za-z0-9]{6}$`);

/**
 * This user's socket folders in the temp dir, each with the pid of the process that made it (another
 * user's are not ours to judge, nor could we remove them from a sticky temp dir).
 */
export async function incomingSocketDirs(): Promise<{ dir: string; pid: number }[]> {
  const out: { dir: string; pid: number }[] = [];
  for (const name of await fs.readdir(os.tmpdir())) {
    const m = SOCKET_DIR_NAME.exec(name);
    if (!m) continue;
    const dir = path.join(os.tmpdir(), name);
    const st = await fs.lstat(dir).catch(() => undefined); // gone since the listing
    if (st?.isDirectory() && st.uid === process.getuid?.()) out.push({ dir, pid: Number(m[1]) });
  }
  return out;
}

/**
 * An image's data on its way into the store, as the snapshot steps hold it and an export writes it
 * (an ExportDest): staged into a partial file (IncomingImage), or streamed on to a remote store.
 */
export interface ImageSink {
  /** Where the data lands (for names and messages). */
  readonly file: string;
  /** `nbd+unix://…`: what qemu-img writes into (in offset order, zeros skipped). */
  readonly nbdUri: string;
  /** The data goes on to the store as it comes, nothing staged: a failed upload needs the export again. */
  readonly streamed: boolean;
  /** Set for an export no guest waits for: what the producer's pieces pass first. */
  readonly holdBack: HoldBack;
  put(offset: number, data: Buffer | readonly Buffer[]): Promise<void>;
  /** The producer has finished: resolves once the store has all of the data. */
  finish(): Promise<void>;
  /** md5 and the os_hash of the whole image, as it was received. */
  digests(): Promise<FileDigests>;
  /**
   * Gives up on the image. Resolves with what ended it: the store's own failure when the store
   * failed first (a streamed upload Glance cut or refused: the export then failed because of it),
   * else `reason`.
   */
  abort(reason: unknown): Promise<unknown>;
}

/**
 * Where an export no guest waits for holds back (a GuestWaits gate, passed by each piece the NBD
 * export takes: held, the producer gets no answer and stops), and how long it did in all.
 */
export class HoldBack {
  ms = 0;
  private gate: (() => Promise<number>) | undefined;

  set(gate: () => Promise<number>): void {
    this.gate = gate;
  }

  async pass(): Promise<void> {
    if (this.gate !== undefined) this.ms += await this.gate();
  }
}

/** An NBD export of `sink` on a unix socket in a fresh private folder, and how to stop serving it. */
export async function serveIncoming(sink: NbdSink, log: NbdLog): Promise<{ nbd: NbdExport; stop: () => Promise<void> }> {
  const socketDir = await fs.mkdtemp(path.join(os.tmpdir(), `${SOCKET_DIR_PREFIX}${process.pid}-`));
  try {
    const nbd = await serveNbdExport(path.join(socketDir, 'image.sock'), sink, log);
    return {
      nbd,
      stop: async () => {
        await nbd.close().catch(() => undefined);
        await fs.rm(socketDir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await fs.rm(socketDir, { recursive: true, force: true });
    throw err;
  }
}

/**
 * An image's data on its way into the store: written into its partial file as an export produces it
 * (by qemu-img through an NBD export on a unix socket in a private 0700 folder, so that no other
 * user's process can connect first; or by `put` in this process), and hashed behind the writing.
 */
export class IncomingImage implements ImageSink {
  readonly streamed = false;
  readonly holdBack = new HoldBack();

  private constructor(
    private readonly receiver: ImageReceiver | PacedReceiver,
    private readonly nbd: NbdExport,
    private readonly stopServing: () => Promise<void>,
  ) {}

  /**
   * `background`: no guest waits for the export, so it is paced to the hashes (PacedReceiver: hashed
   * as it comes, written with O_DIRECT, nothing read back); else it is written ahead of them
   * (ImageReceiver: a guest kept down for it waits for the disk only). `agentCpus` (`[DEFAULT]
   * agent_cpus`): a background export's hash threads are pinned to it, another's to every online CPU.
   */
  static async open(
    file: string,
    size: number,
    osHashAlgo: OsHashAlgo,
    log: NbdLog,
    opts: { background?: boolean; onDigest?: (d: ParallelDigest) => void; agentCpus?: string } = {},
  ): Promise<IncomingImage> {
    const receiver = opts.background
      ? await PacedReceiver.create(file, size, osHashAlgo, opts.onDigest, cpusFor(opts.agentCpus, 'background'))
      : await ImageReceiver.create(file, size, osHashAlgo, opts.onDigest, { cpus: cpusFor(opts.agentCpus, 'guest') });
    try {
      // No client can write before open() returns: it is given the socket's URI only then.
      let image: IncomingImage | undefined;
      const { nbd, stop } = await serveIncoming({ size, put: (o, d) => image!.put(o, d) }, log);
      image = new IncomingImage(receiver, nbd, stop);
      return image;
    } catch (err) {
      await receiver.abort(err instanceof Error ? err : new Error(String(err)));
      throw err;
    }
  }

  get file(): string {
    return this.receiver.file;
  }

  get nbdUri(): string {
    return this.nbd.uri;
  }

  async put(offset: number, data: Buffer | readonly Buffer[]): Promise<void> {
    await this.holdBack.pass();
    return this.receiver.put(offset, data);
  }

  /**
   * The producer has finished (qemu-img exited 0, or the last `put` resolved): resolves once every
   * byte is in the file. A client that connected must have ended cleanly (its errors are thrown here).
   */
  async finish(): Promise<void> {
    if (this.nbd.connected) await this.nbd.done;
    await this.stopServing();
    await this.receiver.close();
  }

  /** md5 and the os_hash of the whole image; settles after finish() once the hashes have caught up. */
  digests(): Promise<FileDigests> {
    return this.receiver.digests();
  }

  /** Gives up on the image: no more data is taken, the hashing stops. The partial file is the caller's. */
  async abort(reason: unknown): Promise<unknown> {
    await this.stopServing();
    await this.receiver.abort(reason instanceof Error ? reason : new Error(String(reason)));
    return reason;
  }
}
