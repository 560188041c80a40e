import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { dir } from 'tmp-promise';
import { processesWhere } from '../../src/util/processes.js';
import { buildRuntime, type Runtime } from '../../src/service/runtime.js';
import { defaultConfig, type Config } from '../../src/config/schema.js';
import { GuestConsole } from '../../src/guest-check/console.js';
import { waitForGuestReady } from '../../src/guest-check/ready.js';
import { parseKeyValues } from '../../src/hypervisor/libvirt/virsh.js';
import { silentLogger, type Logger } from '../../src/log.js';
import type { BeforeStep } from '../../src/snapshot/run-steps.js';
import { runProgram } from '../../src/util/exec.js';
import { testGuestDomainXml } from '../../src/guest-check/domain-xml.js';
import { linuxGuestImage } from './linux-guest.js';

/**
 * A real libvirtd for integration tests, through scripts/libvirtd.sh (Debian 12's libvirt 9.0,
 * under tini, no systemd; one per host, shared by every test file). Nothing here skips: when libvirtd
 * cannot run, the test fails with the script's output. Domains get unique names and are destroyed
 * and undefined (with their managed-save images) by cleanup().
 */

const SCRIPT = fileURLToPath(new URL('../../scripts/libvirtd.sh', import.meta.url));
export const LIBVIRT_URI = 'qemu:///system';
const VIRSH_TIMEOUT_MS = 120_000;

export async function libvirtdScript(command: 'start' | 'stop' | 'restart' | 'kill' | 'status'): Promise<void> {
  const res = await runProgram('bash', [SCRIPT, command], { timeoutMs: 120_000 }).catch((err: Error) => {
    throw new Error(`scripts/libvirtd.sh ${command} could not run: ${err.message}`);
  });
  if (res.code !== 0) {
    throw new Error(
      `libvirtd is required by this test and scripts/libvirtd.sh ${command} failed (exit ${res.code}); install it with scripts/setup.sh.\n${res.stdout}${res.stderr}`,
    );
  }
}

/** Runs virsh against the test libvirtd; throws with virsh's message on a non-zero exit. */
export async function virsh(...args: string[]): Promise<string> {
  const res = await runProgram('virsh', ['-q', '-c', LIBVIRT_URI, ...args], { timeoutMs: VIRSH_TIMEOUT_MS });
  if (res.code !== 0) throw new Error(`virsh ${args.join(' ')} failed (exit ${res.code}): ${res.stderr.trim()}`);
  return res.stdout;
}

/** What libvirt itself says of a domain: state with reason, managed-save image, job. */
export async function libvirtView(uuid: string): Promise<{ state: string; managedSave: boolean; job: string }> {
  const state = (await virsh('domstate', uuid, '--reason')).trim();
  const managedSave = parseKeyValues(await virsh('dominfo', uuid)).get('Managed save') === 'yes';
  // An inactive domain has no job (virsh refuses to ask: "domain is not running").
  const job = state.startsWith('shut off') ? 'None' : (parseKeyValues(await virsh('domjobinfo', uuid)).get('Job type') ?? 'None');
  return { state, managedSave, job };
}

export interface DomainOptions {
  /** `linux`: the test guest booted directly (its writer, probe and agent); `bare`: no OS at all. */
  guest: 'linux' | 'bare';
  memoryMb?: number;
  /** Root disk format (a domain with a raw root disk is refused by the agent). */
  format?: 'qcow2' | 'raw';
  /** Defined (default) or transient (`virsh create`). */
  persistent?: boolean;
  /** Started (default), and for a linux guest waited for until its agent answers. */
  start?: boolean;
  /** A second, data disk (vdb, qcow2) besides the root disk. */
  dataDisk?: boolean;
  /** Extra virtual disk size for a bare guest's root disk, MiB (default 64). */
  diskMb?: number;
}

export interface TestDomain {
  uuid: string;
  name: string;
  dir: string;
  disk: string;
  console: GuestConsole;
}

export interface LibvirtBench {
  base: string;
  /**
   * This bench's `[snapshot] name_prefix`. Every test file shares the host's one libvirtd, and an
   * agent's orphan scan looks at every domain there: with the default prefix, one file's agent would
   * take another file's snapshots under way for its own orphans and delete them (as it should, were it
   * the host's only agent). A prefix per bench keeps each agent to its own.
   */
  prefix: string;
  rt: Runtime;
  /** Another runtime on the same folders (libvirt backend) with other options. */
  runtimeWith(snapshot: Partial<Config['snapshot']>, opts?: { beforeStep?: BeforeStep; log?: Logger; storePath?: string }): Runtime;
  /** A config file for the CLI and `serve` on the same folders. */
  configFile(snapshot: Partial<Record<keyof Config['snapshot'], string | number>>, extra?: string[]): Promise<string>;
  domain(opts: DomainOptions): Promise<TestDomain>;
  cleanup(): Promise<void>;
}

/** SIGKILLs every process whose command line holds one of the strings (not this one). */
async function killProcessesNaming(needles: readonly string[]): Promise<void> {
  if (needles.length === 0) return;
  const listeners = await processesWhere((argv) => argv.includes('qemu-monitor-event') && needles.some((n) => argv.some((a) => a.includes(n))));
  for (const { pid } of listeners) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }
}

export async function makeLibvirtBench(snapshot: Partial<Config['snapshot']> = {}): Promise<LibvirtBench> {
  await libvirtdScript('start');
  const base = (await dir({ prefix: 'sdv-' })).path;
  const prefix = `sdt${process.pid}-`;
  const created: string[] = [];
  let n = 0;
  const runtimeWith = (opts: Partial<Config['snapshot']>, hooks: { beforeStep?: BeforeStep; log?: Logger; storePath?: string } = {}): Runtime => {
    const config = defaultConfig();
    config.hypervisor.driver = 'libvirt';
    config.hypervisor.shutdown_timeout = 30;
    config.DEFAULT.state_path = path.join(base, 's');
    config.DEFAULT.instances_path = path.join(base, 'unused-instances');
    config.image_store.path = hooks.storePath ?? path.join(base, 'images');
    config.image_store.reserved_space_mb = 0;
    config.snapshot.name_prefix = prefix;
    Object.assign(config.snapshot, opts);
    return buildRuntime(config, hooks.log ?? silentLogger(), hooks);
  };
  const rt = runtimeWith(snapshot);
  return {
    base,
    prefix,
    rt,
    runtimeWith,
    async configFile(snap, extra = []) {
      const file = path.join(base, `agent-${randomUUID().slice(0, 8)}.conf`);
      const lines = [
        '[DEFAULT]',
        'transport_url = memory:///libvirt-bench',
        'instances_path = unused-instances',
        'state_path = s',
        '[snapshot]',
        `name_prefix = ${prefix}`,
        ...Object.entries(snap).map(([k, v]) => `${k} = ${v}`),
        '[hypervisor]',
        'driver = libvirt',
        'shutdown_timeout = 30',
        // A bare domain ignores the ACPI power button: a soft reboot turns hard after 1 s.
        'wait_soft_reboot_seconds = 1',
        '[image_store]',
        'path = images',
        'reserved_space_mb = 0',
        ...extra,
        '',
      ];
      await fs.writeFile(file, lines.join('\n'));
      return file;
    },
    async domain(opts) {
      const linux = opts.guest === 'linux';
      const uuid = randomUUID();
      const name = `sdt-${process.pid}-${++n}`;
      const ddir = path.join(base, name);
      await fs.mkdir(ddir);
      const format = opts.format ?? 'qcow2';
      const disk = path.join(ddir, `disk.${format}`);
      if (linux) {
        const img = await linuxGuestImage();
        if (format === 'raw') await runProgram('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img.rootDisk, disk]);
        else await runProgram('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', img.rootDisk, '-F', 'qcow2', disk]);
      } else {
        await runProgram('qemu-img', ['create', '-q', '-f', format, disk, `${opts.diskMb ?? 64}M`]);
      }
      const dataDisk = opts.dataDisk ? path.join(ddir, 'data.qcow2') : undefined;
      if (dataDisk) await runProgram('qemu-img', ['create', '-q', '-f', 'qcow2', dataDisk, '16M']);
      const consoleLog = path.join(ddir, 'console.log');
      const xmlFile = path.join(ddir, 'domain.xml');
      await fs.writeFile(
        xmlFile,
        testGuestDomainXml({ name, uuid, disk, format, dataDisk, console: consoleLog, memoryMb: opts.memoryMb ?? 128, guest: linux ? await linuxGuestImage() : undefined }),
      );
      created.push(uuid);
      const persistent = opts.persistent ?? true;
      const start = opts.start ?? true;
      if (persistent) {
        await virsh('define', xmlFile);
        if (start) await virsh('start', uuid);
      } else {
        await virsh('create', xmlFile);
      }
      const dom: TestDomain = { uuid, name, dir: ddir, disk, console: new GuestConsole(consoleLog) };
      if ((start || !persistent) && linux) await waitForGuestReady(rt.hv, uuid, dom.console);
      return dom;
    },
    async cleanup() {
      // Event listeners of agents the tests SIGKILLed (they end by themselves, later).
      await killProcessesNaming(created);
      for (const uuid of created) {
        await runProgram('virsh', ['-q', '-c', LIBVIRT_URI, 'destroy', uuid], { timeoutMs: VIRSH_TIMEOUT_MS }).catch(() => undefined);
        await runProgram('virsh', ['-q', '-c', LIBVIRT_URI, 'undefine', uuid, '--managed-save', '--snapshots-metadata'], { timeoutMs: VIRSH_TIMEOUT_MS }).catch(() => undefined);
      }
      await fs.rm(base, { recursive: true, force: true });
    },
  };
}
