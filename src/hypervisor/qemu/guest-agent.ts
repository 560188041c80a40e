import { randomInt } from 'node:crypto';
import net from 'node:net';
import { GuestAgentError, errorMessage } from '../../errors.js';

/**
 * A client of the QEMU guest agent (qemu-ga) on the host side of its virtio-serial channel.
 *
 * The channel is one byte stream that outlives our connections: what the agent wrote for an earlier
 * client (a late reply, half a message) may still come out of it. So every connection starts with
 * `guest-sync-delimited`: we send 0xFF (the agent resets its parser on it) and the request with a
 * random id; the agent puts 0xFF before its reply. Everything before that byte is stale and dropped,
 * and replies after it that do not carry our id are stale too. The protocol has no request ids, so
 * commands run one at a time; after a timeout the stream's state is unknown and the connection is
 * closed (the next one syncs again).
 */

const SENTINEL = 0xff;
const NEWLINE = 0x0a;
/** A reply that never ends is garbage, not something to keep buffering. */
const MAX_LINE_BYTES = 1024 * 1024;

interface Waiter {
  deliver: (msg: Record<string, unknown> | Error) => void;
  /** Skip unparseable lines instead of failing (while syncing, they are stale data). */
  skipGarbage: boolean;
}

type Reply = { ok: true; value: unknown } | { ok: false; error: GuestAgentError };

export class GuestAgentClient {
  private buffer: Buffer = Buffer.alloc(0);
  /** Until the sync reply's sentinel arrives, everything read is stale. */
  private seenSentinel = false;
  private waiter: Waiter | undefined;
  private closedError: Error | undefined;

  private constructor(
    private readonly socket: net.Socket,
    readonly path: string,
  ) {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.onClosed(new GuestAgentError(`guest agent channel ${path} failed: ${err.message}`)));
    socket.on('close', () => this.onClosed(new GuestAgentError(`guest agent channel ${path} closed`)));
  }

  /**
   * Connects to the agent's channel (a unix socket) and syncs with it. Rejects with GuestAgentError
   * when the socket cannot be reached or no agent answers within `timeoutMs`.
   */
  static async connect(path: string, timeoutMs: number): Promise<GuestAgentClient> {
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.createConnection({ path });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new GuestAgentError(`cannot connect to the guest agent channel ${path} within ${timeoutMs} ms`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err) => {
        clearTimeout(timer);
        reject(new GuestAgentError(`cannot connect to the guest agent channel ${path}: ${err.message}`, { cause: err }));
      });
    });
    const client = new GuestAgentClient(socket, path);
    try {
      await client.sync(timeoutMs);
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  /** guest-sync-delimited with a fresh random id; resolves once the agent echoed it. */
  private async sync(timeoutMs: number): Promise<void> {
    const id = randomInt(1, 2 ** 31);
    this.seenSentinel = false;
    this.buffer = Buffer.alloc(0);
    const request = JSON.stringify({ execute: 'guest-sync-delimited', arguments: { id } });
    this.socket.write(Buffer.concat([Buffer.from([SENTINEL]), Buffer.from(request + '\n')]));
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const msg = await this.nextMessage(deadline - Date.now(), 'guest-sync-delimited', true);
      // Anything else is a stale reply meant for an earlier client.
      if (msg.return === id) return;
    }
  }

  /**
   * Runs one agent command; resolves with its `return` value. Rejects with GuestAgentError on an
   * error reply, a garbled reply, a lost channel or no reply within `timeoutMs` (the connection is
   * then closed: a reply arriving later must not be taken for the next command's).
   */
  async execute<T = unknown>(command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<T> {
    if (this.closedError) throw this.closedError;
    const msg: Record<string, unknown> = { execute: command };
    if (args !== undefined) msg.arguments = args;
    this.socket.write(JSON.stringify(msg) + '\n');
    let reply: Record<string, unknown>;
    try {
      reply = await this.nextMessage(timeoutMs, command, false);
    } catch (err) {
      this.close();
      throw err;
    }
    const parsed = parseReply(command, reply);
    if (!parsed.ok) throw parsed.error;
    return parsed.value as T;
  }

  /** Drops the connection at once. */
  close(): void {
    this.onClosed(new GuestAgentError(`guest agent channel ${this.path} closed`));
  }

  private nextMessage(timeoutMs: number, command: string, skipGarbage: boolean): Promise<Record<string, unknown>> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => {
          this.waiter = undefined;
          reject(new GuestAgentError(`guest agent did not answer ${command} within ${timeoutMs} ms`));
        },
        Math.max(0, timeoutMs),
      );
      this.waiter = {
        skipGarbage,
        deliver: (msg) => {
          clearTimeout(timer);
          this.waiter = undefined;
          if (msg instanceof Error) reject(msg);
          else resolve(msg);
        },
      };
      this.drain();
    });
  }

  private onData(chunk: Buffer): void {
    this.buffer = this.buffer.length === 0 ? chunk : Buffer.concat([this.buffer, chunk]);
    this.drain();
  }

  /** Hands the next complete message (if any) to the waiter. */
  private drain(): void {
    while (this.waiter) {
      const sentinel = this.buffer.lastIndexOf(SENTINEL);
      if (sentinel >= 0) {
        // The agent's parser was reset here: what came before is stale.
        this.buffer = this.buffer.subarray(sentinel + 1);
        this.seenSentinel = true;
      }
      if (!this.seenSentinel) {
        this.buffer = Buffer.alloc(0);
        return;
      }
      const nl = this.buffer.indexOf(NEWLINE);
      if (nl < 0) {
        if (this.buffer.length > MAX_LINE_BYTES) {
          this.buffer = Buffer.alloc(0);
          if (!this.waiter.skipGarbage) this.waiter.deliver(new GuestAgentError(`guest agent sent an over-long message on ${this.path}`));
        }
        return;
      }
      const line = this.buffer.subarray(0, nl).toString('utf8').trim();
      this.buffer = this.buffer.subarray(nl + 1);
      if (line === '') continue;
      const msg = parseObject(line);
      if (msg === undefined) {
        if (this.waiter.skipGarbage) continue;
        this.waiter.deliver(new GuestAgentError(`guest agent sent an unparseable message: ${JSON.stringify(line.slice(0, 200))}`));
        return;
      }
      this.waiter.deliver(msg);
    }
  }

  private onClosed(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    this.socket.destroy();
    this.waiter?.deliver(err);
  }
}

function parseObject(line: string): Record<string, unknown> | undefined {
  try {
    const v: unknown = JSON.parse(line);
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

function parseReply(command: string, reply: Record<string, unknown>): Reply {
  if ('return' in reply) return { ok: true, value: reply.return };
  if ('error' in reply) {
    const e = (reply.error ?? {}) as { class?: unknown; desc?: unknown };
    return {
      ok: false,
      error: new GuestAgentError(`guest agent ${command} failed: ${String(e.class ?? 'GenericError')}: ${String(e.desc ?? '')}`),
    };
  }
  return { ok: false, error: new GuestAgentError(`guest agent sent an unexpected reply to ${command}: ${JSON.stringify(reply).slice(0, 200)}`) };
}

/**
 * Connects, syncs, runs `fn`, disconnects. Any failure becomes a GuestAgentError naming `what`.
 */
export async function withGuestAgent<T>(
  path: string,
  timeoutMs: number,
  what: string,
  fn: (agent: GuestAgentClient) => Promise<T>,
): Promise<T> {
  let agent: GuestAgentClient | undefined;
  try {
    agent = await GuestAgentClient.connect(path, timeoutMs);
    return await fn(agent);
  } catch (err) {
    if (err instanceof GuestAgentError) throw new GuestAgentError(`cannot ${what}: ${err.message}`, { cause: err });
    throw new GuestAgentError(`cannot ${what}: ${errorMessage(err)}`, { cause: err });
  } finally {
    agent?.close();
  }
}

/** A filesystem count from guest-fsfreeze-freeze / -thaw. */
export function fsCount(command: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0) {
    throw new GuestAgentError(`guest agent ${command} returned ${JSON.stringify(value)}, expected a filesystem count`);
  }
  return value;
}
