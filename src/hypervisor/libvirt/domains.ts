import { InstanceInvalidState, InvalidInstanceId, SafetyViolation, UnsupportedInstance } from '../../errors.js';
import type { Logger } from '../../log.js';
import { isUuid } from '../../util/uuid.js';
import { processHoldsDisk, type PowerState } from '../types.js';
import { parseDomainXml, type DomainXml } from './domain-xml.js';
import { parseKeyValues, type Virsh } from './virsh.js';

/**
 * The libvirt backend's core: the operator's domains, looked up by instance uuid = domain uuid, with
 * their power state as libvirt reports it and their XML. A domain that libvirt reports active and
 * managed-saved at once (what a libvirtd killed during a save leaves: "running (save canceled)",
 * "Managed save: yes") has that stale save image removed on sight, before anything else: a later
 * start would restore old RAM over a newer disk.
 */

export interface DomainInfo {
  uuid: string;
  name: string;
  state: PowerState;
  /** Defined (not transient): only a persistent domain can be managed-saved. */
  persistent: boolean;
}

/** dominfo's State → our power state; a shut-off domain with a managed-save image is `saved`. */
export function powerStateOf(libvirtState: string, managedSave: boolean): PowerState {
  switch (libvirtState) {
    case 'running':
    case 'idle':
    case 'blocked':
    case 'in shutdown':
      return 'running';
    case 'paused':
    case 'pmsuspended':
      return 'paused';
    case 'crashed':
      return 'crashed';
    default:
      // shut off, and anything libvirt may add
      return managedSave ? 'saved' : 'shutoff';
  }
}

/** Parses `virsh dominfo`. */
export function parseDomInfo(text: string): { uuid: string; name: string; libvirtState: string; managedSave: boolean; persistent: boolean } {
  const kv = parseKeyValues(text);
  const uuid = kv.get('UUID');
  const name = kv.get('Name');
  const state = kv.get('State');
  if (uuid === undefined || name === undefined || state === undefined) throw new Error(`unexpected virsh dominfo output: ${text.slice(0, 200)}`);
  return {
    uuid: uuid.toLowerCase(),
    name,
    libvirtState: state,
    managedSave: kv.get('Managed save') === 'yes',
    persistent: kv.get('Persistent') === 'yes',
  };
}

export class LibvirtDomains {
  constructor(
    readonly virsh: Virsh,
    private readonly log: Logger,
  ) {}

  /** Throws InvalidInstanceId for a string that is not a UUID (before virsh ever sees it). */
  checkId(uuid: string): string {
    if (!isUuid(uuid)) throw new InvalidInstanceId(uuid);
    return uuid.toLowerCase();
  }

  /** The domain's state (InstanceNotFound if there is none); removes a stale managed-save image first. */
  async probe(uuid: string): Promise<DomainInfo> {
    const id = this.checkId(uuid);
    return this.settle(id, parseDomInfo(await this.virsh.run(['dominfo', id], { uuid: id })));
  }

  /**
   * probe() and the domain's XML (live while it runs, else its definition) from one virsh process:
   * each costs 60–120 ms to start, and this is asked for in steps that hold the guest down.
   */
  async probeWithXml(uuid: string): Promise<DomainInfo & { xml: DomainXml }> {
    const id = this.checkId(uuid);
    const out = await this.virsh.run([`dominfo ${id}; dumpxml ${id}`], { uuid: id });
    const at = out.indexOf('<domain');
    if (at < 0) throw new Error(`virsh dominfo; dumpxml printed no domain XML for ${id}`);
    const info = await this.settle(id, parseDomInfo(out.slice(0, at)));
    return { ...info, xml: parseDomainXml(out.slice(at)) };
  }

  private async settle(id: string, info: ReturnType<typeof parseDomInfo>): Promise<DomainInfo> {
    const active = info.libvirtState !== 'shut off' && info.libvirtState !== 'crashed';
    if (active && info.managedSave) await this.removeStaleSave(id, info.name);
    return { uuid: info.uuid, name: info.name, state: powerStateOf(info.libvirtState, info.managedSave && !active), persistent: info.persistent };
  }

  /**
   * An active domain with a managed-save image: a save under way has a job (leave it); one with no
   * job is what a libvirtd that died during (or right after) a save left behind.
   */
  private async removeStaleSave(uuid: string, name: string): Promise<void> {
    const job = parseKeyValues(await this.virsh.run(['domjobinfo', uuid], { uuid })).get('Job type') ?? 'None';
    if (job !== 'None') return;
    const reason = (await this.virsh.run(['domstate', uuid, '--reason'], { uuid })).trim();
    await this.virsh.run(['managedsave-remove', uuid], { uuid });
    this.log.warn({ instance_uuid: uuid, domain: name, state: reason }, 'removed a stale managed-save image of a running domain (its restore would bring back old RAM over a newer disk)');
  }

  /** The domain's XML: live (node indexes) while it runs, else the persistent definition. */
  async xml(uuid: string): Promise<DomainXml> {
    const id = this.checkId(uuid);
    return parseDomainXml(await this.virsh.run(['dumpxml', id], { uuid: id }));
  }

  /** The domain must have a QEMU process holding its disk. */
  async requireActive(uuid: string, what: string): Promise<DomainInfo & { xml: DomainXml }> {
    const d = await this.probeWithXml(uuid);
    if (!processHoldsDisk(d.state)) throw new InstanceInvalidState(`cannot ${what}: domain ${d.name} (${d.uuid}) is ${d.state}`);
    return d;
  }

  /** SPEC §2: nothing but the domain's own QEMU may touch its disk while that QEMU has it open. */
  async requireInactive(uuid: string, what: string): Promise<DomainInfo & { xml: DomainXml }> {
    const d = await this.probeWithXml(uuid);
    if (processHoldsDisk(d.state)) {
      throw new SafetyViolation(`refusing to ${what}: domain ${d.name} (${d.uuid}) is ${d.state}, its QEMU process has the disk open`);
    }
    return d;
  }

  /** A managed save needs a persistent domain (libvirt refuses transient ones). */
  requirePersistent(d: DomainInfo, what: string): void {
    if (!d.persistent) throw new UnsupportedInstance(`cannot ${what}: domain ${d.name} (${d.uuid}) is transient, and libvirt can managed-save only a defined domain`);
  }
}
