import fs from 'node:fs/promises';
import path from 'node:path';
import { ConfigError } from '../../errors.js';
import { writeFileAtomic } from '../../util/durable-fs.js';

/**
 * Where one instance's files live under `[DEFAULT] instances_path` (SPEC §4):
 * `<uuid>/instance.json`, `<uuid>/disk` (qcow2) and the runtime files of its QEMU process.
 */

/** sun_path is 108 bytes including the terminating NUL. */
export const UNIX_SOCKET_PATH_MAX = 108;

export class InstanceLayout {
  readonly dir: string;
  constructor(
    readonly instancesPath: string,
    readonly uuid: string,
  ) {
    this.dir = path.join(instancesPath, uuid);
  }

  get instanceJson(): string {
    return path.join(this.dir, 'instance.json');
  }
  get disk(): string {
    return path.join(this.dir, 'disk');
  }
  get qmpSocket(): string {
    return path.join(this.dir, 'qmp.sock');
  }
  get pidFile(): string {
    return path.join(this.dir, 'qemu.pid');
  }
  /** Stderr (and stdout) of the last launch; QEMU detaches from it once daemonized. */
  get qemuLog(): string {
    return path.join(this.dir, 'qemu.log');
  }
  get saveState(): string {
    return path.join(this.dir, 'managed-save.state');
  }
  get saveStatePartial(): string {
    return path.join(this.dir, 'managed-save.state.partial');
  }
  get saveMeta(): string {
    return path.join(this.dir, 'managed-save.json');
  }
  /** The agent listens here while QEMU migrates its state out (managed save). */
  get saveSocket(): string {
    return path.join(this.dir, 'save.sock');
  }

  /** The guest's serial console: appended by every process of the instance, never truncated. */
  get consoleLog(): string {
    return path.join(this.dir, 'console.log');
  }

  /** The host end of the guest agent's virtio-serial channel (QEMU listens). */
  get guestAgentSocket(): string {
    return path.join(this.dir, 'qga.sock');
  }

  /** Files a QEMU process leaves behind; removed before a new process is launched. */
  get staleRuntimeFiles(): string[] {
    return [this.pidFile, this.qmpSocket, this.guestAgentSocket, this.saveSocket, this.saveStatePartial];
  }

  /** Runtime files that go with the process (removed once it has exited). */
  get processFiles(): string[] {
    return [this.pidFile, this.qmpSocket, this.guestAgentSocket];
  }

  /** Throws a ConfigError naming the first unix socket path that does not fit in sun_path. */
  assertSocketPathsFit(): void {
    for (const p of [this.qmpSocket, this.guestAgentSocket, this.saveSocket]) {
      const len = Buffer.byteLength(p);
      if (len >= UNIX_SOCKET_PATH_MAX) {
        throw new ConfigError(
          `unix socket path ${JSON.stringify(p)} is ${len} bytes, it must be shorter than ${UNIX_SOCKET_PATH_MAX}: ` +
            'choose a shorter [DEFAULT] instances_path',
        );
      }
    }
  }
}

/** instance.json, as written on disk. */
export interface InstanceRecord {
  uuid: string;
  name: string;
  memory_mb: number;
  vcpus: number;
  machine: string;
  /** Absolute path of the file the guest RAM is mapped from (private), if any. */
  memory_file?: string;
  /** Direct kernel boot: kernel and initrd (absolute, or relative to the instance folder) and command line. */
  kernel?: string;
  initrd?: string;
  cmdline?: string;
}

/** The boot fields of instance.json (SPEC §4), checked by checkBootFields. */
export type BootFields = Pick<InstanceRecord, 'kernel' | 'initrd' | 'cmdline'>;

/** x86's COMMAND_LINE_SIZE is 2048 bytes, the terminating NUL included. */
export const CMDLINE_MAX_BYTES = 2047;

/**
 * What is wrong with the boot fields' form (not the files), or undefined: strings, an initrd or
 * cmdline only with a kernel, a relative path that stays inside the instance folder.
 */
export function bootFieldsProblem(b: BootFields): string | undefined {
  for (const field of ['kernel', 'initrd'] as const) {
    const v = b[field];
    if (v === undefined) continue;
    if (typeof v !== 'string' || v.length === 0 || v.includes('\0')) return `"${field}" must be a non-empty path`;
    const rel = path.normalize(v);
    if (!path.isAbsolute(v) && (rel === '..' || rel.startsWith('../'))) {
      return `"${field}" ${JSON.stringify(v)} is relative and leaves the instance folder: give an absolute path or one inside the folder`;
    }
  }
  if (b.cmdline !== undefined) {
    if (typeof b.cmdline !== 'string' || /[\0\n\r]/.test(b.cmdline)) return '"cmdline" must be a string of one line';
    if (Buffer.byteLength(b.cmdline) > CMDLINE_MAX_BYTES) return `"cmdline" is longer than ${CMDLINE_MAX_BYTES} bytes`;
  }
  if (b.kernel === undefined && (b.initrd !== undefined || b.cmdline !== undefined)) {
    return '"initrd" and "cmdline" need a "kernel"';
  }
  return undefined;
}

/**
 * Resolves the boot files against the instance folder and checks that each is a readable regular
 * file; throws an Error naming the field and the path.
 */
export async function resolveBootFiles(dir: string, b: BootFields): Promise<BootFields> {
  const out: BootFields = {};
  for (const field of ['kernel', 'initrd'] as const) {
    const v = b[field];
    if (v === undefined) continue;
    const file = path.resolve(dir, v);
    let st;
    try {
      st = await fs.stat(file);
      await fs.access(file, fs.constants.R_OK);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const why = code === 'ENOENT' ? 'does not exist' : code === 'EACCES' ? 'is not readable' : `cannot be read (${code ?? 'error'})`;
      throw new Error(`"${field}" ${JSON.stringify(file)} ${why}`);
    }
    if (!st.isFile()) throw new Error(`"${field}" ${JSON.stringify(file)} is not a regular file`);
    out[field] = file;
  }
  if (b.cmdline !== undefined) out.cmdline = b.cmdline;
  return out;
}

/** managed-save.json, beside managed-save.state. */
export interface ManagedSaveRecord {
  prior_state: 'running' | 'paused';
  bytes: number;
}

export async function readInstanceRecord(file: string): Promise<InstanceRecord> {
  const j = JSON.parse(await fs.readFile(file, 'utf8')) as Partial<InstanceRecord>;
  if (
    typeof j.uuid !== 'string' ||
    typeof j.name !== 'string' ||
    !Number.isInteger(j.memory_mb) ||
    !Number.isInteger(j.vcpus) ||
    typeof j.machine !== 'string' ||
    (j.memory_file !== undefined && (typeof j.memory_file !== 'string' || !path.isAbsolute(j.memory_file)))
  ) {
    throw new Error(
      `${file}: expected {"uuid","name","memory_mb","vcpus","machine"} and optionally "memory_file" (an absolute path), ` +
        '"kernel", "initrd", "cmdline"',
    );
  }
  const boot: BootFields = { kernel: j.kernel, initrd: j.initrd, cmdline: j.cmdline };
  const problem = bootFieldsProblem(boot);
  if (problem !== undefined) throw new Error(`${file}: ${problem}`);
  const record: InstanceRecord = { uuid: j.uuid, name: j.name, memory_mb: j.memory_mb!, vcpus: j.vcpus!, machine: j.machine };
  if (j.memory_file !== undefined) record.memory_file = j.memory_file;
  for (const field of ['kernel', 'initrd', 'cmdline'] as const) if (boot[field] !== undefined) record[field] = boot[field];
  return record;
}

export async function readManagedSaveRecord(file: string): Promise<ManagedSaveRecord> {
  const j = JSON.parse(await fs.readFile(file, 'utf8')) as Partial<ManagedSaveRecord>;
  if ((j.prior_state !== 'running' && j.prior_state !== 'paused') || typeof j.bytes !== 'number') {
    throw new Error(`${file}: expected {"prior_state":"running"|"paused","bytes":N}`);
  }
  return { prior_state: j.prior_state, bytes: j.bytes };
}

/** Writes JSON so that readers see the old file or the complete new one. */
export async function writeJsonAtomic(file: string, value: unknown): Promise<void> {
  await writeFileAtomic(file, JSON.stringify(value, null, 2) + '\n', { mode: 0o640 });
}
