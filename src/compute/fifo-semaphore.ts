/** A counting semaphore whose waiters are served strictly in arrival order. */
export class FifoSemaphore {
  private inUse = 0;
  private readonly waiters: Array<() => void> = [];

  constructor(readonly limit: number) {
    if (!Number.isSafeInteger(limit) || limit < 1) throw new RangeError(`semaphore limit must be an integer >= 1, got ${limit}`);
  }

  /** Holders right now. */
  get active(): number {
    return this.inUse;
  }

  /** Callers waiting for a slot. */
  get waiting(): number {
    return this.waiters.length;
  }

  /** Resolves with a release function once a slot is free; call it exactly once (extra calls are ignored). */
  acquire(): Promise<() => void> {
    return new Promise((resolve) => {
      const grant = () => {
        this.inUse += 1;
        let released = false;
        resolve(() => {
          if (released) return;
          released = true;
          this.release();
        });
      };
      // Never jump the queue: a free slot goes to the oldest waiter first.
      if (this.inUse < this.limit && this.waiters.length === 0) grant();
      else this.waiters.push(grant);
    });
  }

  async run<T>(task: () => Promise<T>): Promise<T> {
    const release = await this.acquire();
    try {
      return await task();
    } finally {
      release();
    }
  }

  private release(): void {
    this.inUse -= 1;
    const next = this.waiters.shift();
    if (next) next();
  }
}
