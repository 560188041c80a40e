import { createHash } from 'node:crypto';

/** An internal snapshot of a fake disk: a frozen copy of the active layer. */
export interface FakeSnapshot {
  id: string;
  data: Buffer;
  dateSec: number;
}

const BLOCK = 512;
export const MIN_DISK_BYTES = 2 * BLOCK;
export const MAX_DISK_BYTES = 16 * 1024 * 1024;
export const DEFAULT_DISK_BYTES = 64 * 1024;

/** Size of a fake disk: the spec's size rounded up to whole blocks, the default when unset or too big. */
export function fakeDiskSize(requested: number | undefined, fallback = DEFAULT_DISK_BYTES): number {
  const bytes = requested === undefined || requested > MAX_DISK_BYTES ? fallback : requested;
  return Math.max(MIN_DISK_BYTES, Math.ceil(bytes / BLOCK) * BLOCK);
}

/**
 * The in-memory disk of a fake instance: an active layer that a running guest keeps writing to, and
 * its internal snapshots in creation order. It remembers a hash of every state the active layer has
 * been in, so a test can check that an export is the disk as of exactly one moment.
 */
export class FakeDisk {
  active: Buffer;
  readonly snapshots = new Map<string, FakeSnapshot>();
  private readonly pastStates = new Set<string>();

  constructor(sizeBytes: number) {
    this.active = Buffer.alloc(sizeBytes);
    this.rememberState();
  }

  /**
   * One write of a running guest: bump the 64-bit counter at offset 0 and write a block derived from
   * it at an offset that rotates over the rest of the disk.
   */
  guestTick(): void {
    const counter = this.active.readBigUInt64LE(0) + 1n;
    this.active.writeBigUInt64LE(counter, 0);
    const blocks = Math.floor(this.active.length / BLOCK);
    const offset = BLOCK * (1 + Number(counter % BigInt(blocks - 1)));
    this.active.writeBigUInt64LE(counter, offset);
    const seed = Number(counter & 0xffn);
    for (let i = 8; i < BLOCK; i++) this.active[offset + i] = (seed * 131 + i * 7) & 0xff;
    this.rememberState();
  }

  write(offset: number, data: Buffer): void {
    if (!Number.isInteger(offset) || offset < 0 || offset + data.length > this.active.length) {
      throw new RangeError(`write of ${data.length} bytes at ${offset} is outside the ${this.active.length}-byte disk`);
    }
    data.copy(this.active, offset);
    this.rememberState();
  }

  /** Like qcow2: the new snapshot's id is one more than the highest id in use. */
  addSnapshot(name: string, dateSec: number): FakeSnapshot {
    let maxId = 0;
    for (const s of this.snapshots.values()) maxId = Math.max(maxId, Number(s.id));
    const snap: FakeSnapshot = { id: String(maxId + 1), data: Buffer.from(this.active), dateSec };
    this.snapshots.set(name, snap);
    return snap;
  }

  /** Total bytes held: active layer plus every snapshot. */
  storedBytes(): number {
    let total = this.active.length;
    for (const s of this.snapshots.values()) total += s.data.length;
    return total;
  }

  /** True if `data` equals the active layer as it was at some moment. */
  wasState(data: Buffer): boolean {
    return this.pastStates.has(hash(data));
  }

  private rememberState(): void {
    this.pastStates.add(hash(this.active));
  }
}

function hash(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}
