import { XMLParser } from 'fast-xml-parser';
import { UnsupportedInstance } from '../../errors.js';

/**
 * What the agent needs from a domain's XML (`virsh dumpxml`): its name, and its root disk — the
 * first `<disk device='disk'>` whose driver type is qcow2 (SPEC §4). A domain without one (raw, LVM,
 * RBD or other network disks) is refused, never touched.
 */

export interface RootDisk {
  /** The qcow2 file. */
  path: string;
  /** The guest device, e.g. `vda` (libvirt's disk name in backup jobs). */
  target: string;
  /**
   * `<source index=N>` of the live XML (libvirt ≥ 6 names the disk's format node
   * `libvirt-N-format`, the `device` of QMP internal-snapshot commands); absent when shut off.
   */
  index?: number;
}

export interface DomainXml {
  name: string;
  uuid: string;
  rootDisk: RootDisk;
  /** The targets of the domain's other `<disk device='disk'>`s (left out of a backup). */
  otherDisks: string[];
}

interface RawDisk {
  type?: string;
  device?: string;
  driver?: { type?: string };
  source?: { file?: string; dev?: string; protocol?: string; name?: string; index?: string; pool?: string; volume?: string };
  target?: { dev?: string };
}

const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '',
  // A lone <disk> is still a list.
  isArray: (name) => name === 'disk',
  parseAttributeValue: false,
  parseTagValue: false,
});

/** What a disk is, for a refusal message: "raw file /x", "block device /dev/vg/lv", "network rbd pool/img". */
function describe(d: RawDisk): string {
  const format = d.driver?.type ?? 'unknown format';
  const where = d.source?.file ?? d.source?.dev ?? (d.source?.protocol ? `${d.source.protocol} ${d.source.name ?? ''}`.trim() : undefined);
  return `${d.type ?? 'unknown'} ${format} disk ${d.target?.dev ?? '?'}${where ? ` (${where})` : ''}`;
}

/** Parses a domain's XML; UnsupportedInstance (naming the domain and why) if it has no qcow2 file root disk. */
export function parseDomainXml(xml: string): DomainXml {
  const doc = parser.parse(xml) as { domain?: { name?: string; uuid?: string; devices?: { disk?: RawDisk[] } } };
  const domain = doc.domain;
  if (domain?.name === undefined || domain.uuid === undefined) throw new Error('not a libvirt domain XML (no <domain> with <name> and <uuid>)');
  const name = String(domain.name);
  const uuid = String(domain.uuid).toLowerCase();
  const disks = (domain.devices?.disk ?? []).filter((d) => (d.device ?? 'disk') === 'disk');
  const qcow2 = disks.find((d) => d.driver?.type === 'qcow2');
  const refuse = (why: string) => new UnsupportedInstance(`domain ${name} (${uuid}) cannot be snapshotted: ${why}`);
  if (qcow2 === undefined) {
    const found = disks.length > 0 ? disks.map(describe).join(', ') : 'no disk at all';
    throw refuse(`it has no <disk device='disk'> of driver type qcow2 (it has ${found})`);
  }
  if (qcow2.type !== 'file' || !qcow2.source?.file) {
    throw refuse(`its root disk is a ${describe(qcow2)}: only a qcow2 file can be snapshotted`);
  }
  if (!qcow2.target?.dev) throw refuse(`its root disk ${qcow2.source.file} has no <target dev>`);
  const index = qcow2.source.index === undefined ? undefined : Number(qcow2.source.index);
  return {
    name,
    uuid,
    rootDisk: { path: qcow2.source.file, target: qcow2.target.dev, ...(index !== undefined && Number.isInteger(index) && { index }) },
    otherDisks: disks.filter((d) => d !== qcow2 && d.target?.dev).map((d) => d.target!.dev!),
  };
}

/** The QMP node name of the disk's qcow2 layer in a running domain. */
export function formatNodeName(disk: RootDisk): string {
  if (disk.index === undefined) throw new Error(`disk ${disk.target} has no <source index>: is the domain running?`);
  return `libvirt-${disk.index}-format`;
}
