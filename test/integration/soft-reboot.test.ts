import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Lifecycle } from '../../src/snapshot/lifecycle.js';
import { QmpDisconnected } from '../../src/errors.js';
import { waitForGuestReady } from '../../src/guest-check/ready.js';
import { waitForGuestExit } from '../../src/hypervisor/qemu/qemu-process.js';
import { silentLogger } from '../../src/log.js';
import { PendingSnapshots } from '../../src/snapshot/pending.js';
import { createLinuxGuest, makeLinuxBench, type LinuxBench, type LinuxGuest } from '../helpers/linux-guest.js';
import { createGuest, guestPid, makeQemuEnv, type QemuEnv } from '../helpers/qemu-guest.js';

/**
 * Issue 12 item 5, on real QEMU. A soft reboot is guest-cooperative (nova's; libvirt's "fake
 * reboot"): the ACPI power button, the guest shuts its OS down cleanly (the real Linux guest's init
 * stops the writer and remounts its ext4 root read-only: "GUEST root read-only" on its console), and
 * the same QEMU process resets and continues it. A guest that ignores the button (the OS-less guest)
 * is hard rebooted once [hypervisor] wait_soft_reboot_seconds has passed (injected small here: the
 * OS-less guest never answers, so no race). A guest that powers off on its own afterwards still ends
 * its QEMU process (shut off), as before.
 */

describe('soft reboot of the real Linux guest', () => {
  let bench: LinuxBench;
  let guest: LinuxGuest;

  beforeAll(async () => {
    bench = await makeLinuxBench();
    guest = await createLinuxGuest(bench.hv);
  });

  afterAll(async () => {
    await bench?.cleanup();
  });

  it('shuts the guest down cleanly (ext4 root remounted read-only), resets it in the same QEMU process; records continue', async () => {
    const { uuid } = guest;
    // A record the writer has fsynced before the reboot, and the boot it is in.
    const fsynced = await guest.console.waitForFsynced(await guest.console.mark());
    const before = (await guest.console.events()).filter((e) => e.kind === 'writer-start');
    const lastBoot = before.at(-1);
    expect(lastBoot?.kind).toBe('writer-start');
    const pid = await guestPid(bench.hv.instancesPath, uuid);
    expect(pid).toBeDefined();

    const mark = await guest.console.mark();
    expect(await bench.rt.lifecycle.softReboot(uuid)).toBe('soft');
    expect((await bench.hv.info(uuid)).state).toBe('running');
    await waitForGuestReady(bench.hv, uuid, guest.console, mark);

    // Same QEMU process: nothing was restarted.
    expect(await guestPid(bench.hv.instancesPath, uuid)).toBe(pid);
    // The guest's own shutdown ran to its end before the new boot: the root was read-only (clean).
    const text = (await fs.readFile(path.join(bench.hv.instancesPath, uuid, 'console.log'), 'latin1')).slice(mark);
    const shutdownAt = text.indexOf('GUEST shutdown');
    const cleanAt = text.indexOf('GUEST root read-only');
    const readyAt = text.indexOf('GUEST ready');
    expect(shutdownAt, `console after the soft reboot:\n${text.slice(0, 4000)}`).toBeGreaterThanOrEqual(0);
    expect(cleanAt).toBeGreaterThan(shutdownAt);
    expect(readyAt).toBeGreaterThan(cleanAt);
    // A new boot of the writer, every fsynced record still there (it goes on after them).
    const start = (await guest.console.events(mark)).find((e) => e.kind === 'writer-start');
    expect(start?.kind).toBe('writer-start');
    if (start?.kind !== 'writer-start' || lastBoot?.kind !== 'writer-start') return;
    expect(start.boot).toBe(lastBoot.boot + 1);
    expect(start.seq).toBeGreaterThan(fsynced);
  });

  it('afterwards, a guest that powers itself off still ends its QEMU process: shut off, not a stopped QEMU', async () => {
    const { uuid } = guest;
    const pid = (await guestPid(bench.hv.instancesPath, uuid))!;
    const outcome = await bench.hv.withMonitor(uuid, async (qmp) => {
      const shutdown = qmp.waitForEvent('SHUTDOWN', (ev) => ev.data?.guest === true, 90_000);
      await qmp.execute('system_powerdown');
      await shutdown;
      // Left to pause on a guest shutdown, QEMU would answer (run state "shutdown"); as it should, it exits.
      return qmp.execute<{ status: string }>('query-status').then(
        (st) => `QEMU still there, run state ${st.status}`,
        (err: unknown) => (err instanceof QmpDisconnected ? 'exited' : `error: ${String(err)}`),
      );
    });
    expect(outcome).toBe('exited');
    expect(await waitForGuestExit(pid, uuid, 30_000)).toBe(true);
    expect((await bench.hv.info(uuid)).state).toBe('shutoff');
  });
});

describe('soft reboot of a guest that ignores the ACPI power button', () => {
  let env: QemuEnv;

  beforeAll(async () => {
    env = await makeQemuEnv();
  });

  afterAll(async () => {
    await env?.cleanup();
  });

  it('is a hard reboot (a new QEMU process) once wait_soft_reboot_seconds has passed', async () => {
    const uuid = await createGuest(env.hv);
    const pid = await guestPid(env.instancesPath, uuid);
    const pending = new PendingSnapshots(path.join(env.tmpPath, 'pending'));
    const lifecycle = new Lifecycle(env.hv, pending, silentLogger(), { softRebootWaitMs: 300 });
    // The OS-less guest sits in SeaBIOS: nothing ever answers the button.
    expect(await lifecycle.softReboot(uuid)).toBe('hard');
    const after = await guestPid(env.instancesPath, uuid);
    expect(after).toBeDefined();
    expect(after).not.toBe(pid);
    expect((await env.hv.info(uuid)).state).toBe('running');
  });

  it('a paused guest cannot act on the button: hard reboot at once, running after', async () => {
    const uuid = await createGuest(env.hv);
    await env.hv.pause(uuid);
    const pid = await guestPid(env.instancesPath, uuid);
    const lifecycle = new Lifecycle(env.hv, new PendingSnapshots(path.join(env.tmpPath, 'pending')), silentLogger(), {
      softRebootWaitMs: 3_600_000,
    });
    expect(await lifecycle.softReboot(uuid)).toBe('hard');
    expect(await guestPid(env.instancesPath, uuid)).not.toBe(pid);
    expect((await env.hv.info(uuid)).state).toBe('running');
  });

  it('a shut-off guest is refused', async () => {
    const uuid = await createGuest(env.hv, { start: false });
    const lifecycle = new Lifecycle(env.hv, new PendingSnapshots(path.join(env.tmpPath, 'pending')), silentLogger());
    await expect(lifecycle.softReboot(uuid)).rejects.toThrow(/cannot reboot instance .*: it is shutoff/);
  });
});
