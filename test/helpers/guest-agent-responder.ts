import fs from 'node:fs/promises';
import net from 'node:net';

/**
 * A fake QEMU guest agent speaking the qemu-ga protocol on a unix socket, for tests (the test
 * guests have no OS, so no real agent). Like the real channel, the "guest side" is one stream that
 * outlives host connections: commands are handled one at a time in arrival order, and a reply goes
 * to whichever client is connected when it is ready — so a late reply reaches the next client, as a
 * stale one.
 *
 * It answers guest-sync-delimited (0xFF before the reply), guest-sync, guest-ping,
 * guest-fsfreeze-freeze / -thaw / -status. Faults: `silent`, per-command `hang`, `delayMs`,
 * `garble`, `fail`, and `staleBeforeSync` (bytes sent just before each sync reply).
 */

const SENTINEL = 0xff;
/** Commands qemu-ga still runs while the guest's filesystems are frozen. */
const ALLOWED_WHEN_FROZEN = new Set([
  'guest-sync',
  'guest-sync-delimited',
  'guest-ping',
  'guest-fsfreeze-status',
  'guest-fsfreeze-thaw',
]);

export interface ResponderOptions {
  /** How many filesystems freeze / thaw report (default 2). */
  filesystems?: number;
}

export class GuestAgentResponder {
  /** Commands received (in order), whatever was done with them. */
  readonly received: string[] = [];
  /** Never answer anything (an agent-less guest: the channel exists, nobody reads it). */
  silent = false;
  /** Commands never answered; the agent is stuck in them (later commands wait too). */
  readonly hang = new Set<string>();
  /** Commands answered only after this delay (later commands wait meanwhile). */
  readonly delayMs = new Map<string, number>();
  /** Commands answered with a line that is not JSON. */
  readonly garble = new Set<string>();
  /** Commands answered with an error of this description. */
  readonly fail = new Map<string, string>();
  /** Bytes written right before the 0xFF of every sync reply (stale output of an earlier session). */
  staleBeforeSync: Buffer | undefined;
  frozen = false;
  readonly filesystems: number;

  private current: net.Socket | undefined;
  private readonly sockets = new Set<net.Socket>();
  private queue: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(
    private readonly server: net.Server,
    readonly socketPath: string,
    opts: ResponderOptions,
  ) {
    this.filesystems = opts.filesystems ?? 2;
  }

  static async listen(socketPath: string, opts: ResponderOptions = {}): Promise<GuestAgentResponder> {
    await fs.rm(socketPath, { force: true });
    const server = net.createServer();
    const responder = new GuestAgentResponder(server, socketPath, opts);
    server.on('connection', (s) => responder.onConnection(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => resolve());
    });
    return responder;
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await fs.rm(this.socketPath, { force: true });
  }

  private onConnection(socket: net.Socket): void {
    this.sockets.add(socket);
    this.current = socket;
    let buf = Buffer.alloc(0);
    socket.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      const sentinel = buf.lastIndexOf(SENTINEL);
      // 0xFF resets the agent's parser: a half-read request before it is dropped.
      if (sentinel >= 0) buf = buf.subarray(sentinel + 1);
      let nl;
      while ((nl = buf.indexOf(0x0a)) >= 0) {
        const line = buf.subarray(0, nl).toString('utf8').trim();
        buf = buf.subarray(nl + 1);
        if (line) this.enqueue(line);
      }
    });
    socket.on('close', () => {
      this.sockets.delete(socket);
      if (this.current === socket) this.current = undefined;
    });
    socket.on('error', () => undefined);
  }

  private enqueue(line: string): void {
    this.queue = this.queue.then(() => this.handle(line));
  }

  private async handle(line: string): Promise<void> {
    let req: { execute?: unknown; arguments?: Record<string, unknown> };
    try {
      req = JSON.parse(line) as typeof req;
    } catch {
      this.send({ error: { class: 'GenericError', desc: 'JSON parse error' } });
      return;
    }
    const command = String(req.execute);
    this.received.push(command);
    if (this.silent || this.closed) return;
    if (this.hang.has(command)) return new Promise<void>(() => undefined);
    const delay = this.delayMs.get(command);
    if (delay !== undefined) await new Promise((r) => setTimeout(r, delay));
    if (this.garble.has(command)) {
      this.write(Buffer.from('this is not json }{\n'));
      return;
    }
    const failure = this.fail.get(command);
    if (failure !== undefined) {
      this.send({ error: { class: 'GenericError', desc: failure } });
      return;
    }
    if (this.frozen && !ALLOWED_WHEN_FROZEN.has(command)) {
      this.send({ error: { class: 'GenericError', desc: `Command ${command} has been disabled for this instance` } });
      return;
    }
    switch (command) {
      case 'guest-sync-delimited':
        if (this.staleBeforeSync) this.write(this.staleBeforeSync);
        this.write(Buffer.from([SENTINEL]));
        this.send({ return: req.arguments?.id });
        return;
      case 'guest-sync':
        this.send({ return: req.arguments?.id });
        return;
      case 'guest-ping':
        this.send({ return: {} });
        return;
      case 'guest-fsfreeze-status':
        this.send({ return: this.frozen ? 'frozen' : 'thawed' });
        return;
      case 'guest-fsfreeze-freeze':
        this.frozen = true;
        this.send({ return: this.filesystems });
        return;
      case 'guest-fsfreeze-thaw': {
        const n = this.frozen ? this.filesystems : 0;
        this.frozen = false;
        this.send({ return: n });
        return;
      }
      default:
        this.send({ error: { class: 'CommandNotFound', desc: `The command ${command} has not been found` } });
    }
  }

  private send(msg: unknown): void {
    this.write(Buffer.from(JSON.stringify(msg) + '\n'));
  }

  private write(data: Buffer): void {
    if (this.current && !this.current.destroyed) this.current.write(data);
  }
}
