import net from 'node:net';
import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
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
    client?.destroy();
    client = undefined;
    await server.close();
    await tmp.cleanup();
  });

  const connect = async (timeoutMs = 2000) => {
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
    let sock!: net.Socket;
    server.onCommand = (cmd, s) => {
      held.push(cmd);
      sock = s;
      if (held.length === 3) for (const c of [...held].reverse()) reply(s, { return: { name: c.execute }, id: c.id });
    };
    const results = await Promise.all([qmp.execute('one'), qmp.execute('two'), qmp.execute('three')]);
    expect(sock).toBeDefined();
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

  it('times out a command with the default or a per-call timeout, and keeps working after', async () => {
    const qmp = await connect(150);
    const late: Command[] = [];
    server.onCommand = (cmd, s) => {
      if (cmd.execute === 'slow') late.push(cmd);
      else reply(s, { return: 'ok', id: cmd.id });
    };
    const e1 = await qmp.execute('slow').catch((e: unknown) => e);
    expect(e1).toBeInstanceOf(QmpTimeout);
    expect((e1 as Error).message).toContain('slow');
    const e2 = await qmp.execute('slow', undefined, { timeoutMs: 30 }).catch((e: unknown) => e);
    expect(e2).toBeInstanceOf(QmpTimeout);
    expect((e2 as Error).message).toContain('30 ms');
    // Late replies to the timed-out commands must not be taken for the next command's reply.
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
        setTimeout(() => reply(s, { event: 'MIGRATION', data: { status: 'completed' } }), 30);
      }
    };
    const shutdown = qmp.waitForEvent('SHUTDOWN');
    await expect(qmp.execute('quit')).resolves.toEqual({});
    await expect(shutdown).resolves.toMatchObject({ event: 'SHUTDOWN', data: { reason: 'host-qmp-quit' } });

    const completed = qmp.waitForEvent('MIGRATION', (e) => e.data?.status === 'completed', 2000);
    await qmp.execute('migrate', { uri: 'unix:/x' });
    await expect(completed).resolves.toMatchObject({ data: { status: 'completed' } });

    const never = await qmp.waitForEvent('RESUME', undefined, 40).catch((e: unknown) => e);
    expect(never).toBeInstanceOf(QmpTimeout);
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
    await new Promise((r) => setTimeout(r, 20));
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
    await new Promise((r) => setTimeout(r, 20));
    expect(server.ended).toBe(true);
    await expect(qmp.execute('x')).rejects.toBeInstanceOf(QmpDisconnected);
  });
});
