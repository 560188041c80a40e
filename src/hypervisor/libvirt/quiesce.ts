import { errorMessage, GuestAgentError, LibvirtError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { processHoldsDisk } from '../types.js';
import type { LibvirtDomains } from './domains.js';
import type { Virsh } from './virsh.js';

/**
 * The guest agent through libvirt, which owns its channel: `qemu-agent-command` (guest-ping) to ask
 * whether one answers, `domfsfreeze` / `domfsthaw`. libvirt knows whether the guest's agent is
 * connected and refuses at once when it is not.
 */

export interface AgentContext {
  domains: LibvirtDomains;
  virsh: Virsh;
  log: Logger;
}

/** virsh's own process on top of the agent's answer. */
const VIRSH_MARGIN_MS = 5_000;

export async function guestAgentAvailable(ctx: AgentContext, uuid: string, timeoutMs: number): Promise<boolean> {
  const d = await ctx.domains.probe(uuid);
  if (!processHoldsDisk(d.state)) return false;
  try {
    const seconds = String(Math.max(1, Math.ceil(timeoutMs / 1000)));
    await ctx.virsh.run(['qemu-agent-command', d.uuid, '{"execute":"guest-ping"}', '--timeout', seconds], {
      uuid: d.uuid,
      timeoutMs: timeoutMs + VIRSH_MARGIN_MS,
    });
    return true;
  } catch (err) {
    if (!(err instanceof LibvirtError)) throw err;
    ctx.log.debug({ instance_uuid: d.uuid, err: err.message }, 'no guest agent');
    return false;
  }
}

/** The count in "Froze 2 filesystem(s)" / "Thawed 0 filesystem(s)". */
function count(out: string, command: string): number {
  const m = /(\d+) filesystem/.exec(out);
  if (!m) throw new GuestAgentError(`virsh ${command} printed no filesystem count: ${out.trim().slice(0, 200)}`);
  return Number(m[1]);
}

async function agentCommand(ctx: AgentContext, uuid: string, command: 'domfsfreeze' | 'domfsthaw', timeoutMs: number): Promise<number> {
  try {
    return count(await ctx.virsh.run([command, uuid], { uuid, timeoutMs: timeoutMs + VIRSH_MARGIN_MS, verbose: true }), command);
  } catch (err) {
    if (err instanceof LibvirtError) throw new GuestAgentError(`guest agent of domain ${uuid}: ${err.message}`, { cause: err });
    throw err;
  }
}

export async function freezeFilesystems(ctx: AgentContext, uuid: string, timeoutMs: number): Promise<number> {
  const d = await ctx.domains.requireActive(uuid, 'freeze the guest filesystems');
  try {
    return await agentCommand(ctx, d.uuid, 'domfsfreeze', timeoutMs);
  } catch (err) {
    // A freeze that failed may have frozen some filesystems, or all of them late: never leave a guest
    // frozen behind a failed freeze. Thawing filesystems that are not frozen is harmless.
    const thawed = await thawFilesystems(ctx, d.uuid, timeoutMs).then(
      (n) => `thawed ${n} afterwards`,
      (e: unknown) => `the thaw afterwards failed too, the guest may stay frozen: ${errorMessage(e)}`,
    );
    throw new GuestAgentError(`${errorMessage(err)} (${thawed})`, { cause: err });
  }
}

export async function thawFilesystems(ctx: AgentContext, uuid: string, timeoutMs: number): Promise<number> {
  const d = await ctx.domains.requireActive(uuid, 'thaw the guest filesystems');
  return agentCommand(ctx, d.uuid, 'domfsthaw', timeoutMs);
}
