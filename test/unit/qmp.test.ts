import net from 'node:net';
import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { QmpDisconnected, QmpError, QmpTimeout } from '../../src/errors.js';
import { QmpClient, type QmpEvent } from '../../src/hypervisor/qemu/qmp.js';

interface Command {
  execute: string;
  id: unknown;
  arguments?: Record<string, unknown>;
}

/** A fake QMP server: sends a greeting, answers qmp_capabilities, hands other commands to `onCommand`. */
class FakeQmpServer {
  readonly received: Command[] = [];
  readonly server: net.Server;
  sockets: net.Socket[] = [];
  greeting: string | null = JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: ['oob'] } });
  onCommand: (cmd: Command, socket: net.Socket) => void = (cmd, s) => reply(s, { return: {}, id: cmd.id });
  ended = false;

  constructor(readonly socketPath: string) {
    this.server = net.createServer((socket) => {
      this.sockets.push(socket);
      socket.setEncoding('utf8');
      if (this.greeting !== null) socket.write(this.greeting + '\r\n');
      let buf = '';
      socket.on('data', (chunk: string) => {
        buf += chunk;
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const cmd = JSON.parse(buf.slice(0, nl)) as Command;
          buf = buf.slice(nl + 1);
          this.received.push(cmd);
          if (cmd.execute === 'qmp_capabilities') reply(socket, { return: {}, id: cmd.id });
          else this.onCommand(cmd, socket);
        }
      });
      socket.on('end', () => {
        this.ended = true;
        socket.end();
      });
      socket.on('error', () => undefined);
    });
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.socketPath, resolve));
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

function reply(socket: net.Socket, msg: unknown): void {
  socket.write(JSON.stringify(msg) + '\r\n');
}

/**
 * Lets the event loop turn (real socket I/O goes on; no timer is involved, so faked timers do not
 * matter) until `cond` holds. The deadline only ends a test that is failing anyway.
 */
async function until(what: string, cond: () => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`${what}: not within 10 s`);
    await new Promise<void>((r) => setImmediate(r));
  }
}

/** Whether a promise has settled yet (read after the microtasks have run). */
function watch(p: Promise<unknown>): { readonly settled: boolean } {
  const state = { settled: false };
  p.then(
    () => (state.settled = true),
    () => (state.settled = true),
  );
  return state;
}

describe('QmpClient', () => {
  let tmp: DirectoryResult;
  let server: FakeQmpServer;
  let client: QmpClient | undefined;

  beforeEach(async () => {
    tmp = await dir({ unsafeCleanup: true });
    server = new FakeQmpServer(path.join(tmp.path, 'qmp.sock'));
    await server.listen();
  });

  afterEach(async () => {
    vi.useRealTimers();
    client?.destroy();
    client = undefined;
    await server.close();
    await tmp.cleanup();
  });

  // A timeout no machine's load reaches, where the test is not about timeouts.
  const connect = async (timeoutMs = 30_000) => {
    client = await QmpClient.connect(server.socketPath, { timeoutMs });
    return client;
  };

  it('reads the greeting and negotiates capabilities before anything else', async () => {
    const qmp = await connect();
    expect(qmp.greeting?.QMP.capabilities).toEqual(['oob']);
    expect(server.received).toHaveLength(1);
    expect(server.received[0]?.execute).toBe('qmp_capabilities');
    expect(server.received[0]?.id).toEqual(expect.any(Number));
  });

  it('skips an event QEMU flushes ahead of the greeting (left over from the previous client)', async () => {
    const stale = JSON.stringify({ timestamp: { seconds: 1, microseconds: 0 }, event: 'JOB_STATUS_CHANGE', data: { status: 'pending', id: 'j' } });
    server.greeting = `${stale}\r\n${server.greeting ?? ''}`;
    const qmp = await connect();
    expect(qmp.greeting?.QMP.capabilities).toEqual(['oob']);
    expect(server.received[0]?.execute).toBe('qmp_capabilities');
  });

  it('sends every command with a distinct id and its arguments', async () => {
    const qmp = await connect();
    server.onCommand = (cmd, s) => reply(s, { return: { echo: cmd.arguments ?? null }, id: cmd.id });
    await expect(qmp.execute('query-status')).resolves.toEqual({ echo: null });
    await expect(qmp.execute('stop', { a: 1 })).resolves.toEqual({ echo: { a: 1 } });
    const ids = server.received.map((c) => c.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(server.received[2]).toMatchObject({ execute: 'stop', arguments: { a: 1 } });
    expect(server.received[1]).not.toHaveProperty('arguments');
  });

  it('matches replies that arrive out of order by id', async () => {
    const qmp = await connect();
    const held: Command[] = [];
    const replied: string[] = [];
    server.onCommand = (cmd, s) => {
      held.push(cmd);
      if (held.length !== 3) return;
      for (const c of [...held].reverse()) {
        replied.push(c.execute);
        reply(s, { return: { name: c.execute }, id: c.id });
      }
    };
    const results = await Promise.all([qmp.execute('one'), qmp.execute('two'), qmp.execute('three')]);
    expect(replied).toEqual(['three', 'two', 'one']); // really out of order
    expect(results).toEqual([{ name: 'one' }, { name: 'two' }, { name: 'three' }]);
  });

  it('handles a message split across chunks and several messages in one chunk', async () => {
    const qmp = await connect();
    server.onCommand = (cmd, s) => {
      if (cmd.execute === 'split') {
        const line = JSON.stringify({ return: { big: 'x'.repeat(5000) }, id: cmd.id }) + '\r\n';
        s.write(line.slice(0, 7));
        setTimeout(() => s.write(line.slice(7, 3000)), 20);
        setTimeout(() => s.write(line.slice(3000)), 40);
      } else {
        // An event and the reply in a single write.
        s.write(
          JSON.stringify({ event: 'STOP', timestamp: { seconds: 1, microseconds: 2 } }) +
            '\r\n' +
            JSON.stringify({ return: 'both', id: cmd.id }) +
            '\r\n',
        );
      }
    };
    const events: QmpEvent[] = [];
    qmp.on('event', (e: QmpEvent) => events.push(e));
    await expect(qmp.execute('split')).resolves.toEqual({ big: 'x'.repeat(5000) });
    await expect(qmp.execute('together')).resolves.toBe('both');
    expect(events.map((e) => e.event)).toEqual(['STOP']);
  });

  it('rejects an error reply with QmpError carrying command, class and desc', async () => {
    const qmp = await connect();
    server.onCommand = (cmd, s) =>
      reply(s, { error: { class: 'DeviceNotFound', desc: "Device 'nope' not found" }, id: cmd.id });
    const err = await qmp.execute('blockdev-snapshot-internal-sync', { device: 'nope', name: 's' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpError);
    expect(err).toMatchObject({
      name: 'QmpError',
      command: 'blockdev-snapshot-internal-sync',
      errorClass: 'DeviceNotFound',
      desc: "Device 'nope' not found",
    });
  });

  it('times out a command at the default or a per-call timeout, not before, and keeps working after', async () => {
    // The client's timers faked (its socket is real): a timeout runs out when the test says, however
    // slow the machine, and no other exchange can run out of time.
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    const qmp = await connect(150);
    const late: Command[] = [];
    server.onCommand = (cmd, s) => {
      if (cmd.execute === 'slow') late.push(cmd);
      else reply(s, { return: 'ok', id: cmd.id });
    };
    const p1 = qmp.execute('slow').catch((e: unknown) => e);
    const w1 = watch(p1);
    await vi.advanceTimersByTimeAsync(149);
    expect(w1.settled).toBe(false);
    await vi.advanceTimersByTimeAsync(1);
    const e1 = await p1;
    expect(e1).toBeInstanceOf(QmpTimeout);
    expect((e1 as Error).message).toContain('QMP slow got no answer within 150 ms');

    const p2 = qmp.execute('slow', undefined, { timeoutMs: 30 }).catch((e: unknown) => e);
    const w2 = watch(p2);
    await vi.advanceTimersByTimeAsync(29);
    expect(w2.settled).toBe(false);
    await vi.advanceTimersByTimeAsync(1);
    const e2 = await p2;
    expect(e2).toBeInstanceOf(QmpTimeout);
    expect((e2 as Error).message).toContain('30 ms');

    // Late replies to the timed-out commands must not be taken for the next command's reply.
    await until('both slow commands at the server', () => late.length === 2);
    for (const c of late) reply(server.sockets[0]!, { return: 'late', id: c.id });
    await expect(qmp.execute('fast')).resolves.toBe('ok');
    expect(qmp.connected).toBe(true);
  });

  it('delivers events apart from replies, to waiters armed before the command', async () => {
    const qmp = await connect();
    server.onCommand = (cmd, s) => {
      if (cmd.execute === 'quit') {
        // The event comes before the reply, as QEMU does for quit.
        reply(s, { event: 'SHUTDOWN', data: { guest: false, reason: 'host-qmp-quit' }, timestamp: { seconds: 1, microseconds: 0 } });
        reply(s, { return: {}, id: cmd.id });
      } else if (cmd.execute === 'migrate') {
        reply(s, { return: {}, id: cmd.id });
        reply(s, { event: 'MIGRATION', data: { status: 'setup' } });
      }
    };
    const shutdown = qmp.waitForEvent('SHUTDOWN');
    await expect(qmp.execute('quit')).resolves.toEqual({});
    await expect(shutdown).resolves.toMatchObject({ event: 'SHUTDOWN', data: { reason: 'host-qmp-quit' } });

    // The event the waiter wants comes after the command's reply and after another MIGRATION event.
    const completed = qmp.waitForEvent('MIGRATION', (e) => e.data?.status === 'completed', 30_000);
    const w = watch(completed);
    await qmp.execute('migrate', { uri: 'unix:/x' });
    const setupSeen = qmp.waitForEvent('STOP'); // any later message: here, a marker sent after `setup`
    reply(server.sockets[0]!, { event: 'STOP' });
    await setupSeen;
    expect(w.settled).toBe(false); // `setup` did not satisfy it
    reply(server.sockets[0]!, { event: 'MIGRATION', data: { status: 'completed' } });
    await expect(completed).resolves.toMatchObject({ data: { status: 'completed' } });

    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    const never = qmp.waitForEvent('RESUME', undefined, 40).catch((e: unknown) => e);
    const wn = watch(never);
    await vi.advanceTimersByTimeAsync(39);
    expect(wn.settled).toBe(false);
    await vi.advanceTimersByTimeAsync(1);
    expect(await never).toBeInstanceOf(QmpTimeout);
  });

  it('rejects all pending commands and event waits with QmpDisconnected when the connection is lost', async () => {
    const qmp = await connect();
    server.onCommand = () => undefined;
    let disconnected: Error | undefined;
    qmp.on('disconnect', (e: Error) => {
      disconnected = e;
    });
    const a = qmp.execute('a').catch((e: unknown) => e);
    const b = qmp.execute('b').catch((e: unknown) => e);
    const ev = qmp.waitForEvent('SHUTDOWN').catch((e: unknown) => e);
    await until('both commands at the server', () => server.received.length === 3);
    server.sockets[0]!.destroy();
    expect(await a).toBeInstanceOf(QmpDisconnected);
    expect(await b).toBeInstanceOf(QmpDisconnected);
    expect(await ev).toBeInstanceOf(QmpDisconnected);
    expect(disconnected).toBeInstanceOf(QmpDisconnected);
    expect(qmp.connected).toBe(false);
    await expect(qmp.execute('c')).rejects.toBeInstanceOf(QmpDisconnected);
  });

  it('times out when no greeting comes (another client holds the monitor)', async () => {
    server.greeting = null;
    const err = await QmpClient.connect(server.socketPath, { timeoutMs: 60 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpTimeout);
    expect((err as Error).message).toContain('greeting');
  });

  it('fails to connect to a missing socket with QmpDisconnected', async () => {
    const err = await QmpClient.connect(path.join(tmp.path, 'none.sock'), { timeoutMs: 500 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpDisconnected);
    expect((err as Error).message).toContain('none.sock');
  });

  it('close() ends the connection', async () => {
    const qmp = await connect();
    await qmp.close();
    expect(qmp.connected).toBe(false);
    // close() resolves when the socket has closed, the server having ended its side on our end.
    expect(server.ended).toBe(true);
    await expect(qmp.execute('x')).rejects.toBeInstanceOf(QmpDisconnected);
  });
});
