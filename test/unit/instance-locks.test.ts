import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { dir } from 'tmp-promise';
import { afterEach, describe, expect, it } from 'vitest';
import { InstanceLocks } from '../../src/compute/instance-locks.js';
import { InstanceBusy, InvalidInstanceId } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { selfIdentity } from '../../src/util/process-identity.js';

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0)) await c();
});

async function setup() {
  const tmp = await dir({ unsafeCleanup: true });
  cleanups.push(() => tmp.cleanup());
  return { locksDir: path.join(tmp.path, 'locks'), locks: new InstanceLocks(path.join(tmp.path, 'locks'), silentLogger()) };
}

/** A lock file for `uuid` naming a running child process (another process holding the instance). */
async function heldByChild(locksDir: string, uuid: string): Promise<ChildProcess> {
  const child = spawn('sleep', ['60'], { stdio: 'ignore' });
  cleanups.push(async () => child.kill('SIGKILL'));
  const self = await selfIdentity();
  const stat = await fs.readFile(`/proc/${child.pid}/stat`, 'utf8');
  const start = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  await fs.mkdir(locksDir, { recursive: true });
  await fs.writeFile(path.join(locksDir, `${uuid}.lock`), JSON.stringify({ pid: child.pid, start, boot: self.boot, what: 'snapshot command req-x' }));
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
    setTimeout(() => {
      killed = true;
      child.kill('SIGKILL');
    }, 300);
    // The work runs only once the holder is gone.
    expect(await locks.hold(uuid, 'mine', { waitMs: 30_000 }, async () => killed)).toBe(true);
  });

  it('takes over a lock left by a process that is gone', async () => {
    const { locks, locksDir } = await setup();
    const uuid = randomUUID();
    const child = await heldByChild(locksDir, uuid);
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    expect(await locks.tryHold(uuid, 'mine', async () => 'ran')).toEqual({ value: 'ran' });
  });

  it('refuses an id that is not a uuid before touching anything', async () => {
    const { locks, locksDir } = await setup();
    await expect(locks.hold('../../etc/passwd', 'x', { waitMs: 0 }, async () => 1)).rejects.toBeInstanceOf(InvalidInstanceId);
    await expect(fs.access(locksDir)).rejects.toThrow();
  });
});
