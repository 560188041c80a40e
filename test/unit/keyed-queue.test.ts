import { describe, expect, it } from 'vitest';
import { FifoSemaphore } from '../../src/compute/fifo-semaphore.js';
import { KeyedQueue } from '../../src/compute/keyed-queue.js';

/** A promise the test resolves by hand. */
function gate() {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

/** Lets every ready callback run (no timers involved). */
async function settle(): Promise<void> {
  for (let i = 0; i < 10; i++) await new Promise<void>((r) => setImmediate(r));
}

describe('KeyedQueue', () => {
  it('runs tasks of one key one at a time in submission order; other keys run meanwhile', async () => {
    const q = new KeyedQueue();
    const events: string[] = [];
    const gates = [gate(), gate(), gate()];
    const task = (name: string, g: { promise: Promise<void> }) => async () => {
      events.push(`start ${name}`);
      await g.promise;
      events.push(`end ${name}`);
      return name;
    };
    const a1 = q.run('a', task('a1', gates[0]!));
    const a2 = q.run('a', task('a2', gates[1]!));
    const b1 = q.run('b', task('b1', gates[2]!));
    await settle();
    expect(events).toEqual(['start a1', 'start b1']);
    expect(q.size('a')).toBe(2);
    gates[2]!.open();
    await settle();
    expect(events).toEqual(['start a1', 'start b1', 'end b1']);
    gates[1]!.open(); // a2's gate: a2 has not started, so nothing moves
    await settle();
    expect(events).toEqual(['start a1', 'start b1', 'end b1']);
    gates[0]!.open();
    expect(await Promise.all([a1, a2, b1])).toEqual(['a1', 'a2', 'b1']);
    expect(events).toEqual(['start a1', 'start b1', 'end b1', 'end a1', 'start a2', 'end a2']);
    await settle();
    expect(q.activeKeys).toBe(0);
  });

  it('goes on after a failed task', async () => {
    const q = new KeyedQueue();
    const failed = q.run('k', () => Promise.reject(new Error('boom')));
    const thrownSync = q.run('k', () => {
      throw new Error('sync');
    });
    const next = q.run('k', async () => 'next');
    await expect(failed).rejects.toThrow('boom');
    await expect(thrownSync).rejects.toThrow('sync');
    await expect(next).resolves.toBe('next');
  });
});

describe('FifoSemaphore', () => {
  it('never lets more than the limit in, and serves waiters in arrival order', async () => {
    const sem = new FifoSemaphore(2);
    const started: number[] = [];
    let running = 0;
    let maxRunning = 0;
    const gates = Array.from({ length: 6 }, () => gate());
    const all = gates.map((g, i) =>
      sem.run(async () => {
        running += 1;
        maxRunning = Math.max(maxRunning, running);
        started.push(i);
        await g.promise;
        running -= 1;
        return i;
      }),
    );
    await settle();
    expect(started).toEqual([0, 1]);
    expect(sem.waiting).toBe(4);
    // Release out of order: the freed slot still goes to the oldest waiter.
    gates[1]!.open();
    await settle();
    expect(started).toEqual([0, 1, 2]);
    gates[0]!.open();
    await settle();
    expect(started).toEqual([0, 1, 2, 3]);
    for (const g of gates) g.open();
    expect(await Promise.all(all)).toEqual([0, 1, 2, 3, 4, 5]);
    expect(started).toEqual([0, 1, 2, 3, 4, 5]);
    expect(maxRunning).toBe(2);
    expect(sem.active).toBe(0);
  });

  it('releases the slot when the task fails, and ignores a second release', async () => {
    const sem = new FifoSemaphore(1);
    await expect(sem.run(() => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    const release = await sem.acquire();
    release();
    release();
    expect(sem.active).toBe(0);
    await expect(sem.run(async () => 'ok')).resolves.toBe('ok');
  });

  it('refuses a limit below 1', () => {
    expect(() => new FifoSemaphore(0)).toThrow(RangeError);
    expect(() => new FifoSemaphore(1.5)).toThrow(RangeError);
  });
});
