import fs from 'node:fs/promises';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import pino from 'pino';
import { dir } from 'tmp-promise';
import { afterEach, describe, expect, it } from 'vitest';
import { InstanceLocks } from '../../src/snapshot/instance-locks.js';
import { InstanceBusy, InvalidInstanceId } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { LockChild } from '../helpers/lock-child.js';

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0)) await c();
});

async function setup() {
  const tmp = await dir({ unsafeCleanup: true });
  cleanups.push(() => tmp.cleanup());
  return { locksDir: path.join(tmp.path, 'locks'), locks: new InstanceLocks(path.join(tmp.path, 'locks'), silentLogger()) };
}

/** Another process holding the instance's lock (as a `snapshot` command would), until killed. */
async function heldByChild(locksDir: string, uuid: string): Promise<LockChild> {
  const child = await LockChild.start(path.join(locksDir, `${uuid}.lock`), 'snapshot command req-x');
  cleanups.push(() => child.kill());
  expect(await child.command('acquire')).toEqual({ held: true });
  return child;
}

describe('instance locks', () => {
  it('runs the work holding the lock file, and removes it afterwards, also when the work fails', async () => {
    const { locks, locksDir } = await setup();
    const uuid = randomUUID();
    const seen = await locks.hold(uuid, 'test', { waitMs: 0 }, async () => JSON.parse(await fs.readFile(path.join(locksDir, `${uuid}.lock`), 'utf8')) as Record<string, unknown>);
    expect(seen).toMatchObject({ pid: process.pid, what: 'test' });
    await expect(locks.hold(uuid, 'test', { waitMs: 0 }, () => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    expect(await fs.readdir(locksDir)).toEqual([]);
  });

  it('refuses at once, naming the other process and what it does, when told not to wait', async () => {
    const { locks, locksDir } = await setup();
    const uuid = randomUUID();
    const child = await heldByChild(locksDir, uuid);
    let ran = false;
    const err = await locks.hold(uuid, 'mine', { waitMs: 0 }, async () => (ran = true)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InstanceBusy);
    expect((err as Error).message).toBe(`instance ${uuid} is busy: process ${child.pid} is working on it (snapshot command req-x); try again when it has finished`);
    expect(ran).toBe(false);
    expect(await locks.tryHold(uuid, 'mine', async () => (ran = true))).toBeUndefined();
    expect(ran).toBe(false);
  });

  it('waits for the other process to end, then runs', async () => {
    const { locks, locksDir } = await setup();
    const uuid = randomUUID();
    const child = await heldByChild(locksDir, uuid);
    let killed = false;
    const waits: unknown[] = [];
    const log = pino({ level: 'info' }, { write: (line: string) => void waits.push(JSON.parse(line)) });
    const holding = locks.hold(uuid, 'mine', { waitMs: 60_000, log }, async () => killed);
    // Killed once the wait has begun (its log line says so), not after some time.
    while (waits.length === 0) await new Promise((r) => setImmediate(r));
    expect(waits[0]).toMatchObject({ instance_uuid: uuid, holder_pid: child.pid, holder_what: 'snapshot command req-x' });
    killed = true;
    await child.kill();
    // The work runs only once the holder is gone.
    expect(await holding).toBe(true);
  });

  it('takes over a lock left by a process that is gone', async () => {
    const { locks, locksDir } = await setup();
    const uuid = randomUUID();
    const child = await heldByChild(locksDir, uuid);
    await child.kill();
    expect(await locks.tryHold(uuid, 'mine', async () => 'ran')).toEqual({ value: 'ran' });
  });

  it('refuses an id that is not a uuid before touching anything', async () => {
    const { locks, locksDir } = await setup();
    await expect(locks.hold('../../etc/passwd', 'x', { waitMs: 0 }, async () => 1)).rejects.toBeInstanceOf(InvalidInstanceId);
    await expect(fs.access(locksDir)).rejects.toThrow();
  });
});
