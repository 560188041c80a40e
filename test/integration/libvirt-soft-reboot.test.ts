import fs from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { waitForGuestReady } from '../../src/guest-check/ready.js';
import { processesWhere } from '../../src/util/processes.js';
import { makeLibvirtBench, type LibvirtBench } from '../helpers/libvirt.js';

/**
 * Issue 12 item 5 on the libvirt backend (parity with the qemu one): a soft reboot is libvirt's own
 * reboot with the ACPI power button: the real Linux guest shuts down cleanly (its ext4 root remounted
 * read-only), and libvirt resets and continues it in the same QEMU process. (A bare domain, which
 * ignores the button, is hard rebooted after wait_soft_reboot_seconds: libvirt-domains.test.ts.)
 */

let bench: LibvirtBench;

beforeAll(async () => {
  bench = await makeLibvirtBench();
});

afterAll(async () => {
  await bench?.cleanup();
});

async function qemuPidOf(uuid: string): Promise<number[]> {
  return (await processesWhere((argv) => argv.some((a) => a.includes('qemu-system')) && argv.some((a) => a.includes(uuid)))).map((p) => p.pid);
}

describe('soft reboot of a libvirt domain running the real Linux guest', () => {
  it('is a clean shutdown of the guest, then a reset in the same QEMU process', async () => {
    const dom = await bench.domain({ guest: 'linux' });
    const pids = await qemuPidOf(dom.uuid);
    expect(pids).toHaveLength(1);
    const mark = await dom.console.mark();
    expect(await bench.rt.lifecycle.softReboot(dom.uuid)).toBe('soft');
    await waitForGuestReady(bench.rt.hv, dom.uuid, dom.console, mark);
    expect(await qemuPidOf(dom.uuid)).toEqual(pids);
    const text = (await fs.readFile(dom.console.file, 'latin1')).slice(mark);
    const cleanAt = text.indexOf('GUEST root read-only');
    expect(text.indexOf('GUEST shutdown'), text.slice(0, 4000)).toBeGreaterThanOrEqual(0);
    expect(cleanAt).toBeGreaterThan(text.indexOf('GUEST shutdown'));
    expect(text.indexOf('GUEST ready')).toBeGreaterThan(cleanAt);
    expect((await bench.rt.hv.info(dom.uuid)).state).toBe('running');
  });
});
