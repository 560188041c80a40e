import type { PowerState, ResumeResult, SaveResult } from '../hypervisor/types.js';

/** One managed save of an operation, open until the guest is resumed. */
export interface SuspendWindow {
  /** performance.now() when the save was asked for. */
  wallStartedAt: number;
  /** What the save reported, if it finished. */
  save?: SaveResult;
}

/**
 * Guest downtime of one suspend → resume window, in ms: how long the guest's vCPUs did not run.
 * A guest that was paused before had stopped vCPUs anyway: 0. When the hypervisor reports when the
 * vCPUs stopped and ran again, their difference; otherwise the wall-clock window from asking for
 * the save to the end of the resume.
 */
export function windowDowntimeMs(
  window: SuspendWindow,
  priorState: PowerState,
  resumed: ResumeResult | undefined,
  wallEndedAt: number,
): number {
  if ((window.save?.priorState ?? priorState) === 'paused') return 0;
  const stoppedAt = window.save?.vcpusStoppedAt;
  const resumedAt = resumed?.vcpusResumedAt;
  if (stoppedAt !== undefined && resumedAt !== undefined) return Math.max(0, resumedAt - stoppedAt);
  return Math.max(0, wallEndedAt - window.wallStartedAt);
}
