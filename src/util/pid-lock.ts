import { spawn } from 'node:child_process';
import { constants, lstat, mkdir, open, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { isErrno } from './durable-fs.js';
import { isRunning, selfIdentity, type ProcessIdentity } from './process-identity.js';

/** Who holds a lock: the process, and what it said it is doing. */
export type LockHolder = ProcessIdentity & { what?: string };

/** The program that applies flock(2) for us: Node has no API for it (util-linux `flock`, or busybox's). */
export const FLOCK_PROGRAM = 'flock';

/** How long a lock the kernel says is held may go without naming a running holder before it is reported unknown. */
const NAME_WAIT_MS = 1000;
const NAME_POLL_MS = 10;

export interface WaitOptions {
  /** Give up after this long (undefined: wait as long as it takes). */
  timeoutMs?: number;
  /** Called once, with the holder at that moment, when the lock is held by another and the wait begins. */
  onWait?: (holder: LockHolder) => void;
}

/**
 * A lock the kernel arbitrates: an exclusive flock(2) on an open file, `file`. The kernel grants it
 * to one open file at a time and drops it when that file is closed — by release(), or by the kernel
 * itself when the process ends in any way (SIGKILL, a crash): a lock left by a dead process is free
 * at once, and there is nothing to "break". Node has no flock binding and we take no native addon,
 * so the flock(2) call is made by the small `flock` program on a copy of our file descriptor (the
 * same open file: the lock is ours, not the helper's, and stays ours after the helper has exited).
 *
 * The file also names its holder (JSON: its ProcessIdentity and `what`), written once it holds the
 * lock: that is for people and messages only, never what decides who holds it. On release the holder
 * removes the file while it still holds the lock (a taker that opened the file before checks, once
 * it holds the lock, that the path still names the file it locked, and starts again if not).
 *
 * Held by `serve` on `<state_path>/agent.lock`, by whoever works on an instance on
 * `<state_path>/locks/<uuid>.lock`, and by the image store around each change of an image.
 * Within one process, two PidLock objects on the same file exclude each other too.
 */
export class PidLock {
  private fh: FileHandle | undefined;
  private me: LockHolder | undefined;

  constructor(
    readonly file: string,
    private readonly what?: string,
  ) {}

  /** Whether this object holds the lock. */
  get held(): boolean {
    return this.fh !== undefined;
  }

  /** The process holding the lock now (as its file names it), if anyone does. */
  async holder(): Promise<LockHolder | undefined> {
    if (this.fh !== undefined) return this.identity();
    const fh = await openLockFile(this.file, false);
    if (fh === undefined) return undefined; // no file: nobody holds it
    try {
      // Taken for a moment to ask the kernel; closing the file gives it back.
      if (await flockFd(fh, 'try')) return undefined;
      return await nameOf(fh, this.file);
    } finally {
      await fh.close();
    }
  }

  /**
   * Takes the lock. Without `wait`: resolves with the holder instead if another open file holds it
   * (another process, or another PidLock of this one). With `wait`: waits until it is free (rejects
   * with LockTimeout after `wait.timeoutMs`), and always resolves with undefined, holding it.
   * A PidLock that holds the lock already resolves with its own identity (it does not nest).
   */
  async acquire(opts: { wait?: WaitOptions } = {}): Promise<LockHolder | undefined> {
    if (this.fh !== undefined) return this.identity();
    await mkdir(path.dirname(this.file), { recursive: true, mode: 0o700 });
    const me = await this.identity();
    const deadline = opts.wait?.timeoutMs === undefined ? undefined : Date.now() + opts.wait.timeoutMs;
    let toldWaiting = false;
    for (;;) {
      const fh = (await openLockFile(this.file, true))!;
      let keep = false;
      try {
        let got = await flockFd(fh, 'try');
        if (!got) {
          const holder = await nameOf(fh, this.file);
          if (opts.wait === undefined) return holder;
          if (!toldWaiting) {
            toldWaiting = true;
            opts.wait.onWait?.(holder);
          }
          const left = deadline === undefined ? undefined : deadline - Date.now();
          if (left !== undefined && left <= 0) throw new LockTimeout(this.file, holder);
          got = await flockFd(fh, 'wait', left);
          if (!got) throw new LockTimeout(this.file, (await nameOf(fh, this.file).catch(() => undefined)) ?? holder);
        }
        // Ours, if the path still names the file we locked (its holder removes it on release).
        if (!(await namesSameFile(this.file, fh))) continue;
        await writeName(fh, me);
        keep = true;
        this.fh = fh;
        return undefined;
      } finally {
        if (!keep) await fh.close();
      }
    }
  }

  /** Gives the lock back, if this object holds it; never touches a lock or a file someone else holds. */
  async release(): Promise<void> {
    const fh = this.fh;
    if (fh === undefined) return;
    this.fh = undefined;
    try {
      // Still ours while the file is open: remove its name first, if it is still the file we locked.
      if (await namesSameFile(this.file, fh)) await unlink(this.file).catch((err: unknown) => (isErrno(err, 'ENOENT') ? undefined : Promise.reject(err)));
    } finally {
      await fh.close(); // the kernel drops the lock here
    }
  }

  private async identity(): Promise<LockHolder> {
    this.me ??= { ...(await selfIdentity()), ...(this.what !== undefined && { what: this.what }) };
    return this.me;
  }
}

/** Waiting for a lock took longer than allowed. */
export class LockTimeout extends Error {
  constructor(
    readonly file: string,
    readonly holder: LockHolder,
  ) {
    super(`lock ${file} is still held by process ${holder.pid} (${holder.what ?? 'unknown operation'})`);
    this.name = 'LockTimeout';
  }
}

/** Opens (with `create`: creates, 0600) the lock file, never following a symlink; undefined if absent and not created. */
async function openLockFile(file: string, create: boolean): Promise<FileHandle | undefined> {
  try {
    // Node opens files close-on-exec: no program we start (a daemonized QEMU) inherits the lock.
    return await open(file, constants.O_RDWR | constants.O_NOFOLLOW | (create ? constants.O_CREAT : 0), 0o600);
  } catch (err) {
    if (!create && isErrno(err, 'ENOENT')) return undefined;
    throw err;
  }
}

async function namesSameFile(file: string, fh: FileHandle): Promise<boolean> {
  const [mine, named] = await Promise.all([
    fh.stat(),
    lstat(file).catch((err: unknown) => (isErrno(err, 'ENOENT') ? undefined : Promise.reject(err))),
  ]);
  return named !== undefined && named.ino === mine.ino && named.dev === mine.dev;
}

/**
 * Writes our name into the lock file we hold: first line JSON (a reader never needs more than the
 * first line). The name is for messages only: on a full filesystem (where a store must still be
 * able to kill an image and free its partial data) the lock is held without it.
 */
async function writeName(fh: FileHandle, me: LockHolder): Promise<void> {
  const text = `${JSON.stringify(me)}\n`;
  await fh.chmod(0o600); // the create mode is filtered by the umask
  try {
    await fh.write(text, 0, 'utf8');
    await fh.truncate(Buffer.byteLength(text));
  } catch (err) {
    if (!isErrno(err, 'ENOSPC') && !isErrno(err, 'EDQUOT')) throw err;
    await fh.truncate(0).catch(() => undefined);
  }
}

/**
 * The holder a lock file names, for a lock the kernel says is held. Its holder writes its name right
 * after taking it; until then the file may be empty or still name an earlier, gone holder: read
 * again for a moment. A holder that never names itself (someone's `flock` from a shell) is reported
 * as unknown, pid 0.
 */
async function nameOf(fh: FileHandle, file: string): Promise<LockHolder> {
  const deadline = Date.now() + NAME_WAIT_MS;
  for (;;) {
    const named = await readName(fh);
    if (named !== undefined && (await isRunning(named))) return named;
    if (Date.now() >= deadline) return { pid: 0, start: null, boot: null, what: `unknown: ${file} does not name a running holder` };
    await new Promise((r) => setTimeout(r, NAME_POLL_MS));
  }
}

async function readName(fh: FileHandle): Promise<LockHolder | undefined> {
  const buf = Buffer.alloc(4096);
  const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
  const line = buf.subarray(0, bytesRead).toString('utf8').split('\n')[0] ?? '';
  try {
    const v = JSON.parse(line) as LockHolder;
    return typeof v === 'object' && v !== null && typeof v.pid === 'number' ? v : undefined;
  } catch {
    return undefined;
  }
}

/**
 * flock(LOCK_EX) on our open file `fh`, applied by the `flock` program on a copy of its descriptor
 * (the same open file description, so the lock is ours). `try`: not waiting (false if another open
 * file holds it). `wait`: waiting, at most `timeoutMs` (false when that ran out). The program is
 * started with an argument vector, never through a shell.
 */
function flockFd(fh: FileHandle, mode: 'try' | 'wait', timeoutMs?: number): Promise<boolean> {
  const args = mode === 'try' ? ['--exclusive', '--nonblock', '3'] : ['--exclusive', '3'];
  return new Promise((resolve, reject) => {
    const child = spawn(FLOCK_PROGRAM, args, { stdio: ['ignore', 'ignore', 'pipe', fh.fd] });
    let stderr = '';
    let timedOut = false;
    const timer =
      timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            child.kill('SIGKILL');
          }, Math.max(0, timeoutMs));
    child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(
        isErrno(err, 'ENOENT')
          ? new Error(`cannot take locks: the ${FLOCK_PROGRAM} program (util-linux) is not installed or not on PATH`, { cause: err })
          : err,
      );
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      // Killed while waiting: the kernel may just have granted the lock to our open file; the
      // caller closes the file, which gives it back.
      if (timedOut) return resolve(false);
      if (code === 0) return resolve(true);
      if (code === 1 && mode === 'try') return resolve(false); // held by another open file
      reject(new Error(`${FLOCK_PROGRAM} ${args.join(' ')} failed (${code ?? signal}): ${stderr.trim()}`));
    });
  });
}
