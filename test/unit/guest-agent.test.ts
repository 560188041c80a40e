import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GuestAgentError } from '../../src/errors.js';
import { GuestAgentClient, fsCount, withGuestAgent } from '../../src/hypervisor/qemu/guest-agent.js';
import { GuestAgentResponder } from '../helpers/guest-agent-responder.js';

describe('guest agent client against a fake agent', () => {
  let tmp: DirectoryResult;
  let sock: string;
  let agent: GuestAgentResponder;
  const clients: GuestAgentClient[] = [];

  beforeEach(async () => {
    tmp = await dir({ unsafeCleanup: true, prefix: 'sdga-' });
    sock = path.join(tmp.path, 'qga.sock');
    agent = await GuestAgentResponder.listen(sock, { filesystems: 3 });
  });

  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    await agent.close();
    await tmp.cleanup();
  });

  async function connect(timeoutMs = 2000): Promise<GuestAgentClient> {
    const c = await GuestAgentClient.connect(sock, timeoutMs);
    clients.push(c);
    return c;
  }

  it('syncs (guest-sync-delimited), freezes and thaws, reporting filesystem counts', async () => {
    const c = await connect();
    expect(await c.execute('guest-fsfreeze-freeze', undefined, 2000)).toBe(3);
    expect(agent.frozen).toBe(true);
    expect(await c.execute('guest-fsfreeze-status', undefined, 2000)).toBe('frozen');
    expect(await c.execute('guest-fsfreeze-thaw', undefined, 2000)).toBe(3);
    expect(await c.execute('guest-fsfreeze-thaw', undefined, 2000)).toBe(0);
    expect(agent.received).toEqual([
      'guest-sync-delimited',
      'guest-fsfreeze-freeze',
      'guest-fsfreeze-status',
      'guest-fsfreeze-thaw',
      'guest-fsfreeze-thaw',
    ]);
  });

  it('drops stale output before the sentinel and stale sync replies carrying another id', async () => {
    agent.staleBeforeSync = Buffer.concat([
      Buffer.from('{"return": 4242}\n{"retu'),
      Buffer.from([0xff]),
      Buffer.from('{"return": 17}\nnot json at all\n'),
    ]);
    const c = await connect();
    expect(await c.execute('guest-ping', undefined, 2000)).toEqual({});
    expect(await c.execute('guest-fsfreeze-thaw', undefined, 2000)).toBe(0);
  });

  it('a reply that comes after its client gave up reaches the next client as stale data, and is skipped', async () => {
    agent.delayMs.set('guest-fsfreeze-freeze', 300);
    const first = await connect();
    await expect(first.execute('guest-fsfreeze-freeze', undefined, 50)).rejects.toThrow(
      /did not answer guest-fsfreeze-freeze within 50 ms/,
    );
    // The agent froze anyway; its late reply ("return": 3) is written to the next client.
    const second = await connect();
    expect(await second.execute('guest-fsfreeze-thaw', undefined, 2000)).toBe(3);
    expect(agent.frozen).toBe(false);
  });

  it('times out when nothing answers the sync (no agent in the guest)', async () => {
    agent.silent = true;
    const err = await GuestAgentClient.connect(sock, 200).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GuestAgentError);
    expect((err as Error).message).toContain('did not answer guest-sync-delimited within');
    expect(agent.received).toEqual(['guest-sync-delimited']);
  });

  it('a command that hangs times out', async () => {
    agent.hang.add('guest-fsfreeze-freeze');
    const c = await connect();
    await expect(c.execute('guest-fsfreeze-freeze', undefined, 100)).rejects.toBeInstanceOf(GuestAgentError);
    // The connection is closed after a timeout: its state is unknown.
    await expect(c.execute('guest-ping', undefined, 100)).rejects.toThrow(/closed/);
  });

  it('a garbled reply is an error', async () => {
    agent.garble.add('guest-fsfreeze-freeze');
    const c = await connect();
    await expect(c.execute('guest-fsfreeze-freeze', undefined, 1000)).rejects.toThrow(/unparseable message: "this is not json }{"/);
  });

  it("an error reply carries the agent's reason", async () => {
    agent.fail.set('guest-fsfreeze-freeze', 'failed to freeze /: Device or resource busy');
    const c = await connect();
    const err = await c.execute('guest-fsfreeze-freeze', undefined, 1000).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GuestAgentError);
    expect((err as Error).message).toBe(
      'guest agent guest-fsfreeze-freeze failed: GenericError: failed to freeze /: Device or resource busy',
    );
    // An error reply leaves the stream in sync: the connection is still usable.
    expect(await c.execute('guest-ping', undefined, 1000)).toEqual({});
  });

  it('a missing socket or a channel closed mid-command is a GuestAgentError', async () => {
    await expect(GuestAgentClient.connect(path.join(tmp.path, 'none.sock'), 500)).rejects.toThrow(/cannot connect/);
    agent.hang.add('guest-fsfreeze-thaw');
    const c = await connect();
    const pending = c.execute('guest-fsfreeze-thaw', undefined, 5000).catch((e: unknown) => e);
    await agent.close();
    const err = await pending;
    expect(err).toBeInstanceOf(GuestAgentError);
    expect((err as Error).message).toMatch(/guest agent channel .* (closed|failed: read ECONNRESET)/);
    agent = await GuestAgentResponder.listen(sock);
  });

  it('withGuestAgent names the action in its errors; fsCount checks the count', async () => {
    agent.silent = true;
    await expect(withGuestAgent(sock, 100, 'freeze the filesystems', async () => 1)).rejects.toThrow(
      /^cannot freeze the filesystems: guest agent did not answer guest-sync-delimited within 100 ms$/,
    );
    expect(fsCount('guest-fsfreeze-freeze', 2)).toBe(2);
    expect(() => fsCount('guest-fsfreeze-freeze', '2')).toThrow(GuestAgentError);
    expect(() => fsCount('guest-fsfreeze-thaw', -1)).toThrow(/expected a filesystem count/);
  });
});
