import type { Hypervisor } from '../hypervisor/types.js';
import type { GuestConsole } from './console.js';

/** Boot of the test guest under TCG: 3.5–6 s alone on 2 cores, longer beside other guests. */
export const BOOT_TIMEOUT_MS = 90_000;
const AGENT_PING_MS = 3_000;
const RETRY_MS = 200;

/**
 * Waits until the test guest has booted (`GUEST ready` after the console mark `from`) and its guest
 * agent answers; rejects at once when the guest reports a boot error.
 */
export async function waitForGuestReady(hv: Hypervisor, uuid: string, console: GuestConsole, from = 0, timeoutMs = BOOT_TIMEOUT_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  await console.waitFor(from, '"GUEST ready"', timeoutMs, (ev) => ev.find((e) => e.kind === 'guest-ready'));
  while (!(await hv.guestAgentAvailable(uuid, AGENT_PING_MS))) {
    if (Date.now() > deadline) throw new Error(`the guest agent of instance ${uuid} did not answer within ${timeoutMs} ms of its start`);
    await new Promise((r) => setTimeout(r, RETRY_MS));
  }
}
