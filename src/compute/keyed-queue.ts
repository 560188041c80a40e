/**
 * Runs tasks one at a time per key, in the order they were submitted; tasks on different keys run
 * concurrently. A task that fails does not stop the ones queued behind it.
 */
export class KeyedQueue {
  private readonly tails = new Map<string, Promise<void>>();
  private readonly depth = new Map<string, number>();

  run<T>(key: string, task: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(key) ?? Promise.resolve();
    const result = prev.then(task);
    const tail = result.then(
      () => undefined,
      () => undefined,
    );
    this.tails.set(key, tail);
    this.depth.set(key, (this.depth.get(key) ?? 0) + 1);
    void tail.then(() => {
      const left = (this.depth.get(key) ?? 1) - 1;
      if (left === 0) {
        this.depth.delete(key);
        this.tails.delete(key);
      } else {
        this.depth.set(key, left);
      }
    });
    return result;
  }

  /** Tasks submitted for `key` that have not finished yet (running or waiting). */
  size(key: string): number {
    return this.depth.get(key) ?? 0;
  }

  /** Keys with at least one task running or waiting. */
  get activeKeys(): number {
    return this.depth.size;
  }
}
