import { spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import { QemuProcessError } from '../../errors.js';
import { escapeOptValue } from '../../qemu-img/qemu-img.js';
import type { BootFields, InstanceLayout, InstanceRecord } from './layout.js';

/**
 * The QEMU command line of an instance, and launching it daemonized.
 *
 * The command line must be the same for a managed save and the resume that follows (the saved
 * device state has to fit the new process), so it is built from instance.json only; a resume
 * appends `-S -incoming defer` and nothing else.
 */

/** Node name of the guest disk's qcow2 layer: the `device` of internal-snapshot QMP commands. */
export const DISK_NODE = 'disk0';
/** QOM path of the virtio-blk backend (for HMP `qemu-io -d`). */
export const DISK_QOM_PATH = '/machine/peripheral/virtio-disk0/virtio-backend';
/** The virtio-serial port name qemu-ga looks for inside the guest. */
export const GUEST_AGENT_PORT = 'org.qemu.guest_agent.0';
/** The chardev behind the guest agent's port (`query-chardev` says whether the guest opened it). */
export const GUEST_AGENT_CHARDEV = 'qga0';
/** QOM id of the RAM backend of a guest whose RAM comes from a file. */
const RAM_BACKEND_ID = 'ram0';

/** The chardev of the guest's serial console (a file, appended). */
const CONSOLE_CHARDEV = 'console0';

/**
 * `boot` is the record's kernel/initrd/cmdline resolved to absolute paths (resolveBootFiles): the
 * same on power on and on resume, since both build the command line from instance.json.
 */
export function qemuArgv(record: InstanceRecord, layout: InstanceLayout, accel: string, boot: BootFields = {}): string[] {
  const e = escapeOptValue;
  // RAM mapped privately from a file: the guest starts with its content, the file never changes.
  const ramBackend =
    record.memory_file === undefined
      ? []
      : ['-object', `memory-backend-file,id=${RAM_BACKEND_ID},size=${record.memory_mb}M,mem-path=${e(record.memory_file)},share=off`];
  const machineRam = record.memory_file === undefined ? '' : `,memory-backend=${RAM_BACKEND_ID}`;
  return [
    '-nodefaults',
    '-no-user-config',
    ...ramBackend,
    '-machine', `${e(record.machine)},accel=${e(accel)}${machineRam}`,
    '-m', String(record.memory_mb),
    '-smp', String(record.vcpus),
    '-display', 'none',
    // -kernel, -initrd and -append take plain values, not option lists: no escaping.
    ...(boot.kernel === undefined ? [] : ['-kernel', boot.kernel]),
    ...(boot.initrd === undefined ? [] : ['-initrd', boot.initrd]),
    ...(boot.cmdline === undefined ? [] : ['-append', boot.cmdline]),
    // The serial console, appended across processes (power on, resume): never truncated.
    '-chardev', `file,id=${CONSOLE_CHARDEV},path=${e(layout.consoleLog)},append=on`,
    '-serial', `chardev:${CONSOLE_CHARDEV}`,
    '-uuid', record.uuid,
    // `guest=` keeps a name holding "=" from being read as an option key.
    '-name', `guest=${e(record.name)}`,
    '-blockdev', `driver=file,filename=${e(layout.disk)},node-name=${DISK_NODE}-file`,
    '-blockdev', `driver=qcow2,node-name=${DISK_NODE},file=${DISK_NODE}-file`,
    '-device', `virtio-blk-pci,drive=${DISK_NODE},id=virtio-disk0`,
    // Guest agent channel, after the disk so that the disk keeps its PCI slot. A managed save
    // made without it still loads (QEMU 7.2 leaves the new device at reset; the guest sees it
    // after its next boot); no released version ever made such a save.
    '-chardev', `socket,id=${GUEST_AGENT_CHARDEV},path=${e(layout.guestAgentSocket)},server=on,wait=off`,
    '-device', 'virtio-serial-pci,id=virtio-serial0',
    '-device', `virtserialport,bus=virtio-serial0.0,nr=1,chardev=${GUEST_AGENT_CHARDEV},id=channel0,name=${GUEST_AGENT_PORT}`,
    '-qmp', `unix:${e(layout.qmpSocket)},server=on,wait=off`,
    // -pidfile takes a plain path, not an option list: no escaping.
    '-pidfile', layout.pidFile,
    '-daemonize',
  ];
}

/** Extra arguments of a process that is to receive a managed-save state. */
export const INCOMING_ARGS: readonly string[] = ['-S', '-incoming', 'defer'];

/**
 * Runs QEMU with `-daemonize` and waits for the launching parent to exit: by then the guest
 * process is up, its pidfile and QMP socket exist. The launch's stdout and stderr go to
 * `logFile`; on failure its content is part of the QemuProcessError.
 */
export async function launchDaemonized(
  binary: string,
  argv: readonly string[],
  logFile: string,
  label = 'QEMU',
  /** Bound on the launch until QEMU has daemonized (`[hypervisor] qmp_timeout`); unbounded when unset. */
  timeoutMs?: number,
  /** Open descriptors the process inherits, as its fds 3, 4, … (e.g. a saved state to load). */
  inherit: readonly number[] = [],
): Promise<void> {
  const log = await fs.open(logFile, 'w', 0o640);
  let code: number | null;
  let signal: NodeJS.Signals | null;
  let timedOut = false;
  try {
    [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
      const child = spawn(binary, [...argv], { stdio: ['ignore', log.fd, log.fd, ...inherit] });
      // The launching parent exits once the daemon is up; one that does not is killed (its daemon
      // child, finding no parent to report to, exits too).
      const timer =
        timeoutMs === undefined
          ? undefined
          : setTimeout(() => {
              timedOut = true;
              child.kill('SIGKILL');
            }, timeoutMs);
      child.on('error', (err) => {
        clearTimeout(timer);
        reject(new QemuProcessError(`cannot run ${binary}: ${err.message}`, { cause: err }));
      });
      child.on('exit', (c, s) => {
        clearTimeout(timer);
        resolve([c, s]);
      });
    });
  } finally {
    await log.close();
  }
  if (timedOut) {
    const out = (await fs.readFile(logFile, 'utf8').catch(() => '')).trim();
    throw new QemuProcessError(
      `${label} did not start within ${timeoutMs! / 1000} s ([hypervisor] qmp_timeout): killed${out ? `: ${out}` : ''}`,
    );
  }
  if (code !== 0) {
    const stderr = (await fs.readFile(logFile, 'utf8').catch(() => '')).trim();
    const how = code !== null ? `exit code ${code}` : `signal ${signal}`;
    throw new QemuProcessError(`${label} failed to start (${how}): ${stderr || '(no output)'}`);
  }
}
