import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir } from 'tmp-promise';
import { buildRuntime, type Runtime } from '../../src/service/runtime.js';
import type { Config } from '../../src/config/schema.js';
import { silentLogger } from '../../src/log.js';
import type { BeforeStep } from '../../src/snapshot/run-steps.js';
import { assertQemuInstalled, killQemuUnder } from './qemu-guest.js';
import { GuestConsole } from '../../src/guest-check/console.js';
import { readGuestImage, type GuestImage } from '../../src/guest-check/guest-image.js';
import { waitForGuestReady } from '../../src/guest-check/ready.js';
import { withGuestAgent } from '../../src/hypervisor/qemu/guest-agent.js';
import type { QemuHypervisor } from '../../src/hypervisor/qemu/qemu-hypervisor.js';
import { tempDirsConfig } from './temp-config.js';

/**
 * The real Linux test guest (scripts/guest-image.sh) in integration tests: a cloud kernel booted
 * directly, an ext4 root on a qcow2 over the cached root disk, the real qemu-ga, a writer of
 * checksummed records and a pause probe reporting on the serial console (<instance>/console.log).
 */

let image: Promise<GuestImage> | undefined;

/**
 * The guest test/global-setup.ts built before the suite (read, never rebuilt here: a rebuild would
 * replace the base image under the overlays of guests other test files are running).
 */
export function linuxGuestImage(): Promise<GuestImage> {
  image ??= readGuestImage();
  return image;
}

export interface LinuxGuest {
  uuid: string;
  console: GuestConsole;
  /** The host end of its guest agent channel. */
  agentSocket: string;
  /** Launch to the agent answering guest-ping, in ms (when started by createLinuxGuest). */
  bootMs?: number;
}

export interface LinuxGuestOptions {
  uuid?: string;
  name?: string;
  memoryMb?: number;
  /** The disk's base: default the cached root disk (qcow2); an exported raw image to boot it. */
  baseImage?: string;
  baseFormat?: 'qcow2' | 'raw';
  /** Appended to the kernel command line (e.g. `writer.interval_ms=5`). */
  cmdlineExtra?: string;
  /** Start it and wait for its agent (default true). */
  start?: boolean;
}

export async function createLinuxGuest(hv: QemuHypervisor, opts: LinuxGuestOptions = {}): Promise<LinuxGuest> {
  const img = await linuxGuestImage();
  const uuid = opts.uuid ?? randomUUID();
  await hv.createInstance({
    uuid,
    name: opts.name ?? `linux-${uuid.slice(0, 8)}`,
    memoryMb: opts.memoryMb ?? 128,
    vcpus: 1,
    machine: 'pc',
    baseImage: opts.baseImage ?? img.rootDisk,
    baseImageFormat: opts.baseFormat ?? img.rootDiskFormat,
    kernel: img.kernel,
    initrd: img.initrd,
    cmdline: opts.cmdlineExtra ? `${img.cmdline} ${opts.cmdlineExtra}` : img.cmdline,
  });
  const dir = path.join(hv.instancesPath, uuid);
  const guest: LinuxGuest = { uuid, console: new GuestConsole(path.join(dir, 'console.log')), agentSocket: path.join(dir, 'qga.sock') };
  if (opts.start ?? true) {
    const startedAt = performance.now();
    await hv.start(uuid);
    await waitForGuestReady(hv, uuid, guest.console);
    guest.bootMs = Math.round(performance.now() - startedAt);
  }
  return guest;
}

/** Asks the real guest agent whether the guest's filesystems are frozen (`guest-fsfreeze-status`). */
export async function freezeStatus(guest: LinuxGuest, timeoutMs = 10_000): Promise<'frozen' | 'thawed'> {
  return withGuestAgent(guest.agentSocket, timeoutMs, 'ask the freeze status', async (agent) => {
    const status = await agent.execute('guest-fsfreeze-status', undefined, timeoutMs);
    if (status !== 'frozen' && status !== 'thawed') throw new Error(`guest-fsfreeze-status answered ${JSON.stringify(status)}`);
    return status;
  });
}

/** Resolves once the writer has fsynced a record later than `seq` (it writes again). */
export async function writerPasses(guest: LinuxGuest, seq: number, timeoutMs = 30_000): Promise<number> {
  const from = await guest.console.mark();
  return guest.console.waitFor(from, `a writer line past seq ${seq}`, timeoutMs, (ev) => {
    const p = ev.find((e) => e.kind === 'writer-progress' && e.seq > seq);
    return p?.kind === 'writer-progress' ? p.seq : undefined;
  });
}

export interface LinuxBench {
  base: string;
  rt: Runtime;
  hv: QemuHypervisor;
  /** Another runtime on the same folders with other `[snapshot]` options. */
  runtimeWith(snapshot: Partial<Config['snapshot']>, opts?: { beforeStep?: BeforeStep }): Runtime;
  /** A config file for the CLI on the same folders, with these `[snapshot]` options. */
  configFile(snapshot: Partial<Record<keyof Config['snapshot'], string | number>>): Promise<string>;
  cleanup(): Promise<void>;
}

/** Folders for instances, state and images in a temp dir, and a runtime on them (TCG). */
export async function makeLinuxBench(snapshot: Partial<Config['snapshot']> = {}): Promise<LinuxBench> {
  await assertQemuInstalled();
  await linuxGuestImage();
  // A short prefix keeps unix socket paths far below 108 bytes.
  const base = (await dir({ prefix: 'sdl-' })).path;
  const runtimeWith = (opts: Partial<Config['snapshot']>, hooks: { beforeStep?: BeforeStep } = {}): Runtime => {
    const config = tempDirsConfig(base, { shutdownTimeoutS: 30 });
    Object.assign(config.snapshot, opts);
    return buildRuntime(config, silentLogger(), hooks);
  };
  const rt = runtimeWith(snapshot);
  return {
    base,
    rt,
    hv: rt.qemu!,
    runtimeWith,
    async configFile(snapshot) {
      const file = path.join(base, `agent-${randomUUID().slice(0, 8)}.conf`);
      const lines = [
        '[DEFAULT]',
        'transport_url = memory:///linux-bench',
        'instances_path = i',
        'state_path = s',
        '[snapshot]',
        ...Object.entries(snapshot).map(([k, v]) => `${k} = ${v}`),
        '[hypervisor]',
        'accel = tcg',
        'shutdown_timeout = 30',
        '[image_store]',
        'path = images',
        'reserved_space_mb = 0',
        '',
      ];
      await fs.writeFile(file, lines.join('\n'));
      return file;
    },
    async cleanup() {
      await killQemuUnder(base);
      await fs.rm(base, { recursive: true, force: true });
    },
  };
}
