/** How often a held-back export looks again whether a guest still waits. */
const POLL_MS = 10;

/** One operation watched by GuestWaits. */
export interface WatchedOperation {
  /** The gate of one of this operation's background exports (GuestWaits.gate). */
  gate(): () => Promise<number>;
  /** The operation has ended: its guest waits no more. */
  end(): void;
}

/**
 * The guests of this host that wait on a snapshot operation right now: down in a managed save (its
 * save, its snapshot, its restore, cold's whole export) or frozen by its agent. Exports that no guest
 * waits for hold back while another operation's guest waits (they take no more data, so their
 * qemu-img stops reading and writing), so that the waiting guest's save, restore or freeze has the
 * host's disk and CPU to itself: two guests' snapshots at once must not lengthen each other's
 * downtime (bench:pair). They never hold back longer than `maxHoldMs` at a time, so a guest down for
 * long (a cold export of a big disk) cannot starve them, nor can anything that waits on them
 * deadlock. `maxHoldMs` 0: they never hold back.
 */
export class GuestWaits {
  private readonly operations = new Set<() => boolean>();

  constructor(readonly maxHoldMs: number) {}

  /** Watches one operation: `waits` (its guest waits now) is asked at each look until end(). */
  watch(waits: () => boolean): WatchedOperation {
    const self = (): boolean => waits(); // its own entry, even for a function watched twice
    this.operations.add(self);
    return { gate: () => this.gate(self), end: () => void this.operations.delete(self) };
  }

  /** Whether a watched operation's guest (other than `self`'s) waits now. */
  private othersWait(self: () => boolean): boolean {
    for (const waits of this.operations) if (waits !== self && waits()) return true;
    return false;
  }

  /**
   * Passed before each piece of a background export's data: resolves at once when no other guest
   * waits; else once none does, or after `maxHoldMs`, and then lets the export through until no other
   * guest waits (the next wait holds it back again). Resolves to the ms it held back (0: not at all).
   */
  private gate(self: () => boolean): () => Promise<number> {
    let overrun = false;
    return async () => {
      if (this.maxHoldMs <= 0 || !this.othersWait(self)) {
        overrun = false;
        return 0;
      }
      if (overrun) return 0;
      const started = performance.now();
      for (;;) {
        await new Promise((r) => setTimeout(r, POLL_MS));
        const held = performance.now() - started;
        if (!this.othersWait(self)) return held;
        if (held >= this.maxHoldMs) {
          overrun = true;
          return held;
        }
      }
    };
  }
}
