import { QmpError } from '../errors.js';

/**
 * A QMP reply, `{"return": …}` or `{"error": {"class", "desc"}}`: its return value, or the QmpError it
 * carries. Shared by the qemu backend's own monitor client and the libvirt backend, whose
 * `virsh qemu-monitor-command` prints QEMU's reply (and exits 0 whether it is an error or not).
 */
export function qmpReturn(command: string, reply: Record<string, unknown>): unknown {
  if ('error' in reply) {
    const e = (reply.error ?? {}) as { class?: unknown; desc?: unknown };
    throw new QmpError(command, String(e.class ?? 'GenericError'), String(e.desc ?? ''));
  }
  return reply.return;
}
