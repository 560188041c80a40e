import fs from 'node:fs/promises';
import path from 'node:path';
import { InstanceExists, InstanceNotFound, UsageError, errorMessage } from '../../errors.js';
import { isUuid } from '../../util/uuid.js';
import type { InstanceInfo, InstanceSpec } from '../types.js';
import type { QemuGuests } from './guests.js';
import {
  bootFieldsProblem,
  type BootFields,
  type InstanceLayout,
  type InstanceRecord,
  resolveBootFiles,
  writeJsonAtomic,
} from './layout.js';

/** The qemu backend's instances: creating and deleting them, listing them and their power state. */

const MACHINE_RE = /^[A-Za-z0-9._-]{1,64}$/;

export async function createInstance(g: QemuGuests, spec: InstanceSpec): Promise<InstanceInfo> {
  const layout = g.layoutOf(spec.uuid);
  validateSpec(spec);
  layout.assertSocketPathsFit();
  const boot: BootFields = { kernel: spec.kernel, initrd: spec.initrd, cmdline: spec.cmdline };
  // Relative boot files are relative to the instance folder, which does not exist yet.
  await resolveBootFiles(layout.dir, boot).catch((err: unknown) => {
    throw new UsageError(`invalid instance spec for ${spec.uuid}: ${errorMessage(err)}`);
  });
  await makeInstanceDir(g, layout);
  try {
    await g.qemuImg.create(layout.disk, {
      sizeBytes: spec.diskSizeBytes,
      backing: spec.baseImage,
      backingFormat: spec.baseImageFormat,
    });
    await writeJsonAtomic(layout.instanceJson, instanceRecord(layout, spec));
  } catch (err) {
    await fs.rm(layout.dir, { recursive: true, force: true });
    throw err;
  }
  g.log.info({ instance_uuid: layout.uuid, instance_name: spec.name }, 'instance created');
  return { uuid: layout.uuid, name: spec.name, state: 'shutoff' };
}

export async function deleteInstance(g: QemuGuests, uuid: string): Promise<void> {
  const p = await g.probeProcess(uuid);
  if (p.pid !== undefined) await g.endProcess(p.layout, p.pid, 'quit');
  await fs.rm(p.layout.dir, { recursive: true, force: true });
  g.log.info({ instance_uuid: p.layout.uuid }, 'instance deleted');
}

export async function list(g: QemuGuests): Promise<InstanceInfo[]> {
  let names: string[];
  try {
    names = await fs.readdir(g.instancesPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const infos = await Promise.all(
    names
      .filter((n) => isUuid(n) && n === n.toLowerCase())
      .map((n) =>
        info(g, n).catch((err: unknown) => {
          if (err instanceof InstanceNotFound) return undefined;
          throw err;
        }),
      ),
  );
  return infos.filter((i): i is InstanceInfo => i !== undefined).sort((a, b) => a.name.localeCompare(b.name));
}

export async function info(g: QemuGuests, uuid: string): Promise<InstanceInfo> {
  const p = await g.probe(uuid);
  return { uuid: p.layout.uuid, name: p.record.name, state: p.state };
}

/** Creates the instance's folder (and the instances folder); InstanceExists if it is there already. */
async function makeInstanceDir(g: QemuGuests, layout: InstanceLayout): Promise<void> {
  await fs.mkdir(g.instancesPath, { recursive: true });
  try {
    await fs.mkdir(layout.dir, { mode: 0o750 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new InstanceExists(layout.uuid);
    throw err;
  }
}

function instanceRecord(layout: InstanceLayout, spec: InstanceSpec): InstanceRecord {
  return {
    uuid: layout.uuid,
    name: spec.name,
    memory_mb: spec.memoryMb,
    vcpus: spec.vcpus,
    machine: spec.machine,
    ...(spec.memoryFile !== undefined && { memory_file: spec.memoryFile }),
    ...(spec.kernel !== undefined && { kernel: spec.kernel }),
    ...(spec.initrd !== undefined && { initrd: spec.initrd }),
    ...(spec.cmdline !== undefined && { cmdline: spec.cmdline }),
  };
}

function validateSpec(spec: InstanceSpec): void {
  const bad = (what: string) => new UsageError(`invalid instance spec for ${spec.uuid}: ${what}`);
  if (typeof spec.name !== 'string' || spec.name.length === 0) throw bad('name must be a non-empty string');
  if (!Number.isInteger(spec.memoryMb) || spec.memoryMb < 1) throw bad('memoryMb must be a positive integer');
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1) throw bad('vcpus must be a positive integer');
  if (!MACHINE_RE.test(spec.machine)) throw bad('machine must be a QEMU machine type such as "pc" or "q35"');
  if (spec.memoryFile !== undefined && (typeof spec.memoryFile !== 'string' || !path.isAbsolute(spec.memoryFile))) {
    throw bad('memoryFile must be an absolute path');
  }
  const bootProblem = bootFieldsProblem({ kernel: spec.kernel, initrd: spec.initrd, cmdline: spec.cmdline });
  if (bootProblem !== undefined) throw bad(bootProblem);
  if (spec.baseImage === undefined) {
    if (spec.diskSizeBytes === undefined || !Number.isInteger(spec.diskSizeBytes) || spec.diskSizeBytes < 1) {
      throw bad('diskSizeBytes (a positive integer) or baseImage is required');
    }
  }
}
