import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { InvalidArgumentError, type Command } from 'commander';
import { InvalidInstanceId, UsageError } from '../errors.js';
import { isUuid } from '../util/uuid.js';
import type { Runtime } from '../service/runtime.js';
import type { QemuHypervisor } from '../hypervisor/qemu/qemu-hypervisor.js';
import type { RuntimeFactory } from '../service/runtime.js';
import { printJson, printTable } from './output.js';

const SIZE_UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** "4G", "512M", "1048576" → bytes. */
export function parseSize(s: string): number {
  const m = /^(\d+)([KMGT]?)(i?B)?$/i.exec(s.trim());
  const unit = m ? SIZE_UNITS[(m[2] ?? '').toUpperCase()] : undefined;
  const bytes = m && unit !== undefined ? Number(m[1]) * unit : NaN;
  if (!Number.isSafeInteger(bytes)) {
    throw new InvalidArgumentError(`expected a size such as 1G, 512M or 1048576 (at most ${Number.MAX_SAFE_INTEGER} bytes), got ${JSON.stringify(s)}`);
  }
  return bytes;
}

function parsePositiveInt(s: string): number {
  if (!/^\d+$/.test(s) || Number(s) < 1 || !Number.isSafeInteger(Number(s))) {
    throw new InvalidArgumentError(`expected a positive integer, got ${JSON.stringify(s)}`);
  }
  return Number(s);
}

function checkUuid(uuid: string): string {
  if (!isUuid(uuid)) throw new InvalidInstanceId(uuid);
  return uuid;
}

/** `instances create|delete` manage the qemu backend's own instances; libvirt's are the operator's domains. */
function qemuBackend(rt: Runtime, command: string): QemuHypervisor {
  if (rt.qemu === undefined) {
    throw new UsageError(
      `instances ${command} works with [hypervisor] driver = qemu only: the ${rt.hv.driver} backend's instances are defined by the operator (e.g. virsh define, virsh undefine)`,
    );
  }
  return rt.qemu;
}

/** A path given on the command line is relative to the working directory. */
function absolute(file: string | undefined): string | undefined {
  return file === undefined ? undefined : path.resolve(file);
}

export function registerInstancesCommands(program: Command, runtime: RuntimeFactory): void {
  const instances = program.command('instances').description('guests of the qemu backend');

  instances
    .command('list')
    .option('--json', 'print an array of {uuid, name, state}')
    .action(async (opts: { json?: boolean }) => {
      const { hv } = await runtime();
      const list = await hv.list();
      if (opts.json) return printJson(list);
      printTable(['uuid', 'name', 'state'], list.map((i) => [i.uuid, i.name, i.state]));
    });

  instances
    .command('create')
    .description('create a guest with a new qcow2 disk (or one on top of a base image)')
    .requiredOption('--name <name>', 'instance name')
    .option('--uuid <uuid>', 'instance uuid (default: a new one)')
    .option('--memory-mb <n>', 'RAM in MiB', parsePositiveInt, 128)
    .option('--vcpus <n>', 'virtual CPUs', parsePositiveInt, 1)
    .option('--machine <type>', 'QEMU machine type', 'pc')
    .option('--disk-size <size>', 'disk size, e.g. 1G (default 1G, or the base image size)', parseSize)
    .option('--base-image <file>', 'create the disk on top of this image')
    .option('--base-format <fmt>', 'format of the base image: qcow2 or raw', 'qcow2')
    .option('--memory-file <file>', 'map the guest RAM privately from this file (its content is the initial RAM)')
    .option('--kernel <file>', 'boot this kernel directly (-kernel), on every power on and resume')
    .option('--initrd <file>', 'initial ramdisk of --kernel')
    .option('--cmdline <string>', 'kernel command line of --kernel')
    .option('--start', 'start the guest after creating it')
    .option('--json', 'print JSON')
    .action(
      async (opts: {
        name: string;
        uuid?: string;
        memoryMb: number;
        vcpus: number;
        machine: string;
        diskSize?: number;
        baseImage?: string;
        baseFormat: string;
        memoryFile?: string;
        kernel?: string;
        initrd?: string;
        cmdline?: string;
        start?: boolean;
        json?: boolean;
      }) => {
        if (opts.baseFormat !== 'qcow2' && opts.baseFormat !== 'raw') {
          throw new UsageError(`--base-format: expected qcow2 or raw, got ${JSON.stringify(opts.baseFormat)}`);
        }
        const uuid = checkUuid(opts.uuid ?? randomUUID());
        const rt = await runtime();
        let info = await qemuBackend(rt, 'create').createInstance({
          uuid,
          name: opts.name,
          memoryMb: opts.memoryMb,
          vcpus: opts.vcpus,
          machine: opts.machine,
          diskSizeBytes: opts.diskSize ?? (opts.baseImage ? undefined : 2 ** 30),
          baseImage: opts.baseImage,
          baseImageFormat: opts.baseFormat,
          memoryFile: absolute(opts.memoryFile),
          kernel: absolute(opts.kernel),
          initrd: absolute(opts.initrd),
          cmdline: opts.cmdline,
        });
        if (opts.start) {
          await rt.lifecycle.start(uuid);
          info = await rt.hv.info(uuid);
        }
        if (opts.json) printJson(info);
        else process.stdout.write(`${info.uuid}\n`);
      },
    );

  const simple = (name: string, description: string, act: (rt: Runtime, uuid: string, opts: Record<string, unknown>) => Promise<unknown>) =>
    instances
      .command(`${name} <uuid>`)
      .description(description)
      .action(async (uuid: string, opts: Record<string, unknown>) => {
        checkUuid(uuid);
        const rt = await runtime();
        await rt.hv.info(uuid); // an unknown instance is refused before its lock (a file) is taken
        await rt.locks.hold(uuid, `instances ${name} command`, { waitMs: 0 }, () => act(rt, uuid, opts));
        process.stdout.write(`${uuid} ${(await rt.hv.info(uuid)).state}\n`);
      });

  simple('start', 'power on (deletes pending snapshots first)', (rt, uuid) => rt.lifecycle.start(uuid));
  simple('stop', 'power off: ACPI first, forced after [hypervisor] shutdown_timeout', (rt, uuid, o) =>
    rt.lifecycle.stop(uuid, !o.force),
  ).option('--force', 'no ACPI power-down: stop at once');
  simple('reboot', 'soft reboot (guest reset, same process) or --hard (new process)', (rt, uuid, o) =>
    o.hard ? rt.lifecycle.hardReboot(uuid) : rt.lifecycle.softReboot(uuid),
  ).option('--hard', 'restart the QEMU process (deletes pending snapshots)');
  simple('suspend', 'managed save: RAM to a state file, the process exits', (rt, uuid) => rt.lifecycle.suspend(uuid));
  simple('resume', 'resume from the managed save, to the prior state', (rt, uuid) => rt.lifecycle.resume(uuid));
  simple('pause', 'stop the vCPUs (process kept)', (rt, uuid) => rt.hv.pause(uuid));
  simple('unpause', 'restart the vCPUs', (rt, uuid) => rt.hv.unpause(uuid));

  instances
    .command('delete <uuid>')
    .description('stop the guest and remove its folder (disk included)')
    .action(async (uuid: string) => {
      checkUuid(uuid);
      const rt = await runtime();
      await rt.hv.info(uuid);
      const qemu = qemuBackend(rt, 'delete');
      await rt.locks.hold(uuid, 'instances delete command', { waitMs: 0 }, () => qemu.deleteInstance(uuid));
    });
}
