/**
 * Deleting a multi-GiB image on a filesystem mounted with `discard` (ext4 here) sends the device a
 * discard of every freed extent when the journal next commits (at once here: the guest's fsyncs
 * commit it), about 100 ms of 1 GiB of discards that the guest's fsyncs wait behind. A bench that deletes the previous run's image must let that happen
 * outside the next window it measures, or the deletion is charged to the next snapshot (as it was:
 * two 50–80 ms fsyncs about 3 s after each run).
 */
import fs from 'node:fs/promises';

const SETTLE_QUIET_MS = 500;
const SETTLE_MAX_MS = 15_000;

/** The device's /sys stat file (`<major>:<minor>`; a partition's has the same fields). */
function statFileOf(dev: number): string {
  const major = Number((BigInt(dev) >> 8n) & 0xfffn) | Number((BigInt(dev) >> 32n) & ~0xfffn);
  const minor = Number(BigInt(dev) & 0xffn) | Number((BigInt(dev) >> 12n) & ~0xffn);
  return `/sys/dev/block/${major}:${minor}/stat`;
}

/** In-flight requests and discarded sectors so far (undefined: the kernel has no discard fields). */
async function readStat(file: string): Promise<{ inFlight: number; discarded: number } | undefined> {
  const f = (await fs.readFile(file, 'utf8')).trim().split(/\s+/).map(Number);
  if (f.length < 15) return undefined;
  return { inFlight: f[8]!, discarded: f[13]! };
}

/** Removes `remove`'s files, commits the filesystem of `dir`, and waits until its device is quiet. */
export async function deleteAndSettle(dir: string, remove: () => Promise<void>): Promise<void> {
  await remove();
  const fh = await fs.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
  const file = statFileOf((await fs.stat(dir)).dev);
  // No block device (the store in memory: tmpfs): nothing is discarded.
  if (!(await fs.access(file).then(() => true, () => false))) return;
  const deadline = Date.now() + SETTLE_MAX_MS;
  let last = await readStat(file);
  if (last === undefined) return;
  let quietSince = Date.now();
  while (Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    const now = (await readStat(file))!;
    if (now.discarded !== last.discarded || now.inFlight > 0) quietSince = Date.now();
    last = now;
    if (Date.now() - quietSince >= SETTLE_QUIET_MS) return;
  }
  throw new Error(`the store's device (${file}) was still busy ${SETTLE_MAX_MS} ms after deleting an image`);
}
