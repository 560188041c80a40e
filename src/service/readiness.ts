/** What `/readyz` answers (SPEC §9). */
export type ReadyState = { ready: true } | { ready: false; reason: string };

/** Reasons `/readyz` gives, stable for probes and alerts. */
export const NOT_READY = {
  recovering: 'start-up recovery not finished',
  brokerDown: 'broker disconnected',
  stopping: 'stopping',
} as const;

/**
 * Whether a serving agent is ready: once start-up recovery is done (the operations a crash
 * interrupted recovered, and the requests its journal held carried out) and the broker connection
 * is up; not while the broker is down, nor once it is stopping.
 */
export class Readiness {
  /** recovering: interrupted operations; starting: the journal's requests (which need the broker). */
  private phase: 'recovering' | 'starting' | 'serving' | 'stopping' = 'recovering';
  private brokerUp = false;

  /** The operations a crash interrupted are recovered (the journal's requests come next). */
  recovered(): void {
    if (this.phase === 'recovering') this.phase = 'starting';
  }

  /** Start-up recovery and the journal's requests are done; the RPC server consumes. */
  serving(): void {
    if (this.phase === 'recovering' || this.phase === 'starting') this.phase = 'serving';
  }

  broker(up: boolean): void {
    this.brokerUp = up;
  }

  stopping(): void {
    this.phase = 'stopping';
  }

  state(): ReadyState {
    if (this.phase === 'stopping') return { ready: false, reason: NOT_READY.stopping };
    if (this.phase === 'recovering') return { ready: false, reason: NOT_READY.recovering };
    if (!this.brokerUp) return { ready: false, reason: NOT_READY.brokerDown };
    if (this.phase === 'starting') return { ready: false, reason: NOT_READY.recovering };
    return { ready: true };
  }
}
