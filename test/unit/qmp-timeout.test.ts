import net from 'node:net';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { QmpDisconnected, QmpTimeout } from '../../src/errors.js';
import { QmpClient, timeoutPolicyOf, type LateReply } from '../../src/hypervisor/qemu/qmp.js';
import { QmpSessions } from '../../src/hypervisor/qemu/qmp-sessions.js';

/**
 * Issue 12 item 3: a QMP command that times out has a defined follow-up, and its late reply is
 * logged and emitted, never silently dropped. The fake server holds each reply until the test
 * releases it (no race between two real delays: the client's timeout is tiny and the server
 * answers only when told).
 */

interface Command {
  execute: string;
  id: number;
  arguments?: Record<string, unknown>;
}

/** A QMP server that answers qmp_capabilities at once and holds every other command until released. */
class HoldingQmpServer {
  readonly received: Command[] = [];
  readonly held = new Map<string, { cmd: Command; socket: net.Socket }>();
  /** Commands answered at once (`{"return": {}}`), e.g. follow-ups. */
  answerAtOnce = new Set<string>();
  connections = 0;
  private readonly server: net.Server;
  private readonly sockets: net.Socket[] = [];
  private arrivals: Array<() => void> = [];

  constructor(readonly socketPath: string) {
    this.server = net.createServer((socket) => {
      this.connections++;
      this.sockets.push(socket);
      socket.setEncoding('utf8');
      socket.write(JSON.stringify({ QMP: { version: {}, capabilities: [] } }) + '\r\n');
      let buf = '';
      socket.on('data', (chunk: string) => {
        buf += chunk;
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const cmd = JSON.parse(buf.slice(0, nl)) as Command;
          buf = buf.slice(nl + 1);
          this.received.push(cmd);
          if (cmd.execute === 'qmp_capabilities' || this.answerAtOnce.has(cmd.execute)) {
            socket.write(JSON.stringify({ return: {}, id: cmd.id }) + '\r\n');
          } else {
            this.held.set(cmd.execute, { cmd, socket });
          }
          for (const wake of this.arrivals) wake();
        }
      });
      socket.on('end', () => socket.end());
      socket.on('error', () => undefined);
    });
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.socketPath, resolve));
  }

  /** Resolves once `command` has been received. */
  async arrived(command: string): Promise<Command> {
    for (;;) {
      const c = this.received.find((r) => r.execute === command);
      if (c) return c;
      await new Promise<void>((r) => this.arrivals.push(r));
    }
  }

  /** Sends the held command's reply. */
  release(command: string, reply: Record<string, unknown> = { return: {} }): void {
    const h = this.held.get(command);
    if (!h) throw new Error(`${command} is not held`);
    this.held.delete(command);
    h.socket.write(JSON.stringify({ ...reply, id: h.cmd.id }) + '\r\n');
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** A pino logger whose lines land in `lines`. */
function capturingLogger(lines: Array<Record<string, unknown>>) {
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString('utf8').split('\n')) if (l.trim() !== '') lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  return pino({ level: 'debug' }, sink);
}

function nextLateReply(client: QmpClient): Promise<LateReply> {
  return new Promise((resolve) => client.once('late-reply', resolve));
}

let tmp: DirectoryResult;
let server: HoldingQmpServer;
let client: QmpClient | undefined;
let logLines: Array<Record<string, unknown>>;

beforeEach(async () => {
  tmp = await dir({ unsafeCleanup: true });
  server = new HoldingQmpServer(path.join(tmp.path, 'qmp.sock'));
  await server.listen();
  logLines = [];
});

afterEach(async () => {
  client?.destroy();
  client = undefined;
  await server.close();
  await tmp.cleanup();
});

async function connect(): Promise<QmpClient> {
  client = await QmpClient.connect(server.socketPath, { timeoutMs: 5000, log: capturingLogger(logLines) });
  return client;
}

describe('a QMP command that times out', () => {
  it('keep (a query): rejects with QmpTimeout; its late reply is logged and emitted; the session goes on', async () => {
    const qmp = await connect();
    const err = await qmp.execute('query-status', undefined, { timeoutMs: 20 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpTimeout);
    expect(qmp.unanswered).toBe(1);
    // The next command on the same session is still matched to its own reply.
    const next = qmp.execute<{ x: number }>('query-name');
    await server.arrived('query-name');
    const late = nextLateReply(qmp);
    server.release('query-status', { return: { status: 'running' } });
    expect(await late).toMatchObject({ command: 'query-status', value: { status: 'running' } });
    server.release('query-name', { return: { x: 1 } });
    expect(await next).toEqual({ x: 1 });
    expect(qmp.unanswered).toBe(0);
    expect(logLines.find((l) => l.msg === 'late QMP reply to a command that had timed out: it succeeded')).toMatchObject({
      qmp_command: 'query-status',
    });
  });

  it('a late error reply is logged as a failure', async () => {
    const qmp = await connect();
    await expect(qmp.execute('blockdev-del', { 'node-name': 'n' }, { timeoutMs: 20 })).rejects.toBeInstanceOf(QmpTimeout);
    const late = nextLateReply(qmp);
    server.release('blockdev-del', { error: { class: 'GenericError', desc: 'Node n is in use' } });
    expect((await late).error?.message).toBe('QMP blockdev-del failed: GenericError: Node n is in use');
    expect(logLines.find((l) => l.msg === 'late QMP reply to a command that had timed out: it failed')).toMatchObject({
      qmp_command: 'blockdev-del',
      err: 'QMP blockdev-del failed: GenericError: Node n is in use',
    });
  });

  it('a block job start (blockdev-backup) that timed out is cancelled on the same session before the caller hears of it', async () => {
    const qmp = await connect();
    server.answerAtOnce.add('job-cancel');
    const err = await qmp
      .execute('blockdev-backup', { 'job-id': 'snapdrv-backup-1', device: 'disk0', target: 't', sync: 'full' }, { timeoutMs: 20 })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpTimeout);
    expect((err as Error).message).toMatch(/blockdev-backup got no answer within 20 ms .*; job-cancel was run after it$/);
    const cancel = server.received.find((c) => c.execute === 'job-cancel');
    expect(cancel?.arguments).toEqual({ id: 'snapdrv-backup-1', force: true });
    expect(server.received.map((c) => c.execute)).toEqual(['qmp_capabilities', 'blockdev-backup', 'job-cancel']);
  });

  it('a snapshot create that timed out is followed by its delete (a late create leaves nothing behind)', async () => {
    const qmp = await connect();
    server.answerAtOnce.add('blockdev-snapshot-delete-internal-sync');
    await expect(
      qmp.execute('blockdev-snapshot-internal-sync', { device: 'disk0', name: 'snapdrv-x' }, { timeoutMs: 20 }),
    ).rejects.toThrow(/blockdev-snapshot-delete-internal-sync was run after it$/);
    expect(server.received.at(-1)).toMatchObject({
      execute: 'blockdev-snapshot-delete-internal-sync',
      arguments: { device: 'disk0', name: 'snapdrv-x' },
    });
  });

  it('a follow-up that fails is in the error too', async () => {
    const qmp = await connect();
    const err = qmp.execute('migrate', { uri: 'unix:/x' }, { timeoutMs: 20 }).catch((e: unknown) => e);
    await server.arrived('migrate_cancel');
    server.release('migrate_cancel', { error: { class: 'GenericError', desc: 'no migration' } });
    expect(((await err) as Error).message).toMatch(/; migrate_cancel was run after it and failed: QMP migrate_cancel failed: GenericError: no migration$/);
  });

  it('close: the session is closed, its other commands reject with QmpDisconnected', async () => {
    const qmp = await connect();
    const other = qmp.execute('query-block').catch((e: unknown) => e);
    await expect(qmp.execute('cont', undefined, { timeoutMs: 20, onTimeout: 'close' })).rejects.toThrow(/the session was closed$/);
    expect(await other).toBeInstanceOf(QmpDisconnected);
    await expect(qmp.execute('query-status')).rejects.toBeInstanceOf(QmpDisconnected);
    expect(logLines.some((l) => l.msg === 'QMP session ended with timed-out commands unanswered: how they ended is unknown')).toBe(true);
  });

  it('every command has a policy: job starts, migrate and snapshot create have follow-ups, the rest keep the session', () => {
    expect(timeoutPolicyOf('drive-mirror', { 'job-id': 'j' })).toEqual({ followUp: 'job-cancel', args: { id: 'j', force: true } });
    expect(timeoutPolicyOf('migrate', { uri: 'x' })).toEqual({ followUp: 'migrate_cancel' });
    expect(timeoutPolicyOf('blockdev-snapshot-delete-internal-sync', { device: 'd', name: 'n' })).toBe('keep');
    expect(timeoutPolicyOf('qom-set', {})).toBe('keep');
    expect(timeoutPolicyOf('query-status', undefined)).toBe('keep');
  });
});

describe('QmpSessions after a timeout', () => {
  it('keeps the session open for the late reply (logged), shares it meanwhile, closes it once answered', async () => {
    const sessions = new QmpSessions(5000, capturingLogger(logLines));
    const timedOut = await sessions
      .use(server.socketPath, (qmp) => qmp.execute('blockdev-snapshot-delete-internal-sync', { device: 'd', name: 'n' }, { timeoutMs: 20 }))
      .catch((e: unknown) => e);
    expect(timedOut).toBeInstanceOf(QmpTimeout);
    // The next operation shares the kept session (one connection), and its command is answered in order.
    let lateSeen: Promise<LateReply> | undefined;
    const next = sessions.use(server.socketPath, async (qmp) => {
      lateSeen = nextLateReply(qmp);
      const status = qmp.execute<{ status: string }>('query-status');
      await server.arrived('query-status');
      server.release('blockdev-snapshot-delete-internal-sync');
      server.release('query-status', { return: { status: 'running' } });
      return [await status, qmp] as const;
    });
    const [status, qmp] = await next;
    expect(status).toEqual({ status: 'running' });
    expect(server.connections).toBe(1);
    expect(await lateSeen).toMatchObject({ command: 'blockdev-snapshot-delete-internal-sync' });
    expect(qmp.connected).toBe(false); // closed after its use, nothing left unanswered
  });

  it('a session whose timed-out command is still unanswered is not dropped when its operation ends', async () => {
    const sessions = new QmpSessions(5000, capturingLogger(logLines));
    let held: QmpClient | undefined;
    await sessions
      .use(server.socketPath, (qmp) => {
        held = qmp;
        return qmp.execute('blockdev-snapshot-delete-internal-sync', { device: 'd', name: 'n' }, { timeoutMs: 20 });
      })
      .catch(() => undefined);
    expect(held!.connected).toBe(true);
    const late = nextLateReply(held!);
    server.release('blockdev-snapshot-delete-internal-sync');
    expect(await late).toMatchObject({ command: 'blockdev-snapshot-delete-internal-sync' });
    await new Promise<void>((resolve) => (held!.connected ? held!.once('disconnect', () => resolve()) : resolve()));
    expect(held!.connected).toBe(false);
    expect(logLines.some((l) => l.msg === 'late QMP reply to a command that had timed out: it succeeded')).toBe(true);
  });
});
