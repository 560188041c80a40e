import { mkdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { isErrno, unlinkIfExists, writeFileAtomic } from './durable-fs.js';
import { isRunning, selfIdentity, type ProcessIdentity } from './process-identity.js';

/** Who holds a lock: the process, and what it said it is doing. */
export type LockHolder = ProcessIdentity & { what?: string };

/**
 * A lock file naming the process that holds it (its ProcessIdentity, and what it does). One left by a
 * process that is gone (killed, crashed) is stale and taken over. Held by `serve` on
 * `<state_path>/agent.lock`, and by whoever works on an instance on `<state_path>/locks/<uuid>.lock`.
 */
export class PidLock {
  private held = false;

  constructor(
    readonly file: string,
    private readonly what?: string,
  ) {}

  /** The process holding the lock now, if it is running. */
  async holder(): Promise<LockHolder | undefined> {
    let owner: LockHolder;
    try {
      owner = JSON.parse(await readFile(this.file, 'utf8')) as LockHolder;
    } catch (err) {
      if (isErrno(err, 'ENOENT') || err instanceof SyntaxError) return undefined;
      throw err;
    }
    if (typeof owner?.pid !== 'number') return undefined;
    if (owner.pid === process.pid && this.held) return owner;
    return (await isRunning(owner)) ? owner : undefined;
  }

  /** Takes the lock; resolves with the running process holding it instead, if there is one. */
  async acquire(): Promise<LockHolder | undefined> {
    await mkdir(path.dirname(this.file), { recursive: true, mode: 0o700 });
    const me: LockHolder = { ...(await selfIdentity()), ...(this.what !== undefined && { what: this.what }) };
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        await writeFileAtomic(this.file, `${JSON.stringify(me)}\n`, { mode: 0o600, exclusive: true });
        this.held = true;
        return undefined;
      } catch (err) {
        if (!isErrno(err, 'EEXIST')) throw err;
      }
      const holder = await this.holder();
      if (holder !== undefined) return holder;
      await unlinkIfExists(this.file); // stale: its process is gone
    }
    throw new Error(`cannot take the lock ${this.file}: it keeps being re-created`);
  }

  async release(): Promise<void> {
    if (!this.held) return;
    this.held = false;
    await unlinkIfExists(this.file);
  }
}
