/**
 * Issue 12 item 6: the pid lock is decided by the kernel (flock on an open file), not by reading a
 * file and unlinking it: real child processes race for it, a holder killed with SIGKILL frees it at
 * once, and release() only ever releases what this process holds.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir } from 'tmp-promise';
import { afterEach, describe, expect, it } from 'vitest';
import { PidLock } from '../../src/util/pid-lock.js';
import { selfIdentity } from '../../src/util/process-identity.js';
import { LockChild } from '../helpers/lock-child.js';

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function tmpDir(): Promise<string> {
  const t = await dir({ unsafeCleanup: true });
  cleanups.push(() => t.cleanup());
  return t.path;
}

async function children(file: string, n: number): Promise<LockChild[]> {
  const out = await Promise.all(Array.from({ length: n }, () => LockChild.start(file)));
  cleanups.push(() => Promise.all(out.map((c) => c.kill())));
  return out;
}

/** A pid that is gone: a child that has exited. */
async function deadPid(): Promise<number> {
  const child = spawn('true', [], { stdio: 'ignore' });
  await new Promise((r) => child.once('exit', r));
  return child.pid!;
}

describe('PidLock across processes', () => {
  it('processes racing for a lock whose file names a dead holder: exactly one of them holds it, every round', async () => {
    const file = path.join(await tmpDir(), 'race.lock');
    const racers = await children(file, 4);
    const me = await selfIdentity();
    const ROUNDS = 40;
    for (let round = 0; round < ROUNDS; round++) {
      // Left by a holder that died: the file is there, naming a process that is gone.
      await fs.writeFile(file, JSON.stringify({ pid: await deadPid(), start: '1', boot: me.boot }));
      for (const c of racers) c.send('acquire');
      const answers = await Promise.all(racers.map((c) => c.next()));
      const holders = racers.filter((_, i) => answers[i]!.held === true);
      expect(holders, `round ${round}: ${JSON.stringify(answers)}`).toHaveLength(1);
      // The losers were told who holds it: the winner.
      for (const a of answers) if (a.held !== true) expect((a.holder as { pid: number }).pid, `round ${round}`).toBe(holders[0]!.pid);
      expect(await holders[0]!.command('release')).toEqual({ released: true });
    }
  });

  it('processes racing for a free lock (no file): exactly one holds it, every round', async () => {
    const file = path.join(await tmpDir(), 'fresh.lock');
    const racers = await children(file, 4);
    for (let round = 0; round < 40; round++) {
      for (const c of racers) c.send('acquire');
      const answers = await Promise.all(racers.map((c) => c.next()));
      expect(answers.filter((a) => a.held === true), `round ${round}: ${JSON.stringify(answers)}`).toHaveLength(1);
      for (const [i, a] of answers.entries()) if (a.held === true) await racers[i]!.command('release');
    }
  });

  it('a holder killed with SIGKILL: the lock is free at once (no waiting, no pid check)', async () => {
    const file = path.join(await tmpDir(), 'killed.lock');
    const [holder] = await children(file, 1);
    expect(await holder!.command('acquire')).toEqual({ held: true });
    const lock = new PidLock(file);
    expect((await lock.acquire())?.pid).toBe(holder!.pid);
    expect((await lock.holder())?.pid).toBe(holder!.pid);
    await holder!.kill();
    // Its file is still there, naming it: the kernel, not the file, says the lock is free.
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toMatchObject({ pid: holder!.pid });
    expect(await lock.holder()).toBeUndefined();
    expect(await lock.acquire()).toBeUndefined();
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toEqual(await selfIdentity());
    await lock.release();
  });

  it('waiters get the lock one at a time as each holder releases it or dies', async () => {
    const file = path.join(await tmpDir(), 'wait.lock');
    const [a, b, c] = await children(file, 3);
    expect(await a!.command('acquire')).toEqual({ held: true });
    b!.send('wait');
    expect(await b!.next()).toEqual({ waiting: true });
    c!.send('wait');
    expect(await c!.next()).toEqual({ waiting: true });
    await a!.kill();
    // One of the two waiters gets it; the other keeps waiting until that one releases it.
    const bHeld = b!.next().then(() => b!);
    const cHeld = c!.next().then(() => c!);
    const first = await Promise.race([bHeld, cHeld]);
    const secondHeld = first === b ? cHeld : bHeld;
    expect((await new PidLock(file).holder())?.pid).toBe(first.pid);
    expect(await first.command('release')).toEqual({ released: true });
    const second = await secondHeld;
    expect((await new PidLock(file).acquire())?.pid).toBe(second.pid);
    expect(await first.command('acquire')).toMatchObject({ held: false, holder: { pid: second.pid } });
  });

  it('release() never releases what another process holds, even after the lock file was replaced', async () => {
    const file = path.join(await tmpDir(), 'replaced.lock');
    const mine = new PidLock(file);
    expect(await mine.acquire()).toBeUndefined();
    // Someone removes the file under us (an operator's rm), and another process takes the lock anew.
    await fs.rm(file);
    const [other, third] = await children(file, 2);
    expect(await other!.command('acquire')).toEqual({ held: true });
    await mine.release();
    // Its lock and its file are untouched: a third process is refused, and told who holds it.
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toMatchObject({ pid: other!.pid });
    expect(await third!.command('acquire')).toMatchObject({ held: false, holder: { pid: other!.pid } });
  });
});
