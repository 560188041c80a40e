import { GuestAgentError, errorMessage } from '../../errors.js';
import type { QemuGuests } from './guests.js';
import { fsCount, withGuestAgent } from './guest-agent.js';
import { GUEST_AGENT_CHARDEV } from './launch.js';
import type { InstanceLayout } from './layout.js';

/**
 * Quiescing a guest of the qemu backend through its QEMU guest agent: whether one answers, freezing
 * and thawing the guest's filesystems. (The agent's protocol client is guest-agent.ts.)
 */

/**
 * Where the guest agent of an instance is reached when not at its default `<instance dir>/qga.sock`
 * (tests point it elsewhere); undefined: the default.
 */
export type AgentSocketOverride = ((uuid: string) => string) | undefined;

export async function guestAgentAvailable(
  g: QemuGuests,
  uuid: string,
  timeoutMs: number,
  socketOverride: AgentSocketOverride,
): Promise<boolean> {
  const { layout, pid } = await g.probeProcess(uuid);
  if (pid === undefined) return false;
  // As libvirt does: no agent in the guest has the port open, so nothing can answer; asking would
  // only wait out the timeout. (A test-provided agent socket has no such port to ask about.)
  if (socketOverride === undefined && !(await guestAgentPortOpen(g, layout))) {
    g.log.debug({ instance_uuid: layout.uuid }, 'no guest agent: the guest has not opened its channel');
    return false;
  }
  try {
    await withGuestAgent(agentSocket(layout, socketOverride), timeoutMs, 'reach the guest agent', async () => undefined);
    return true;
  } catch (err) {
    if (!(err instanceof GuestAgentError)) throw err;
    g.log.debug({ instance_uuid: layout.uuid, err: err.message }, 'no guest agent');
    return false;
  }
}

export async function freezeFilesystems(
  g: QemuGuests,
  uuid: string,
  timeoutMs: number,
  socketOverride: AgentSocketOverride,
): Promise<number> {
  const { layout } = await g.requireProcess(uuid, 'freeze the guest filesystems');
  const socket = agentSocket(layout, socketOverride);
  let sent = false;
  try {
    return await withGuestAgent(socket, timeoutMs, `freeze the filesystems of instance ${layout.uuid}`, async (agent) => {
      sent = true;
      return fsCount('guest-fsfreeze-freeze', await agent.execute('guest-fsfreeze-freeze', undefined, timeoutMs));
    });
  } catch (err) {
    if (!sent) throw err;
    // A freeze that got no answer may still happen (or have half happened): never leave a guest
    // frozen behind a failed freeze. Thawing filesystems that are not frozen is harmless. The
    // agent answers nothing before it is done freezing, hence the longer wait.
    const thawed = await thawFilesystems(g, uuid, 2 * timeoutMs, socketOverride).then(
      (n) => `thawed ${n} afterwards`,
      (e: unknown) => `the thaw afterwards failed too, the guest may stay frozen: ${errorMessage(e)}`,
    );
    throw new GuestAgentError(`${errorMessage(err)} (${thawed})`, { cause: err });
  }
}

export async function thawFilesystems(
  g: QemuGuests,
  uuid: string,
  timeoutMs: number,
  socketOverride: AgentSocketOverride,
): Promise<number> {
  const { layout } = await g.requireProcess(uuid, 'thaw the guest filesystems');
  const socket = agentSocket(layout, socketOverride);
  return withGuestAgent(socket, timeoutMs, `thaw the filesystems of instance ${layout.uuid}`, async (agent) =>
    fsCount('guest-fsfreeze-thaw', await agent.execute('guest-fsfreeze-thaw', undefined, timeoutMs)),
  );
}

/** Whether the guest has opened the agent's virtio-serial port (QMP query-chardev `frontend-open`). */
async function guestAgentPortOpen(g: QemuGuests, layout: InstanceLayout): Promise<boolean> {
  const chardevs = await g.withQmp(layout, (qmp) => qmp.execute<{ label: string; 'frontend-open'?: boolean }[]>('query-chardev'));
  return chardevs.find((c) => c.label === GUEST_AGENT_CHARDEV)?.['frontend-open'] === true;
}

function agentSocket(layout: InstanceLayout, socketOverride: AgentSocketOverride): string {
  return socketOverride?.(layout.uuid) ?? layout.guestAgentSocket;
}
