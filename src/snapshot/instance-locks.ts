import path from 'node:path';
import { InstanceBusy, InvalidInstanceId } from '../errors.js';
import type { Logger } from '../log.js';
import { LockTimeout, PidLock, type LockHolder } from '../util/pid-lock.js';
import { isUuid } from '../util/uuid.js';

const LOG_EVERY_MS = 30_000;

/**
 * One process at a time works on an instance (as libvirt's per-domain job lock does for its clients):
 * the agent's operations, the command line's power operations and snapshots, and recovery take
 * `<state_path>/locks/<uuid>.lock` for their whole length, so that a managed save of the agent's
 * never meets a `stop` typed by an operator. Within one process the compute manager's per-instance
 * queue already orders operations; this lock orders processes.
 */
export class InstanceLocks {
  constructor(
    readonly dir: string,
    private readonly log: Logger,
  ) {}

  /**
   * Runs `fn` holding the instance's lock. If another running process holds it, waits for it up to
   * `waitMs` (0: not at all), then throws InstanceBusy naming that process and what it does. The wait
   * is logged on `opts.log` (the operation's logger) if given.
   */
  async hold<T>(uuid: string, what: string, opts: { waitMs: number; log?: Logger }, fn: () => Promise<T>): Promise<T> {
    const lock = await this.acquire(uuid, what, opts.waitMs, opts.log ?? this.log);
    try {
      return await fn();
    } finally {
      await lock.release();
    }
  }

  /** Runs `fn` holding the lock if nobody else holds it now; undefined (and `fn` not run) if somebody does. */
  async tryHold<T>(uuid: string, what: string, fn: () => Promise<T>): Promise<{ value: T } | undefined> {
    let lock: PidLock;
    try {
      lock = await this.acquire(uuid, what, 0, this.log);
    } catch (err) {
      if (err instanceof InstanceBusy) return undefined;
      throw err;
    }
    try {
      return { value: await fn() };
    } finally {
      await lock.release();
    }
  }

  private async acquire(uuid: string, what: string, waitMs: number, log: Logger): Promise<PidLock> {
    if (!isUuid(uuid)) throw new InvalidInstanceId(uuid);
    const lock = new PidLock(path.join(this.dir, `${uuid.toLowerCase()}.lock`), what);
    if (waitMs <= 0) {
      const holder = await lock.acquire();
      if (holder !== undefined) throw busy(uuid, holder);
      return lock;
    }
    // Waiting in the kernel: woken the moment the holder releases the lock or dies.
    let holder: LockHolder | undefined;
    const logWait = () =>
      holder && log.info({ instance_uuid: uuid, holder_pid: holder.pid, holder_what: holder.what }, 'waiting for another process to finish with the instance');
    const every = setInterval(logWait, LOG_EVERY_MS);
    try {
      await lock.acquire({
        wait: {
          timeoutMs: waitMs,
          onWait: (h) => {
            holder = h;
            logWait();
          },
        },
      });
      return lock;
    } catch (err) {
      if (err instanceof LockTimeout) throw busy(uuid, err.holder);
      throw err;
    } finally {
      clearInterval(every);
    }
  }
}

function busy(uuid: string, holder: LockHolder): InstanceBusy {
  return new InstanceBusy(`instance ${uuid} is busy: process ${holder.pid} is working on it (${holder.what ?? 'unknown operation'}); try again when it has finished`);
}
