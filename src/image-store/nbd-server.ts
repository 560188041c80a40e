import fs from 'node:fs/promises';
import net from 'node:net';

/**
 * The receiving end of an export as an NBD server (the fixed-newstyle protocol, simple replies, one
 * client, one export, write-only) on a unix socket, so that `qemu-img convert -n --target-is-zero`
 * writes a raw image straight into the agent instead of into a file that would then be read back.
 * qemu-img writes in increasing offset order unless told otherwise (-W), and skips zeros on a target
 * said to be zero: each write goes to `sink.put` in arrival order, the ranges skipped are holes.
 * A write out of order, a read or anything else this export does not do gets an error reply and is
 * logged; the export then fails rather than yield a wrong image.
 */

export interface NbdSink {
  readonly size: number;
  /** Resolves once the data (pieces, one after the other) is stored; called in arrival order with increasing offsets. */
  put(offset: number, data: Buffer | readonly Buffer[]): Promise<void>;
}

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;

const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;
const CLIENT_FLAG_NO_ZEROES = 2;

const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_INFO = 6;
const OPT_GO = 7;

const REP_ACK = 1;
const REP_INFO = 3;
const REP_ERR_UNSUP = 0x80000001;
const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;

const TFLAG_HAS_FLAGS = 1 << 0;
const TFLAG_SEND_FLUSH = 1 << 2;
const TFLAG_SEND_WRITE_ZEROES = 1 << 6;
const TRANSMISSION_FLAGS = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_WRITE_ZEROES;

const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_WRITE_ZEROES = 6;

const EPERM = 1;
const EIO = 5;
const EINVAL = 22;
const ENOSPC = 28;

/** The largest request we take (qemu-img sends up to this, in 2 MiB pieces by default). */
const MAX_REQUEST_BYTES = 32 * 1024 * 1024;
/** Option data a client may send (an export name and a few info requests). */
const MAX_OPTION_BYTES = 64 * 1024;

function cutOff(got: number, n: number): Error {
  return new Error(`NBD client closed the connection in the middle of a message (${got} of ${n} bytes)`);
}

/** Reads exact byte counts from a socket, taking data only as it is asked for (backpressure). */
class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  private error: Error | undefined;
  private wake: (() => void) | undefined;

  constructor(private readonly socket: net.Socket) {
    socket.on('data', (c: Buffer) => {
      this.chunks.push(c);
      this.buffered += c.length;
      if (this.buffered > 4 * 1024 * 1024) socket.pause();
      this.wake?.();
    });
    socket.on('end', () => {
      this.ended = true;
      this.wake?.();
    });
    socket.on('error', (err) => {
      this.error = err;
      this.wake?.();
    });
  }

  /** Exactly `n` bytes; undefined if the stream ended cleanly before any of them. */
  async read(n: number): Promise<Buffer | undefined> {
    const pieces = await this.pieces(n);
    if (pieces === undefined) return undefined;
    // Only the bytes asked for are copied (a header never copies the data buffered behind it).
    return pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces, n);
  }

  /** Exactly `n` bytes as the pieces they arrived in (no copy); throws if the stream ends first. */
  async mustPieces(n: number): Promise<Buffer[]> {
    const out = await this.pieces(n);
    if (out === undefined) throw cutOff(0, n);
    return out;
  }

  /** Exactly `n` bytes as the pieces they arrived in; undefined if the stream ended cleanly before any of them. */
  private async pieces(n: number): Promise<Buffer[] | undefined> {
    const out: Buffer[] = [];
    for (let left = n; left > 0; ) {
      if (this.buffered === 0) {
        if (this.error) throw this.error;
        if (this.ended) {
          if (left === n) return undefined;
          throw cutOff(n - left, n);
        }
        this.socket.resume();
        await new Promise<void>((r) => (this.wake = r));
        this.wake = undefined;
        continue;
      }
      const c = this.chunks[0]!;
      const take = Math.min(c.length, left);
      out.push(c.subarray(0, take));
      if (take === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(take);
      this.buffered -= take;
      left -= take;
    }
    if (this.buffered <= 4 * 1024 * 1024) this.socket.resume();
    return out;
  }

  async must(n: number): Promise<Buffer> {
    const b = await this.read(n);
    if (b === undefined) throw new Error(`NBD client closed the connection (expected ${n} more bytes)`);
    return b;
  }
}

export interface NbdExport {
  /** What qemu-img is given as its target. */
  uri: string;
  /** A client has connected (then `done` settles when it is gone). */
  readonly connected: boolean;
  /**
   * Settles when the client has gone: resolves after a clean end (NBD_CMD_DISC or close after its
   * last reply), rejects with the first error of the export (a write that failed, a protocol error).
   */
  done: Promise<void>;
  /** Stops listening, drops a connected client, removes the socket. */
  close(): Promise<void>;
}

export interface NbdLog {
  warn(obj: object, msg: string): void;
}

/** Serves `sink` on a new unix socket at `socketPath` to one client. */
export async function serveNbdExport(socketPath: string, sink: NbdSink, log: NbdLog): Promise<NbdExport> {
  await fs.rm(socketPath, { force: true });
  const server = net.createServer();
  let client: net.Socket | undefined;
  let settle!: { resolve: () => void; reject: (e: Error) => void };
  const done = new Promise<void>((resolve, reject) => (settle = { resolve, reject }));
  done.catch(() => undefined);
  server.on('connection', (socket) => {
    if (client !== undefined) {
      socket.destroy(); // one writer only
      return;
    }
    client = socket;
    serveClient(socket, sink, log).then(
      () => settle.resolve(),
      (err: unknown) => settle.reject(err instanceof Error ? err : new Error(String(err))),
    ).finally(() => socket.destroy());
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return {
    uri: `nbd+unix:///?socket=${socketPath}`,
    get connected() {
      return client !== undefined;
    },
    done,
    close: async () => {
      client?.destroy();
      settle.reject(new Error('NBD export closed'));
      await new Promise<void>((r) => server.close(() => r()));
      await fs.rm(socketPath, { force: true });
    },
  };
}

async function serveClient(socket: net.Socket, sink: NbdSink, log: NbdLog): Promise<void> {
  const reader = new SocketReader(socket);
  const send = (b: Buffer) => new Promise<void>((resolve, reject) => socket.write(b, (err) => (err ? reject(err) : resolve())));

  // Handshake.
  const hello = Buffer.alloc(18);
  hello.writeBigUInt64BE(NBDMAGIC, 0);
  hello.writeBigUInt64BE(IHAVEOPT, 8);
  hello.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  await send(hello);
  const clientFlags = (await reader.must(4)).readUInt32BE(0);
  const noZeroes = (clientFlags & CLIENT_FLAG_NO_ZEROES) !== 0;

  const optReply = (option: number, type: number, data: Buffer = Buffer.alloc(0)) => {
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(type >>> 0, 12);
    h.writeUInt32BE(data.length, 16);
    return send(Buffer.concat([h, data]));
  };

  // Option haggling, until the client asks to go.
  for (;;) {
    const head = await reader.must(16);
    if (head.readBigUInt64BE(0) !== IHAVEOPT) throw new Error('NBD client sent a bad option magic');
    const option = head.readUInt32BE(8);
    const length = head.readUInt32BE(12);
    if (length > MAX_OPTION_BYTES) throw new Error(`NBD client sent an option of ${length} bytes`);
    const data = await reader.must(length);
    if (option === OPT_EXPORT_NAME) {
      const reply = Buffer.alloc(noZeroes ? 10 : 134);
      reply.writeBigUInt64BE(BigInt(sink.size), 0);
      reply.writeUInt16BE(TRANSMISSION_FLAGS, 8);
      await send(reply);
      break;
    }
    if (option === OPT_ABORT) {
      await optReply(option, REP_ACK);
      return;
    }
    if (option === OPT_GO || option === OPT_INFO) {
      const info = Buffer.alloc(12);
      info.writeUInt16BE(INFO_EXPORT, 0);
      info.writeBigUInt64BE(BigInt(sink.size), 2);
      info.writeUInt16BE(TRANSMISSION_FLAGS, 10);
      await optReply(option, REP_INFO, info);
      const sizes = Buffer.alloc(14);
      sizes.writeUInt16BE(INFO_BLOCK_SIZE, 0);
      sizes.writeUInt32BE(1, 2);
      sizes.writeUInt32BE(4096, 6);
      sizes.writeUInt32BE(MAX_REQUEST_BYTES, 10);
      await optReply(option, REP_INFO, sizes);
      await optReply(option, REP_ACK);
      if (option === OPT_GO) break;
      continue;
    }
    // Structured replies, meta contexts, TLS, listing: not offered; the client goes on without them.
    void data;
    await optReply(option, REP_ERR_UNSUP);
  }

  // Transmission.
  let firstError: Error | undefined;
  const reply = (handle: Buffer, errno: number) => {
    const r = Buffer.alloc(16);
    r.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    r.writeUInt32BE(errno, 4);
    handle.copy(r, 8);
    return send(r);
  };
  const refuse = async (handle: Buffer, errno: number, why: string) => {
    firstError ??= new Error(why);
    log.warn({ errno }, `NBD request refused: ${why}`);
    await reply(handle, errno);
  };
  for (;;) {
    const head = await reader.read(28);
    if (head === undefined) break; // closed after its last reply
    if (head.readUInt32BE(0) !== REQUEST_MAGIC) throw new Error('NBD client sent a bad request magic');
    const type = head.readUInt16BE(6);
    const handle = Buffer.from(head.subarray(8, 16));
    const offset = Number(head.readBigUInt64BE(16));
    const length = head.readUInt32BE(24);
    if (type === CMD_DISC) break;
    if (type === CMD_WRITE) {
      if (length > MAX_REQUEST_BYTES) throw new Error(`NBD write of ${length} bytes is larger than the ${MAX_REQUEST_BYTES} announced`);
      // The pieces as they arrived, written with one writev: no copy on this thread.
      const data = await reader.mustPieces(length);
      if (firstError) {
        await reply(handle, EIO);
        continue;
      }
      try {
        await sink.put(offset, data);
        await reply(handle, 0);
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        await refuse(handle, e.code === 'ENOSPC' ? ENOSPC : e instanceof RangeError ? EINVAL : EIO, `write of ${length} bytes at ${offset}: ${e.message}`);
      }
      continue;
    }
    if (type === CMD_WRITE_ZEROES) {
      // The target is zero already: nothing to write, as long as it keeps the order.
      if (offset + length > sink.size) await refuse(handle, ENOSPC, `write-zeroes beyond the end (${offset}+${length})`);
      else await reply(handle, firstError ? EIO : 0);
      continue;
    }
    if (type === CMD_FLUSH) {
      await reply(handle, firstError ? EIO : 0);
      continue;
    }
    if (type === CMD_READ) {
      await refuse(handle, EPERM, `read of ${length} bytes at ${offset}: this export is write-only`);
      continue;
    }
    await refuse(handle, EINVAL, `NBD command ${type} not supported`);
  }
  if (firstError) throw firstError;
}
