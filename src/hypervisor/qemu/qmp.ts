import { EventEmitter } from 'node:events';
import net from 'node:net';
import { QmpDisconnected, QmpTimeout } from '../../errors.js';
import { qmpReturn } from '../qmp-reply.js';

/**
 * A hand-written QMP client: line-delimited JSON over a unix socket. Every command carries an `id`
 * and replies are matched by it; asynchronous events are delivered apart from replies.
 *
 * Events: `event` (QmpEvent) for each event, and `disconnect` (Error) once when the connection ends.
 */

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** An event's timestamp (QEMU's wall clock, seconds + microseconds) as epoch milliseconds. */
export function eventTimeMs(ev: QmpEvent): number {
  if (!ev.timestamp) throw new Error(`QMP event ${ev.event} has no timestamp`);
  return ev.timestamp.seconds * 1000 + ev.timestamp.microseconds / 1000;
}

export interface QmpGreeting {
  QMP: { version?: unknown; capabilities?: unknown[] };
}

export interface QmpConnectOptions {
  /** Default timeout of every command, and of the greeting and capabilities negotiation. */
  timeoutMs: number;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

interface EventWaiter {
  name: string;
  predicate: (ev: QmpEvent) => boolean;
  resolve: (ev: QmpEvent) => void;
  reject: (err: Error) => void;
  timer?: NodeJS.Timeout;
}

export class QmpClient extends EventEmitter {
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly waiters = new Set<EventWaiter>();
  private closedError: Error | undefined;
  private greetingHandler: ((msg: Record<string, unknown>) => void) | undefined;
  greeting: QmpGreeting | undefined;

  private constructor(
    private readonly socket: net.Socket,
    readonly path: string,
    private readonly defaultTimeoutMs: number,
  ) {
    super();
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (err) => this.onClosed(new QmpDisconnected(`QMP connection to ${path} failed: ${err.message}`)));
    socket.on('close', () => this.onClosed(new QmpDisconnected(`QMP connection to ${path} closed`)));
  }

  /** Connects, reads the greeting and negotiates capabilities (`qmp_capabilities`). */
  static async connect(path: string, opts: QmpConnectOptions): Promise<QmpClient> {
    const socket = net.createConnection({ path });
    const client = new QmpClient(socket, path, opts.timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        const onDisconnect = (err: Error) => {
          clearTimeout(timer);
          reject(err);
        };
        const timer = setTimeout(() => {
          reject(new QmpTimeout(`no QMP greeting on ${path} within ${opts.timeoutMs} ms (is another client connected?)`));
        }, opts.timeoutMs);
        client.greetingHandler = (msg) => {
          // QEMU may flush an event left in the monitor's output buffer (emitted while the previous
          // client was leaving) ahead of the greeting: not ours, skip it.
          if (typeof msg.event === 'string') return;
          clearTimeout(timer);
          client.greetingHandler = undefined;
          client.off('disconnect', onDisconnect);
          if (typeof msg.QMP !== 'object' || msg.QMP === null) {
            reject(new QmpDisconnected(`unexpected first message on ${path}: ${JSON.stringify(msg)}`));
            return;
          }
          client.greeting = msg as unknown as QmpGreeting;
          resolve();
        };
        client.once('disconnect', onDisconnect);
      });
      await client.execute('qmp_capabilities');
    } catch (err) {
      client.destroy();
      throw err;
    }
    return client;
  }

  get connected(): boolean {
    return this.closedError === undefined;
  }

  /** Runs one command; resolves with its `return` value. Rejects with QmpError, QmpTimeout or QmpDisconnected. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpTimeout(`QMP ${command} got no answer within ${timeoutMs} ms on ${this.path}`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const msg: Record<string, unknown> = { execute: command, id };
      if (args !== undefined) msg.arguments = args;
      this.socket.write(JSON.stringify(msg) + '\n');
    });
  }

  /**
   * Resolves with the first event named `name` (and accepted by `predicate`) that arrives after this
   * call. Arm it before sending the command that causes the event. Rejects with QmpTimeout, or with
   * QmpDisconnected if the connection ends first.
   */
  waitForEvent(name: string, predicate: (ev: QmpEvent) => boolean = () => true, timeoutMs?: number): Promise<QmpEvent> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = { name, predicate, resolve, reject };
      if (timeoutMs !== undefined) {
        waiter.timer = setTimeout(() => {
          this.waiters.delete(waiter);
          reject(new QmpTimeout(`no QMP event ${name} within ${timeoutMs} ms on ${this.path}`));
        }, timeoutMs);
      }
      this.waiters.add(waiter);
    });
  }

  /** Closes the connection; pending commands and event waits reject with QmpDisconnected. */
  async close(): Promise<void> {
    if (this.closedError) return;
    await new Promise<void>((resolve) => {
      this.socket.once('close', () => resolve());
      this.socket.end();
      // A peer that never closes its side must not keep us waiting.
      setTimeout(() => this.socket.destroy(), 1000).unref();
    });
  }

  /** Drops the connection at once. */
  destroy(): void {
    this.socket.destroy();
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onLine(line);
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.emit('protocol-error', new Error(`unparseable QMP message: ${line.slice(0, 200)}`));
      return;
    }
    if (this.greetingHandler) {
      this.greetingHandler(msg);
      return;
    }
    if (typeof msg.event === 'string') {
      this.onEvent(msg as unknown as QmpEvent);
      return;
    }
    const id = msg.id;
    const pending = typeof id === 'number' ? this.pending.get(id) : undefined;
    if (!pending) {
      // A reply to a command that already timed out, or one without our id.
      this.emit('protocol-error', new Error(`QMP reply matches no pending command: ${line.slice(0, 200)}`));
      return;
    }
    this.pending.delete(id as number);
    clearTimeout(pending.timer);
    try {
      pending.resolve(qmpReturn(pending.command, msg));
    } catch (err) {
      pending.reject(err as Error);
    }
  }

  private onEvent(ev: QmpEvent): void {
    for (const w of [...this.waiters]) {
      if (w.name !== ev.event) continue;
      let ok: boolean;
      try {
        ok = w.predicate(ev);
      } catch {
        ok = false;
      }
      if (!ok) continue;
      this.waiters.delete(w);
      if (w.timer) clearTimeout(w.timer);
      w.resolve(ev);
    }
    this.emit('event', ev);
  }

  private onClosed(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    this.socket.destroy();
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(new QmpDisconnected(`QMP ${p.command}: ${err.message}`));
    }
    for (const w of this.waiters) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(err);
    }
    this.waiters.clear();
    this.emit('disconnect', err);
  }
}
