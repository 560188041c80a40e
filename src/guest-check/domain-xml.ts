import type { GuestImage } from './guest-image.js';

/**
 * The test guest as a libvirt domain (tests of the libvirt backend, `bench:downtime --driver
 * libvirt`): TCG; ACPI on (without it libvirt passes -no-acpi, the guest has no PM timer, falls back
 * to jiffies and loses time, and the probe's figures are off by ~10 %); QEMU run as root without
 * relabelling (the guest's kernel and base image live under /root/.cache, which libvirt-qemu cannot
 * read); the serial console appended to a file; the guest agent channel.
 */

export interface TestGuestDomain {
  name: string;
  uuid: string;
  memoryMb: number;
  /** Root disk file and its format. */
  disk: string;
  format: 'qcow2' | 'raw';
  /** An extra data disk (vdb, qcow2). */
  dataDisk?: string;
  console: string;
  /** Boot the test guest's kernel directly; without it the domain has no OS (SeaBIOS). */
  guest?: GuestImage;
  /** Appended to the guest's kernel command line. */
  cmdlineExtra?: string;
}

function xmlText(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;');
}

export function testGuestDomainXml(d: TestGuestDomain): string {
  const cmdline = d.guest && (d.cmdlineExtra ? `${d.guest.cmdline} ${d.cmdlineExtra}` : d.guest.cmdline);
  const boot = d.guest
    ? `    <kernel>${xmlText(d.guest.kernel)}</kernel>\n    <initrd>${xmlText(d.guest.initrd)}</initrd>\n    <cmdline>${xmlText(cmdline!)}</cmdline>`
    : "    <boot dev='hd'/>";
  const dataDisk = d.dataDisk
    ? `    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${xmlText(d.dataDisk)}'/><target dev='vdb' bus='virtio'/></disk>\n`
    : '';
  return `<domain type='qemu'>
  <name>${xmlText(d.name)}</name>
  <uuid>${d.uuid}</uuid>
  <memory unit='MiB'>${d.memoryMb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
${boot}
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='${d.format}'/>
      <source file='${xmlText(d.disk)}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
${dataDisk}    <serial type='file'><source path='${xmlText(d.console)}' append='on'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
`;
}
