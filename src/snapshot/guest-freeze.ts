import type { Config, QuiesceMode } from '../config/schema.js';
import { errorMessage } from '../errors.js';
import type { Hypervisor } from '../hypervisor/types.js';
import type { Logger } from '../log.js';

/** `[snapshot] quiesce`, `max_freeze_seconds`, `guest_agent_timeout`, in ms. */
export interface QuiesceOptions {
  mode: QuiesceMode;
  /** Longest freeze: the filesystems are thawed when it runs out, whatever else happens. */
  maxFreezeMs: number;
  /** Timeout of each guest-agent command. */
  agentTimeoutMs: number;
}

export const DEFAULT_QUIESCE: QuiesceOptions = { mode: 'auto', maxFreezeMs: 10_000, agentTimeoutMs: 5_000 };

export function quiesceOptions(
  snapshot: Pick<Config['snapshot'], 'quiesce' | 'max_freeze_seconds' | 'guest_agent_timeout'>,
): QuiesceOptions {
  return {
    mode: snapshot.quiesce,
    maxFreezeMs: snapshot.max_freeze_seconds * 1000,
    agentTimeoutMs: snapshot.guest_agent_timeout * 1000,
  };
}

/**
 * One guest-agent filesystem freeze with a deadline: once the guest has run frozen for `maxFreezeMs`
 * since the freeze was asked for, a timer thaws it whatever the operation is doing. The time the
 * guest spends managed-saved does not count (guestStopped/guestRunning): it cannot run, nor be
 * thawed, then. thaw() may be called any number of times, also concurrently (one command at a time);
 * after a failed thaw it tries again.
 */
export class GuestFreeze {
  private askedAt?: number;
  private thawedAt?: number;
  private timer?: NodeJS.Timeout;
  /** Deadline time left while the guest is stopped (guestStopped), until it runs again. */
  private heldMs?: number;
  private deadlineAt?: number;
  private thawing?: Promise<void>;
  /** The freeze command answered success. */
  private froze = false;
  /** A thaw answered success since the freeze was asked for. */
  private thawed = false;
  /** The deadline ran out before the operation thawed the guest itself. */
  expired = false;

  constructor(
    private readonly hv: Hypervisor,
    private readonly uuid: string,
    private readonly opts: QuiesceOptions,
    private readonly log: Logger,
  ) {}

  /** Freezes; on failure the guest may still end up frozen (a freeze that timed out): thaw() then. */
  async freeze(): Promise<void> {
    this.askedAt = performance.now();
    this.armDeadline(this.opts.maxFreezeMs);
    let filesystems: number;
    try {
      filesystems = await this.hv.freezeFilesystems(this.uuid, this.opts.agentTimeoutMs);
    } finally {
      // The deadline's thaw may have reached the guest before this freeze did: thaw once more.
      if (this.thawed) {
        this.thawed = false;
        await this.thaw();
      }
    }
    this.froze = true;
    this.log.info({ filesystems }, 'guest filesystems frozen');
  }

  /** Frozen now: the freeze succeeded and no thaw has started. */
  get holding(): boolean {
    return this.froze && !this.thawed && this.thawing === undefined;
  }

  /** A freeze was asked for and no thaw has succeeded since: the guest may still be frozen. */
  get mayBeFrozen(): boolean {
    return this.askedAt !== undefined && !this.thawed;
  }

  /** How long the filesystems may have been frozen: freeze asked → thaw answered (or now), in ms. */
  get frozenMs(): number {
    if (this.askedAt === undefined) return 0;
    return (this.thawedAt ?? performance.now()) - this.askedAt;
  }

  /** The guest's vCPUs stopped (managed-saved frozen): the deadline waits until it runs again. */
  guestStopped(): void {
    if (this.askedAt === undefined || this.thawed || this.deadlineAt === undefined) return;
    clearTimeout(this.timer);
    this.heldMs = Math.max(0, this.deadlineAt - performance.now());
  }

  /** The guest runs again: the deadline goes on with the time it had left. */
  guestRunning(): void {
    if (this.heldMs === undefined) return;
    const left = this.heldMs;
    this.heldMs = undefined;
    if (!this.thawed) this.armDeadline(left);
  }

  private armDeadline(ms: number): void {
    clearTimeout(this.timer);
    this.deadlineAt = performance.now() + ms;
    this.timer = setTimeout(() => this.onDeadline(), ms);
  }

  thaw(): Promise<void> {
    if (this.askedAt === undefined || this.thawed) return Promise.resolve();
    this.thawing ??= this.hv
      .thawFilesystems(this.uuid, this.opts.agentTimeoutMs)
      .then((filesystems) => {
        // Only now: after a failed thaw the deadline still thaws (again) when it runs out.
        clearTimeout(this.timer);
        this.thawed = true;
        this.thawedAt = performance.now();
        this.log.info({ filesystems, freeze_ms: Math.round(this.frozenMs) }, 'guest filesystems thawed');
      })
      .finally(() => {
        this.thawing = undefined;
      });
    return this.thawing;
  }

  private onDeadline(): void {
    if (this.thawed) return;
    this.expired = true;
    this.log.warn({ max_freeze_ms: this.opts.maxFreezeMs }, 'guest filesystems frozen too long (max_freeze_seconds): thawing them now');
    this.thaw().catch((err: unknown) => {
      this.log.error({ err }, `thaw at max_freeze_seconds failed: ${errorMessage(err)}`);
    });
  }
}
