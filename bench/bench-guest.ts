import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { GuestConsole } from '../src/guest-check/console.js';
import type { GuestImage } from '../src/guest-check/guest-image.js';
import { DISK_QOM_PATH } from '../src/hypervisor/qemu/launch.js';
import type { Runtime } from '../src/service/runtime.js';

const MiB = 2 ** 20;
const CHUNK_MB = 16;

/** One bench guest on one backend: booted, its data written, and how to end it. */
export interface BenchGuest {
  uuid: string;
  console: GuestConsole;
  /** Runs an HMP command line on its QEMU. */
  hmp(command: string): Promise<string>;
  /** Runs a QMP command on its QEMU (qemu backend only). */
  qmp?<T = unknown>(execute: string, args?: Record<string, unknown>): Promise<T>;
  close(): Promise<void>;
}

/** A real Linux guest of the qemu backend (scripts/guest-image.sh), started. */
export async function qemuGuest(rt: Runtime, guest: GuestImage, opts: { cmdline: string; ramMb: number; diskMb: number; name?: string }): Promise<BenchGuest> {
  const hv = rt.qemu!;
  const uuid = randomUUID();
  await hv.createInstance({
    uuid,
    name: opts.name ?? 'bench',
    memoryMb: opts.ramMb,
    vcpus: 1,
    machine: 'pc',
    baseImage: guest.rootDisk,
    baseImageFormat: guest.rootDiskFormat,
    diskSizeBytes: opts.diskMb * MiB,
    kernel: guest.kernel,
    initrd: guest.initrd,
    cmdline: opts.cmdline,
  });
  await rt.lifecycle.start(uuid);
  return {
    uuid,
    console: new GuestConsole(path.join(rt.config.DEFAULT.instances_path, uuid, 'console.log')),
    hmp: (command) => hv.hmp(uuid, command),
    qmp: (execute, args) => hv.qmp(uuid, execute, args),
    close: () => hv.stop(uuid, { graceful: false }).catch(() => undefined),
  };
}

/** Writes `dataMb` MiB of patterned data into the guest's disk at `offsetMb`, through its QEMU. */
export async function writeDiskData(g: BenchGuest, offsetMb: number, dataMb: number): Promise<void> {
  for (let off = 0; off < dataMb; off += CHUNK_MB) {
    const len = Math.min(CHUNK_MB, dataMb - off);
    const out = await g.hmp(`qemu-io -d ${DISK_QOM_PATH} "write -P 0x${(0x10 + ((off / CHUNK_MB) % 200)).toString(16)} ${offsetMb + off}M ${len}M"`);
    if (out.trim() !== '') throw new Error(`HMP qemu-io write failed: ${out.trim()}`);
  }
}
