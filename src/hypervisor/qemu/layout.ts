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
  /** A restoring QEMU listens here for the saved state (resume). */
  get restoreSocket(): string {
    return path.join(this.dir, 'restore.sock');
  }

  /** The host end of the guest agent's virtio-serial channel (QEMU listens). */
  get guestAgentSocket(): string {
    return path.join(this.dir, 'qga.sock');
  }

  /** Files a QEMU process leaves behind; removed before a new process is launched. */
  get staleRuntimeFiles(): string[] {
    return [this.pidFile, this.qmpSocket, this.guestAgentSocket, this.saveSocket, this.restoreSocket, this.saveStatePartial];
  }

  /** Runtime files that go with the process (removed once it has exited). */
  get processFiles(): string[] {
    return [this.pidFile, this.qmpSocket, this.guestAgentSocket];
  }

  /** Throws a ConfigError naming the first unix socket path that does not fit in sun_path. */
  assertSocketPathsFit(): void {
    for (const p of [this.qmpSocket, this.guestAgentSocket, this.saveSocket, this.restoreSocket]) {
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
    throw new Error(`${file}: expected {"uuid","name","memory_mb","vcpus","machine"} and optionally "memory_file" (an absolute path)`);
  }
  const record: InstanceRecord = { uuid: j.uuid, name: j.name, memory_mb: j.memory_mb!, vcpus: j.vcpus!, machine: j.machine };
  if (j.memory_file !== undefined) record.memory_file = j.memory_file;
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
