import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir } from 'tmp-promise';
import { processesWhere } from '../../src/util/processes.js';
import { silentLogger, type Logger } from '../../src/log.js';
import { DISK_QOM_PATH } from '../../src/hypervisor/qemu/launch.js';
import { QemuHypervisor, type QemuHypervisorOptions } from '../../src/hypervisor/qemu/qemu-hypervisor.js';
import type { QmpEvent } from '../../src/hypervisor/qemu/qmp.js';
import { QemuImg } from '../../src/qemu-img/qemu-img.js';
import { runProgram } from '../../src/util/exec.js';

/**
 * Real QEMU guests for integration tests: a temp instances dir, small TCG guests (no OS: they sit
 * in SeaBIOS), guest-like disk writes through the guest's own QEMU, and a cleanup that kills every
 * QEMU started under the temp dir, even after a failed test.
 */

export const QEMU_BINARY = process.env.QEMU_BINARY ?? 'qemu-system-x86_64';
export const QEMU_IMG = process.env.QEMU_IMG ?? 'qemu-img';
export const QEMU_IO = process.env.QEMU_IO ?? 'qemu-io';
export const MiB = 1024 * 1024;

export interface QemuEnv {
  /** `<tmp>/instances`. */
  instancesPath: string;
  /** The temp dir holding instancesPath; free for other test files (e.g. an image store). */
  tmpPath: string;
  hv: QemuHypervisor;
  qemuImg: QemuImg;
  /** Another QemuHypervisor on the same instances dir (re-attach), with option overrides. */
  newHypervisor(overrides?: Partial<QemuHypervisorOptions>): QemuHypervisor;
  /** Kills every QEMU started under the temp dir, then removes it. Safe to call twice. */
  cleanup(): Promise<void>;
}

/** Fails loudly when QEMU is missing: these tests must not pass without it. */
export async function assertQemuInstalled(): Promise<void> {
  for (const bin of [QEMU_BINARY, QEMU_IMG, QEMU_IO]) {
    const res = await runProgram(bin, ['--version']).catch((err: Error) => {
      throw new Error(`${bin} is required by the QEMU integration tests and cannot run: ${err.message}`);
    });
    if (res.code !== 0) throw new Error(`${bin} --version failed: ${res.stderr}`);
  }
}

export async function makeQemuEnv(opts: Partial<QemuHypervisorOptions> = {}): Promise<QemuEnv> {
  await assertQemuInstalled();
  // A short prefix keeps unix socket paths far below 108 bytes.
  const tmp = await dir({ unsafeCleanup: true, prefix: 'sdq-' });
  const instancesPath = path.join(tmp.path, 'instances');
  await fs.mkdir(instancesPath);
  const qemuImg = new QemuImg(QEMU_IMG);
  const log: Logger = opts.log ?? silentLogger();
  const base: QemuHypervisorOptions = {
    instancesPath,
    qemuBinary: QEMU_BINARY,
    qemuImg,
    // TCG, as every test: a /dev/kvm here may be a nested kvm-pvm that cannot run a guest (it hangs at once).
    accel: 'tcg',
    shutdownTimeoutMs: 1000,
    qmpTimeoutMs: 10_000,
    log,
    ...opts,
  };
  const newHypervisor = (overrides: Partial<QemuHypervisorOptions> = {}) => new QemuHypervisor({ ...base, ...overrides });
  let cleaned = false;
  return {
    instancesPath,
    tmpPath: tmp.path,
    hv: newHypervisor(),
    qemuImg,
    newHypervisor,
    async cleanup() {
      if (cleaned) return;
      cleaned = true;
      await killQemuUnder(tmp.path);
      await tmp.cleanup();
    },
  };
}

export interface GuestOptions {
  uuid?: string;
  name?: string;
  memoryMb?: number;
  vcpus?: number;
  machine?: string;
  diskSizeBytes?: number;
  /** Start the guest after creating it (default true). */
  start?: boolean;
}

/** Creates a small guest (128 MiB RAM, 1 vCPU, 64 MiB disk) and starts it; resolves with its uuid. */
export async function createGuest(hv: QemuHypervisor, opts: GuestOptions = {}): Promise<string> {
  const uuid = opts.uuid ?? randomUUID();
  await hv.createInstance({
    uuid,
    name: opts.name ?? `test-${uuid.slice(0, 8)}`,
    memoryMb: opts.memoryMb ?? 128,
    vcpus: opts.vcpus ?? 1,
    machine: opts.machine ?? 'pc',
    diskSizeBytes: opts.diskSizeBytes ?? 64 * MiB,
  });
  if (opts.start ?? true) await hv.start(uuid);
  return uuid;
}

/** Runs one qemu-io command on the guest's disk through its running QEMU (HMP `qemu-io`). */
async function guestQemuIo(hv: QemuHypervisor, uuid: string, command: string): Promise<void> {
  const out = await hv.hmp(uuid, `qemu-io -d ${DISK_QOM_PATH} "${command}"`);
  // On success qemu-io prints to QEMU's stdout (/dev/null once daemonized); the monitor only
  // gets parse and lookup errors.
  if (out.trim() !== '') throw new Error(`HMP qemu-io "${command}" failed: ${out.trim()}`);
}

/** Writes `lenBytes` of byte `pattern` at `offsetBytes` as the guest would: through its own QEMU. */
export async function guestWrite(
  hv: QemuHypervisor,
  uuid: string,
  pattern: number,
  offsetBytes: number,
  lenBytes: number,
): Promise<void> {
  await guestQemuIo(hv, uuid, `write -P 0x${pattern.toString(16)} ${offsetBytes} ${lenBytes}`);
}

/** Zeroes `lenBytes` at `offsetBytes` as the guest would (a write-zeroes request: qcow2 zero clusters). */
export async function guestWriteZeroes(hv: QemuHypervisor, uuid: string, offsetBytes: number, lenBytes: number): Promise<void> {
  await guestQemuIo(hv, uuid, `write -z ${offsetBytes} ${lenBytes}`);
}

/** Makes the guest's QEMU write its qcow2 caches to the file (so that another reader sees its writes). */
export async function guestFlush(hv: QemuHypervisor, uuid: string): Promise<void> {
  await guestQemuIo(hv, uuid, 'flush');
}

/**
 * True if every byte of [offsetBytes, offsetBytes + lenBytes) of the guest's disk (active layer)
 * is `pattern`. HMP qemu-io prints its verdict to QEMU's stdout, which a daemonized QEMU does not
 * have, so the disk is read by a separate qemu-io (`-U -r`), after a flush when a QEMU holds it.
 */
export async function guestDiskHasPattern(
  hv: QemuHypervisor,
  uuid: string,
  pattern: number,
  offsetBytes: number,
  lenBytes: number,
): Promise<boolean> {
  const { state } = await hv.info(uuid);
  if (state === 'running' || state === 'paused') await guestFlush(hv, uuid);
  const disk = (await hv.diskInfo(uuid)).path;
  return qcow2HasPattern(disk, pattern, offsetBytes, lenBytes);
}

/** Reads a qcow2 file's active layer with qemu-io (-U -r) and checks a byte pattern. */
export async function qcow2HasPattern(file: string, pattern: number, offsetBytes: number, lenBytes: number): Promise<boolean> {
  const cmd = `read -P 0x${pattern.toString(16)} ${offsetBytes} ${lenBytes}`;
  const res = await runProgram(QEMU_IO, ['-U', '-r', '-f', 'qcow2', '-c', cmd, file]);
  const out = res.stdout + res.stderr;
  if (out.includes('Pattern verification failed')) return false;
  if (res.code !== 0 || !out.includes(`read ${lenBytes}/${lenBytes} bytes`)) {
    throw new Error(`qemu-io ${cmd} on ${file} failed (exit code ${res.code}): ${out.trim()}`);
  }
  return true;
}

/** The guest's QEMU pid (from its pidfile), or undefined. */
export async function guestPid(instancesPath: string, uuid: string): Promise<number | undefined> {
  const text = await fs.readFile(path.join(instancesPath, uuid, 'qemu.pid'), 'utf8').catch(() => '');
  const pid = Number.parseInt(text.trim(), 10);
  return Number.isInteger(pid) && pid > 0 ? pid : undefined;
}

/**
 * True while a process with this pid exists and is not a zombie — including while it is still
 * exiting (memory released, files and image locks not yet): see hasExited in qemu-process.ts.
 */
export async function processAlive(pid: number): Promise<boolean> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  if (stat === '') return false;
  const state = stat.charAt(stat.lastIndexOf(')') + 2);
  return state !== 'Z' && state !== 'X';
}

/** SIGKILLs the guest's QEMU (a crash) and waits until it is gone. */
export async function crashGuest(instancesPath: string, uuid: string): Promise<void> {
  const pid = await guestPid(instancesPath, uuid);
  if (pid === undefined) throw new Error(`guest ${uuid} has no pidfile`);
  process.kill(pid, 'SIGKILL');
  await waitUntilGone([pid]);
}

/**
 * Kills every process whose command line mentions `root` (the QEMUs of a temp instances dir, found
 * through /proc so that a process whose pidfile is gone is found too) and waits until they are gone.
 */
export async function killQemuUnder(root: string): Promise<void> {
  const needle = root.endsWith('/') ? root : `${root}/`;
  const pids: number[] = [];
  for (const { pid } of await processesWhere((argv) => argv.some((a) => a.includes(needle)))) {
    try {
      process.kill(pid, 'SIGKILL');
      pids.push(pid);
    } catch {
      // Already gone.
    }
  }
  await waitUntilGone(pids);
}

async function waitUntilGone(pids: number[]): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (const pid of pids) {
    while (await processAlive(pid)) {
      if (Date.now() > deadline) throw new Error(`process ${pid} survived SIGKILL`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

export interface QmpEventWatch {
  /** Events seen so far. */
  readonly events: QmpEvent[];
  /** Stops watching (releases the monitor); resolves with every event seen. */
  stop(): Promise<QmpEvent[]>;
}

/**
 * Collects the guest's QMP events by holding `hv`'s monitor connection open; the operations of that
 * same object share it meanwhile (another object's would wait for it).
 */
export async function watchQmpEvents(hv: QemuHypervisor, uuid: string): Promise<QmpEventWatch> {
  const events: QmpEvent[] = [];
  let release: (() => void) | undefined;
  let attached!: () => void;
  const ready = new Promise<void>((r) => (attached = r));
  const held = hv.withMonitor(uuid, (qmp) => {
    const onEvent = (ev: QmpEvent) => events.push(ev);
    qmp.on('event', onEvent);
    return new Promise<void>((resolve) => {
      release = () => {
        qmp.off('event', onEvent);
        resolve();
      };
      attached();
    });
  });
  await Promise.race([ready, held]);
  return {
    events,
    async stop() {
      release?.();
      await held;
      return events;
    },
  };
}

/**
 * `<dir>/qemu-img-stub`: a qemu-img that runs the shell lines `onConvert` first when asked to
 * `convert` (they may `exec` something else instead), and the real qemu-img for the rest.
 */
export async function writeQemuImgStub(dir: string, onConvert: string[]): Promise<string> {
  const stub = path.join(dir, 'qemu-img-stub');
  const real = await fs.realpath(QEMU_IMG).catch(() => QEMU_IMG);
  const lines = ['#!/bin/sh', 'if [ "$1" = convert ]; then', ...onConvert.map((l) => `  ${l}`), 'fi', `exec '${real}' "$@"`, ''];
  await fs.writeFile(stub, lines.join('\n'), { mode: 0o755 });
  return stub;
}
