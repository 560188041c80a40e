import { createHash } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import type { OsHashAlgo, ProgressCallback } from './types.js';

/** Read size of one pass; large so that hashing a multi-GiB image is not dominated by syscalls. */
export const HASH_CHUNK_BYTES = 4 * 1024 * 1024;

export interface FileDigests {
  /** md5 hex (Glance `checksum`). */
  md5: string;
  /** Hex digest with the os_hash_algo (Glance `os_hash_value`). */
  osHash: string;
  /** Bytes read (the apparent size; holes read as zeros). */
  bytes: number;
}

/**
 * Computes md5 and the os_hash of an open file in ONE read pass from offset 0 to end of file.
 * The next chunk is read while the current one is hashed (two buffers), so disk and CPU overlap.
 * `expectedBytes` only scales the progress fraction.
 */
export async function digestFile(
  fh: FileHandle,
  osHashAlgo: OsHashAlgo,
  opts: { expectedBytes?: number; onProgress?: ProgressCallback; chunkBytes?: number } = {},
): Promise<FileDigests> {
  const chunk = opts.chunkBytes ?? HASH_CHUNK_BYTES;
  const md5 = createHash('md5');
  const os = createHash(osHashAlgo);
  const buffers = [Buffer.allocUnsafe(chunk), Buffer.allocUnsafe(chunk)];
  const total = opts.expectedBytes ?? 0;
  let position = 0;
  let lastReported = -1;
  let turn = 0;
  let pending = fh.read(buffers[0]!, 0, chunk, 0);
  for (;;) {
    const { bytesRead, buffer } = await pending;
    if (bytesRead === 0) break;
    position += bytesRead;
    turn ^= 1;
    pending = fh.read(buffers[turn]!, 0, chunk, position);
    const data = buffer.subarray(0, bytesRead);
    md5.update(data);
    os.update(data);
    if (opts.onProgress && total > 0) {
      const fraction = Math.min(1, position / total);
      if (fraction - lastReported >= 0.01) {
        lastReported = fraction;
        opts.onProgress(fraction);
      }
    }
  }
  if (opts.onProgress && lastReported < 1) opts.onProgress(1);
  return { md5: md5.digest('hex'), osHash: os.digest('hex'), bytes: position };
}
