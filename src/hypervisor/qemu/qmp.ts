import { EventEmitter } from 'node:events';
import net from 'node:net';
import { QmpDisconnected, QmpTimeout } from '../../errors.js';
import type { Logger } from '../../log.js';
import { qmpReturn } from '../qmp-reply.js';

/**
 * A hand-written QMP client: line-delimited JSON over a unix socket. Every command carries an `id`
 * and replies are matched by it; asynchronous events are delivered apart from replies.
 *
 * Events: `event` (QmpEvent) for each event, `late-reply` (LateReply) for the reply to a command
 * that had timed out, and `disconnect` (Error) once when the connection ends.
 *
 * A command that times out is not over in QEMU: it goes on, its effect may still happen and its
 * reply may still come. So every command has a defined follow-up (TimeoutPolicy, by default
 * timeoutPolicyOf), its late reply is logged (and emitted), and a session with a timed-out command
 * unanswered is kept open for it (QmpSessions) rather than dropped with it.
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
  /** Where late replies, follow-ups and unanswered commands are logged. */
  log?: Logger;
}

/**
 * What is done when a command gets no answer within its timeout (it then rejects with QmpTimeout).
 * Whatever the policy, a reply that comes later is logged and emitted (`late-reply`).
 *
 * - `keep`: nothing is sent; the session stays usable. QEMU runs one session's commands in order, so
 *   the next command sent on it (e.g. the caller's teardown, or a query to see what happened) runs
 *   after the timed-out one has taken effect or failed.
 * - `close`: the session is closed at once: nothing more is sent on it (its other commands reject
 *   with QmpDisconnected); the late reply is lost (logged as unanswered).
 * - `followUp`: this command runs on the same session right away, so after the timed-out one in
 *   QEMU's order (e.g. `job-cancel` of a job whose start timed out); the QmpTimeout rejects once
 *   the follow-up has been answered (or has timed out itself), its outcome in the message.
 */
export type TimeoutPolicy = 'keep' | 'close' | { followUp: string; args?: Record<string, unknown> };

/** Commands that start a block job named by `job-id`: a start that timed out is cancelled. */
const JOB_STARTERS = new Set([
  'blockdev-backup',
  'drive-backup',
  'blockdev-mirror',
  'drive-mirror',
  'block-commit',
  'block-stream',
  'blockdev-create',
  'blockdev-amend',
  'snapshot-save',
  'snapshot-load',
  'snapshot-delete',
]);

/**
 * The follow-up of each command when it times out (see TimeoutPolicy):
 * - a block job start (`job-id`): `job-cancel` of that job (force: a mirror does not complete);
 * - `migrate`: `migrate_cancel` (the guest's state stops streaming out; the caller puts the guest back);
 * - `blockdev-snapshot-internal-sync`: the delete of that snapshot, so that a create that completes
 *   late, after the operation was told it failed, leaves no snapshot behind;
 * - everything else (queries, and the steps the caller itself undoes on the same session, such as a
 *   live backup's set-up or a managed save's stop): `keep`. A `blockdev-snapshot-delete-internal-sync`
 *   cannot be undone: it is kept, and its late reply says how it ended.
 */
export function timeoutPolicyOf(command: string, args: Record<string, unknown> | undefined): TimeoutPolicy {
  if (JOB_STARTERS.has(command) && typeof args?.['job-id'] === 'string') {
    return { followUp: 'job-cancel', args: { id: args['job-id'], force: true } };
  }
  if (command === 'migrate') return { followUp: 'migrate_cancel' };
  if (command === 'blockdev-snapshot-internal-sync' && args !== undefined) {
    return { followUp: 'blockdev-snapshot-delete-internal-sync', args: { device: args.device, name: args.name } };
  }
  return 'keep';
}

export interface ExecuteOptions {
  /** This command's timeout; default the session's. */
  timeoutMs?: number;
  /** What is done when it times out; default timeoutPolicyOf(command, args). */
  onTimeout?: TimeoutPolicy;
}

/** The reply to a command that had timed out. */
export interface LateReply {
  command: string;
  id: number;
  /** How long after its timeout the reply came (ms). */
  lateMs: number;
  /** QMP's error, when the command failed in the end. */
  error?: Error;
  /** Its return value, when it succeeded. */
  value?: unknown;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

/** A command that timed out and has not been answered yet. */
interface Abandoned {
  command: string;
  timedOutAt: number;
  timeoutMs: number;
}

interface EventWaiter {
  names: readonly string[];
  predicate: (ev: QmpEvent) => boolean;
  resolve: (ev: QmpEvent) => void;
  reject: (err: Error) => void;
  timer?: NodeJS.Timeout;
}

export class QmpClient extends EventEmitter {
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly abandoned = new Map<number, Abandoned>();
  private readonly settledWaiters = new Set<() => void>();
  private readonly waiters = new Set<EventWaiter>();
  private closedError: Error | undefined;
  private greetingHandler: ((msg: Record<string, unknown>) => void) | undefined;
  greeting: QmpGreeting | undefined;

  private constructor(
    private readonly socket: net.Socket,
    readonly path: string,
    private readonly defaultTimeoutMs: number,
    private readonly log?: Logger,
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
    const client = new QmpClient(socket, path, opts.timeoutMs, opts.log);
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

  /** Commands that timed out and are still unanswered. */
  get unanswered(): number {
    return this.abandoned.size;
  }

  /**
   * The longest wait worth giving the unanswered commands: as long again as the longest of their
   * timeouts, from now. 0 when there are none.
   */
  get lateReplyWindowMs(): number {
    let ms = 0;
    for (const a of this.abandoned.values()) ms = Math.max(ms, a.timeoutMs);
    return ms;
  }

  /** Resolves once no timed-out command is unanswered, the connection has ended, or after `maxMs`. */
  whenSettled(maxMs: number): Promise<void> {
    if (this.abandoned.size === 0 || this.closedError) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.settledWaiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, maxMs);
      timer.unref();
      this.settledWaiters.add(done);
    });
  }

  /** Lets the process exit while this connection is open (a session kept only for late replies). */
  unref(): void {
    this.socket.unref();
  }

  ref(): void {
    this.socket.ref();
  }

  /**
   * Runs one command; resolves with its `return` value. Rejects with QmpError, QmpTimeout or
   * QmpDisconnected. On a timeout, the command's TimeoutPolicy applies before the QmpTimeout rejects.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: ExecuteOptions = {}): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.abandoned.set(id, { command, timedOutAt: Date.now(), timeoutMs });
        const policy = opts.onTimeout ?? timeoutPolicyOf(command, args);
        const message = `QMP ${command} got no answer within ${timeoutMs} ms on ${this.path}`;
        void this.followUp(command, id, policy).then((outcome) => reject(new QmpTimeout(outcome ? `${message}; ${outcome}` : message)));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const msg: Record<string, unknown> = { execute: command, id };
      if (args !== undefined) msg.arguments = args;
      this.socket.write(JSON.stringify(msg) + '\n');
    });
  }

  /**
   * Resolves with the first event named `name` (or one of the names; and accepted by `predicate`)
   * that arrives after this call. Arm it before sending the command that causes the event. Rejects
   * with QmpTimeout, or with QmpDisconnected if the connection ends first.
   */
  waitForEvent(name: string | readonly string[], predicate: (ev: QmpEvent) => boolean = () => true, timeoutMs?: number): Promise<QmpEvent> {
    if (this.closedError) return Promise.reject(this.closedError);
    const names = typeof name === 'string' ? [name] : name;
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = { names, predicate, resolve, reject };
      if (timeoutMs !== undefined) {
        waiter.timer = setTimeout(() => {
          this.waiters.delete(waiter);
          reject(new QmpTimeout(`no QMP event ${names.join(' or ')} within ${timeoutMs} ms on ${this.path}`));
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

  /** Applies a timed-out command's policy; resolves with what was done, for the QmpTimeout's message. */
  private async followUp(command: string, id: number, policy: TimeoutPolicy): Promise<string> {
    const log = this.log?.child({ qmp_command: command, qmp_id: id, qmp_socket: this.path });
    if (policy === 'keep') {
      log?.warn('QMP command timed out: QEMU may still run it; its late reply will be logged');
      return '';
    }
    if (policy === 'close') {
      log?.warn('QMP command timed out: closing the session');
      this.socket.destroy();
      return 'the session was closed';
    }
    if (this.closedError) return `its follow-up ${policy.followUp} was not sent: the session had ended`;
    try {
      await this.execute(policy.followUp, policy.args, { onTimeout: 'keep' });
      log?.warn({ follow_up: policy.followUp }, 'QMP command timed out: follow-up done');
      return `${policy.followUp} was run after it`;
    } catch (err) {
      log?.warn({ follow_up: policy.followUp, err: (err as Error).message }, 'QMP command timed out: its follow-up failed');
      return `${policy.followUp} was run after it and failed: ${(err as Error).message}`;
    }
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
    const abandoned = typeof id === 'number' ? this.abandoned.get(id) : undefined;
    if (abandoned) {
      this.onLateReply(id as number, abandoned, msg);
      return;
    }
    const pending = typeof id === 'number' ? this.pending.get(id) : undefined;
    if (!pending) {
      // One without our id.
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

  private onLateReply(id: number, a: Abandoned, msg: Record<string, unknown>): void {
    this.abandoned.delete(id);
    const late: LateReply = { command: a.command, id, lateMs: Date.now() - a.timedOutAt };
    try {
      late.value = qmpReturn(a.command, msg);
    } catch (err) {
      late.error = err as Error;
    }
    this.log?.warn(
      { qmp_command: a.command, qmp_id: id, late_ms: late.lateMs, ...(late.error ? { err: late.error.message } : {}) },
      late.error ? 'late QMP reply to a command that had timed out: it failed' : 'late QMP reply to a command that had timed out: it succeeded',
    );
    this.emit('late-reply', late);
    if (this.abandoned.size === 0) for (const done of [...this.settledWaiters]) done();
  }

  private onEvent(ev: QmpEvent): void {
    for (const w of [...this.waiters]) {
      if (!w.names.includes(ev.event)) continue;
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
    if (this.abandoned.size > 0) {
      this.log?.warn(
        { qmp_socket: this.path, unanswered: [...this.abandoned.values()].map((a) => a.command) },
        'QMP session ended with timed-out commands unanswered: how they ended is unknown',
      );
      this.abandoned.clear();
    }
    for (const done of [...this.settledWaiters]) done();
    this.emit('disconnect', err);
  }
}
