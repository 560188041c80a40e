import { describe, expect, it } from 'vitest';
import { QmpError, UnsupportedInstance } from '../../src/errors.js';
import { pullBackupXml } from '../../src/hypervisor/libvirt/backup.js';
import { formatNodeName, parseDomainXml } from '../../src/hypervisor/libvirt/domain-xml.js';
import { parseDomInfo, powerStateOf } from '../../src/hypervisor/libvirt/domains.js';
import { qmpReply } from '../../src/hypervisor/libvirt/libvirt-hypervisor.js';
import { parseEventLine } from '../../src/hypervisor/libvirt/monitor-events.js';
import { parseKeyValues, splitTiming, virshMessage } from '../../src/hypervisor/libvirt/virsh.js';

/** What the libvirt backend reads from virsh, as virsh 9.0 prints it (outputs captured on this machine). */

const UUID = 'ab6c642d-3c09-4309-a9dd-ed194002267a';
const DOMINFO = `Id:             29
Name:           b2
UUID:           ${UUID}
OS Type:        hvm
State:          running
CPU(s):         1
Persistent:     yes
Autostart:      disable
Managed save:   no
Security model: none
Messages:       tainted: custom monitor control commands issued
                tainted: custom guest agent control commands issued
`;

function domainXml(disks: string): string {
  return `<domain type='qemu' id='29'><name>b2</name><uuid>${UUID.toUpperCase()}</uuid><devices>${disks}</devices></domain>`;
}

describe('virsh output', () => {
  it('-t: the command output and its timing line apart; none is undefined', () => {
    expect(splitTiming('{"return":{},"id":"libvirt-41"}\n\n(Time: 9.207 ms)\n\n')).toEqual({ stdout: '{"return":{},"id":"libvirt-41"}\n', commandMs: 9.207 });
    expect(splitTiming('\n(Time: 12 ms)\n')).toEqual({ stdout: '', commandMs: 12 });
    expect(splitTiming('{"return":{}}\n')).toBeUndefined();
  });

  it('dominfo: state, managed save, persistence; continuation lines ignored', () => {
    expect(parseDomInfo(DOMINFO)).toEqual({ uuid: UUID, name: 'b2', libvirtState: 'running', managedSave: false, persistent: true });
    expect(parseKeyValues(DOMINFO).get('Messages')).toBe('tainted: custom monitor control commands issued');
    expect(() => parseDomInfo('garbage')).toThrow(/unexpected virsh dominfo output/);
  });

  it.each([
    ['running', false, 'running'],
    ['idle', false, 'running'],
    ['in shutdown', false, 'running'],
    ['paused', false, 'paused'],
    ['pmsuspended', false, 'paused'],
    ['shut off', false, 'shutoff'],
    ['shut off', true, 'saved'],
    ['crashed', false, 'crashed'],
  ] as const)('libvirt state %s (managed save %s) is %s', (state, saved, ours) => {
    expect(powerStateOf(state, saved)).toBe(ours);
  });

  it('error lines lose their "error: " prefix', () => {
    expect(virshMessage("error: failed to get domain 'x'\nerror: Domain not found\n")).toBe("failed to get domain 'x'; Domain not found");
  });

  it('QEMU events carry QEMU\'s own time', () => {
    expect(parseEventLine("event STOP at 1796011892.142250 for domain 'b 1': <null>")).toEqual({ name: 'STOP', atMs: 1796011892142.25, data: '<null>' });
    expect(parseEventLine(`event MIGRATION at 1796011892.211705 for domain 'b1': {"status":"setup"}`)).toMatchObject({ name: 'MIGRATION', data: '{"status":"setup"}' });
    expect(parseEventLine('2026-11-30 04:11:32.146+0000: event STOP for domain')).toBeUndefined();
  });

  it('qemu-monitor-command replies: the return value, or the QMP error (virsh exits 0 for both)', () => {
    expect(qmpReply('x', '{"return":{},"id":"libvirt-414"}')).toEqual({});
    expect(() => qmpReply('blockdev-snapshot-internal-sync', `{"id":"libvirt-415","error":{"class":"GenericError","desc":"Snapshot with name 's1' already exists"}}`)).toThrow(
      new QmpError('blockdev-snapshot-internal-sync', 'GenericError', "Snapshot with name 's1' already exists"),
    );
    expect(() => qmpReply('x', 'not json')).toThrow(/UnparseableReply/);
  });
});

describe('domain XML', () => {
  it('the first qcow2 file disk is the root disk; its live index names the format node; other disks are listed', () => {
    const xml = domainXml(
      "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc'/></disk>" +
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/disk.qcow2' index='3'/><backingStore type='file' index='4'/><target dev='vda' bus='virtio'/></disk>" +
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/data.qcow2' index='5'/><target dev='vdb' bus='virtio'/></disk>",
    );
    const d = parseDomainXml(xml);
    expect(d).toEqual({ name: 'b2', uuid: UUID, rootDisk: { path: '/v/disk.qcow2', target: 'vda', index: 3 }, otherDisks: ['vdb'] });
    expect(formatNodeName(d.rootDisk)).toBe('libvirt-3-format');
    expect(() => formatNodeName({ path: '/x', target: 'vda' })).toThrow(/no <source index>/);
  });

  it.each([
    ["<disk type='file' device='disk'><driver type='raw'/><source file='/v/d.img'/><target dev='vda'/></disk>", /no <disk device='disk'> of driver type qcow2 \(it has file raw disk vda \(\/v\/d\.img\)\)/],
    ["<disk type='block' device='disk'><driver type='raw'/><source dev='/dev/vg/lv'/><target dev='vda'/></disk>", /it has block raw disk vda \(\/dev\/vg\/lv\)/],
    ["<disk type='network' device='disk'><driver type='qcow2'/><source protocol='rbd' name='pool/img'/><target dev='vda'/></disk>", /its root disk is a network qcow2 disk vda \(rbd pool\/img\): only a qcow2 file can be snapshotted/],
    ['', /no disk at all/],
  ])('refuses %s', (disks, why) => {
    const err = (() => {
      try {
        parseDomainXml(domainXml(disks));
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(err).toBeInstanceOf(UnsupportedInstance);
    expect((err as Error).message).toMatch(new RegExp(`^domain b2 \\(${UUID}\\) cannot be snapshotted: `));
    expect((err as Error).message).toMatch(why);
  });
});

describe('pull backup definition', () => {
  it('pulls the root disk over a unix socket with a scratch file, leaves the other disks out, escapes paths', () => {
    const d = { name: 'b2', uuid: UUID, rootDisk: { path: '/v/d.qcow2', target: 'vda', index: 1 }, otherDisks: ['vdb'] };
    expect(pullBackupXml(d, "/s/it's.nbd", '/s/a&b.scratch.qcow2')).toBe(
      [
        "<domainbackup mode='pull'>",
        "  <server transport='unix' socket='/s/it&apos;s.nbd'/>",
        '  <disks>',
        "    <disk name='vda' type='file'><scratch file='/s/a&amp;b.scratch.qcow2'/></disk>",
        "    <disk name='vdb' backup='no'/>",
        '  </disks>',
        '</domainbackup>',
        '',
      ].join('\n'),
    );
  });
});
