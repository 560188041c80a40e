import { type FileHandle, open, truncate, writeFile } from 'node:fs/promises';
import { setImmediate as nextTurn } from 'node:timers/promises';

/** One live backup job of the fake, as a test sees it (`FakeHypervisor.liveBackups`). */
export interface FakeBackupRecord {
  readonly uuid: string;
  /** The target file. */
  readonly dest: string;
  /** The store's receiver the data goes to (then the fake does not touch the file itself). */
  readonly sink?: { put(offset: number, data: Buffer): Promise<void> };
  /** The fake's clock at the start. */
  readonly startedAt: number;
  /** The active layer as it was when the job started: what the target must end up holding. */
  readonly pointInTime: Buffer;
  status: 'running' | 'completed' | 'cancelled' | 'failed';
}

const CHUNKS = 4;

/** Creates the job's target as QEMU's target node would be: a sparse raw file of the disk's size. */
export async function createTarget(dest: string, bytes: number): Promise<void> {
  await writeFile(dest, Buffer.alloc(0), { mode: 0o640 });
  await truncate(dest, bytes);
}

/**
 * Copies `data` into the existing target in a few chunks, a turn of the event loop apart, skipping
 * all-zero chunks (the target stays sparse there). `between` runs after each chunk (the guest writes
 * meanwhile) and throws to stop the copy. The target is opened without O_CREAT, as QEMU holds an
 * open file: a target removed meanwhile is not brought back.
 */
export async function copyIntoTarget(
  data: Buffer,
  dest: string | { put(offset: number, data: Buffer): Promise<void> },
  between: () => void,
  onProgress?: (fraction: number) => void,
): Promise<void> {
  let fh: FileHandle | undefined;
  let write: (offset: number, chunk: Buffer) => Promise<unknown>;
  if (typeof dest === 'string') {
    const file = (fh = await open(dest, 'r+'));
    write = (offset, chunk) => file.write(chunk, 0, chunk.length, offset);
  } else {
    write = (offset, chunk) => dest.put(offset, Buffer.from(chunk));
  }
  try {
    const step = Math.ceil(data.length / CHUNKS);
    for (let off = 0; off < data.length; off += step) {
      const end = Math.min(off + step, data.length);
      const chunk = data.subarray(off, end);
      if (chunk.some((b) => b !== 0)) await write(off, chunk);
      onProgress?.(end / data.length);
      between();
      await nextTurn();
    }
    await fh?.sync();
  } finally {
    await fh?.close();
  }
}
