import type { Config } from '../../config/schema.js';
import { InstanceInvalidState, InstanceNotFound, LibvirtError, QmpError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { QemuImg, qemuImgFromConfig } from '../../qemu-img/qemu-img.js';
import { isUuid } from '../../util/uuid.js';
import type {
  ExportDest,
  BackupJob,
  DiskInfo,
  ExportOptions,
  Hypervisor,
  InstanceInfo,
  InternalSnapshot,
  LiveSnapshotResult,
  LaunchHooks,
  ResumeResult,
  SaveResult,
} from '../types.js';
import { qmpReturn } from '../qmp-reply.js';
import { startPullBackup } from './backup.js';
import { formatNodeName, type DomainXml } from './domain-xml.js';
import { LibvirtDomains, parseDomInfo, powerStateOf, type DomainInfo } from './domains.js';
import { abortJob, managedSave, resume, type SaveRestoreContext } from './managed-save.js';
import { DomainEventWatch } from './monitor-events.js';
import { freezeFilesystems, guestAgentAvailable, thawFilesystems, type AgentContext } from './quiesce.js';
import { Virsh } from './virsh.js';

export interface LibvirtHypervisorOptions {
  virsh: string;
  uri: string;
  qemuImg: QemuImg;
  /** Bound of a quick virsh command. */
  commandTimeoutMs: number;
  /** Bound of a managed save or a restore. */
  jobTimeoutMs: number;
  /** How long a graceful stop waits for the guest to power off before destroying it. */
  shutdownTimeoutMs: number;
  /**
   * Rate limit (bytes/s; qemu-img convert -r) of a copy no one waits for of a running or paused
   * domain's disk: live's copy, and the export of an internal snapshot while it runs; unset or 0:
   * unlimited.
   */
  runningExportSpeed?: number;
  log: Logger;
}

const STATE_POLL_MS = 200;

/**
 * The `libvirt` backend (SPEC §4): the operator's domains of a local libvirtd, driven through virsh.
 * Instances are domains (instance uuid = domain uuid); the root disk is the first qcow2 file disk.
 * Managed save and restore, backup jobs and the guest agent are libvirt's own; the domain's QEMU
 * monitor is used only for internal snapshots of a running domain (`virsh qemu-monitor-command`).
 */
export class LibvirtHypervisor implements Hypervisor {
  readonly driver = 'libvirt' as const;
  readonly supportsLiveBackup = true;
  private readonly virsh: Virsh;
  private readonly domains: LibvirtDomains;
  private readonly qemuImg: QemuImg;
  private readonly log: Logger;
  private readonly saves: SaveRestoreContext;
  private readonly agent: AgentContext;

  constructor(private readonly opts: LibvirtHypervisorOptions) {
    this.log = opts.log;
    this.qemuImg = opts.qemuImg;
    this.virsh = new Virsh({ binary: opts.virsh, uri: opts.uri, commandTimeoutMs: opts.commandTimeoutMs });
    this.domains = new LibvirtDomains(this.virsh, this.log);
    this.saves = {
      domains: this.domains,
      virsh: this.virsh,
      log: this.log,
      jobTimeoutMs: opts.jobTimeoutMs,
      commandTimeoutMs: opts.commandTimeoutMs,
      watches: new Map<string, DomainEventWatch>(),
    };
    this.agent = { domains: this.domains, virsh: this.virsh, log: this.log };
  }

  // ---- instances ------------------------------------------------------------------------------

  async list(): Promise<InstanceInfo[]> {
    const uuids = (await this.virsh.run(['list', '--all', '--uuid'])).split('\n').map((l) => l.trim()).filter(isUuid);
    if (uuids.length === 0) return [];
    let blocks: string[];
    try {
      // One virsh process for all of them (each costs 60–120 ms to start).
      blocks = [await this.virsh.run([uuids.map((u) => `dominfo ${u}`).join('; ')])];
    } catch (err) {
      if (!(err instanceof LibvirtError)) throw err;
      // A domain undefined between the two calls fails the whole batch: ask one by one, and a
      // domain that is gone by then is simply not listed.
      blocks = [];
      for (const u of uuids) {
        try {
          blocks.push(await this.virsh.run(['dominfo', u], { uuid: u }));
        } catch (e) {
          if (!(e instanceof InstanceNotFound)) throw e;
        }
      }
    }
    const infos = blocks
      .flatMap((out) => out.split(/^(?=Id:)/m))
      .filter((block) => block.trim() !== '')
      .map((block) => {
        const i = parseDomInfo(block);
        const active = i.libvirtState !== 'shut off' && i.libvirtState !== 'crashed';
        return { uuid: i.uuid, name: i.name, state: powerStateOf(i.libvirtState, i.managedSave && !active) };
      });
    return infos.sort((a, b) => a.name.localeCompare(b.name));
  }

  async info(uuid: string): Promise<InstanceInfo> {
    const d = await this.domains.probe(uuid);
    return { uuid: d.uuid, name: d.name, state: d.state };
  }

  /** The root disk (UnsupportedInstance for a domain without a qcow2 file disk). */
  async diskInfo(uuid: string): Promise<DiskInfo> {
    const { rootDisk } = (await this.domains.probeWithXml(uuid)).xml;
    const i = await this.qemuImg.info(rootDisk.path, { forceShare: true });
    return { path: rootDisk.path, virtualSize: i.virtualSize, actualSize: i.actualSize };
  }

  /** A transient domain cannot be managed-saved: refused before anything is touched. */
  async checkSnapshottable(uuid: string, needs: { managedSave: boolean }): Promise<void> {
    const d = await this.domains.probeWithXml(uuid);
    if (needs.managedSave && (d.state === 'running' || d.state === 'paused')) this.domains.requirePersistent(d, 'take this snapshot, which needs a managed save');
  }

  // ---- power ----------------------------------------------------------------------------------

  async start(uuid: string, hooks: LaunchHooks = {}): Promise<void> {
    const d = await this.domains.probe(uuid);
    if (d.state !== 'shutoff' && d.state !== 'crashed') throw invalidState(d, 'start');
    if (d.state === 'crashed') await this.virsh.run(['destroy', d.uuid], { uuid: d.uuid }).catch(() => undefined);
    await hooks.beforeLaunch?.(d.uuid);
    await this.virsh.run(['start', d.uuid], { uuid: d.uuid, timeoutMs: this.opts.jobTimeoutMs });
    this.log.info({ instance_uuid: d.uuid }, 'domain started');
  }

  async stop(uuid: string, opts: { graceful: boolean }): Promise<void> {
    const d = await this.domains.probe(uuid);
    if (d.state === 'shutoff' || d.state === 'saved') throw invalidState(d, 'stop');
    const log = this.log.child({ instance_uuid: d.uuid });
    if (opts.graceful && d.state === 'running') {
      await this.virsh.run(['shutdown', d.uuid], { uuid: d.uuid });
      const deadline = Date.now() + this.opts.shutdownTimeoutMs;
      while (Date.now() < deadline) {
        if ((await this.domains.probe(d.uuid)).state === 'shutoff') {
          log.info('domain powered off by the guest');
          return;
        }
        await new Promise((r) => setTimeout(r, STATE_POLL_MS));
      }
      log.warn({ timeout_ms: this.opts.shutdownTimeoutMs }, 'guest did not power off in time: destroying the domain');
    }
    await this.virsh.run(['destroy', d.uuid], { uuid: d.uuid, timeoutMs: this.opts.jobTimeoutMs });
    log.info('domain stopped');
  }

  /**
   * libvirt's own reboot of a QEMU domain, with the ACPI power button (`--mode acpi`, as the qemu
   * backend: libvirt would otherwise prefer the guest agent): its QEMU process is kept, and once the
   * guest has shut down libvirt resets and continues it ("fake reboot"), which QEMU reports as RESET.
   * False when no RESET came within `waitMs` (or the domain is paused): the caller hard reboots it.
   */
  async softReboot(uuid: string, opts: { waitMs: number }): Promise<boolean> {
    const d = await this.domains.probe(uuid);
    if (d.state !== 'running' && d.state !== 'paused') throw invalidState(d, 'reboot');
    if (d.state === 'paused' || opts.waitMs <= 0) return false;
    const watch = await DomainEventWatch.open(this.virsh.opts, d.uuid, this.log, this.opts.commandTimeoutMs);
    try {
      const since = Date.now();
      await this.virsh.run(['reboot', d.uuid, '--mode', 'acpi'], { uuid: d.uuid });
      const reset = await watch.find('RESET', since, opts.waitMs);
      if (reset === undefined) {
        this.log.warn({ instance_uuid: d.uuid, wait_ms: opts.waitMs }, 'guest did not shut down on the ACPI power button in time');
        return false;
      }
      return true;
    } finally {
      watch.close();
    }
  }

  async pause(uuid: string): Promise<void> {
    const d = await this.domains.probe(uuid);
    if (d.state !== 'running') throw invalidState(d, 'pause');
    await this.virsh.run(['suspend', d.uuid], { uuid: d.uuid });
  }

  async unpause(uuid: string): Promise<void> {
    const d = await this.domains.probe(uuid);
    if (d.state !== 'paused') throw invalidState(d, 'unpause');
    await this.virsh.run(['resume', d.uuid], { uuid: d.uuid });
  }

  managedSave(uuid: string): Promise<SaveResult> {
    return managedSave(this.saves, uuid);
  }

  resume(uuid: string, hooks?: LaunchHooks): Promise<ResumeResult> {
    return resume(this.saves, uuid, hooks);
  }

  /**
   * A libvirt job the dead agent left (a managed save under way, our backup job) is aborted; libvirt
   * then resumes a guest whose save was cancelled, and removes a pull backup's socket and scratch
   * file. A stale managed-save image of an active domain is removed on sight (LibvirtDomains.probe).
   */
  async endInterruptedWork(uuid: string): Promise<string[]> {
    const d = await this.domains.probe(uuid);
    const log = this.log.child({ instance_uuid: d.uuid });
    const done: string[] = [];
    if (d.state === 'running' || d.state === 'paused') {
      const operation = await abortJob(this.saves, d.uuid, log);
      if (operation !== undefined) done.push(`aborted a libvirt ${operation} job left running`);
    }
    if (done.length > 0) log.warn({ actions: done }, 'settled what an interrupted operation left');
    return done;
  }

  // ---- internal snapshots and export ----------------------------------------------------------

  async listInternalSnapshots(uuid: string): Promise<InternalSnapshot[]> {
    const { rootDisk } = await this.domains.xml(uuid);
    return this.qemuImg.snapshotList(rootDisk.path);
  }

  async offlineSnapshotCreate(uuid: string, name: string): Promise<void> {
    const d = await this.domains.requireInactive(uuid, `qemu-img snapshot -c ${name}`);
    await this.qemuImg.snapshotCreate(d.xml.rootDisk.path, name);
  }

  async offlineSnapshotDelete(uuid: string, name: string): Promise<void> {
    const d = await this.domains.requireInactive(uuid, `qemu-img snapshot -d ${name}`);
    await this.qemuImg.snapshotDelete(d.xml.rootDisk.path, name);
  }

  async liveSnapshotCreate(uuid: string, name: string): Promise<LiveSnapshotResult> {
    const d = await this.domains.requireActive(uuid, 'blockdev-snapshot-internal-sync through the monitor');
    // virsh's own timing of the command: libvirt's round trip to QEMU and back, virsh's start left out.
    const commandMs = await this.monitorSnapshot(d, 'blockdev-snapshot-internal-sync', name);
    return { ioHeldMs: commandMs };
  }

  async liveSnapshotDelete(uuid: string, name: string): Promise<void> {
    const d = await this.domains.requireActive(uuid, 'blockdev-snapshot-delete-internal-sync through the monitor');
    await this.monitorSnapshot(d, 'blockdev-snapshot-delete-internal-sync', name);
  }

  /**
   * Through the domain's QEMU monitor, bounded by the job timeout (both walk the whole disk's
   * refcounts); virsh exits 0 even when QMP answers an error, so the reply is read. Resolves with how
   * long the command took (virsh -t).
   */
  private async monitorSnapshot(d: { uuid: string; xml: DomainXml }, command: string, name: string): Promise<number> {
    const device = formatNodeName(d.xml.rootDisk);
    const args = ['qemu-monitor-command', d.uuid, JSON.stringify({ execute: command, arguments: { device, name } })];
    const { stdout, commandMs } = await this.virsh.runTimed(args, { uuid: d.uuid, timeoutMs: this.opts.jobTimeoutMs });
    qmpReply(command, stdout);
    return commandMs;
  }

  async exportDisk(uuid: string, opts: ExportOptions): Promise<void> {
    if (opts.snapshotName === undefined) {
      const d = await this.domains.requireInactive(uuid, 'export the active layer of the disk');
      await this.qemuImg.convertToRaw(d.xml.rootDisk.path, opts.dest, { onProgress: opts.onProgress, background: opts.background });
      return;
    }
    // An internal snapshot's clusters are never rewritten while it exists: safe to read with -U.
    const d = await this.domains.probeWithXml(uuid);
    const active = d.state === 'running' || d.state === 'paused';
    const speed = this.opts.runningExportSpeed;
    const limited = active && opts.background === true && speed !== undefined && speed > 0;
    await this.qemuImg.convertToRaw(d.xml.rootDisk.path, opts.dest, {
      snapshotName: opts.snapshotName,
      forceShare: active,
      onProgress: opts.onProgress,
      background: opts.background,
      rateLimit: limited ? speed : undefined,
      sizeBytes: opts.virtualSize,
    });
  }

  async startLiveBackup(uuid: string, dest: ExportDest | string): Promise<BackupJob> {
    const d = await this.domains.requireActive(uuid, 'start a live backup');
    const { virtualSize } = await this.qemuImg.info(d.xml.rootDisk.path, { forceShare: true });
    return startPullBackup({ virsh: this.virsh, qemuImg: this.qemuImg, log: this.log, speed: this.opts.runningExportSpeed }, d.xml, virtualSize, dest);
  }

  // ---- guest agent ----------------------------------------------------------------------------

  guestAgentAvailable(uuid: string, timeoutMs: number): Promise<boolean> {
    return guestAgentAvailable(this.agent, uuid, timeoutMs);
  }

  freezeFilesystems(uuid: string, timeoutMs: number): Promise<number> {
    return freezeFilesystems(this.agent, uuid, timeoutMs);
  }

  thawFilesystems(uuid: string, timeoutMs: number): Promise<number> {
    return thawFilesystems(this.agent, uuid, timeoutMs);
  }
}

/** A QMP reply printed by `virsh qemu-monitor-command`: its `return`, or a QmpError. */
export function qmpReply(command: string, out: string): unknown {
  let reply: unknown;
  try {
    reply = JSON.parse(out);
  } catch {
    throw new QmpError(command, 'UnparseableReply', out.trim().slice(0, 200));
  }
  if (typeof reply !== 'object' || reply === null) throw new QmpError(command, 'UnparseableReply', out.trim().slice(0, 200));
  return qmpReturn(command, reply as Record<string, unknown>);
}

function invalidState(d: DomainInfo, action: string): InstanceInvalidState {
  return new InstanceInvalidState(`cannot ${action} domain ${d.name} (${d.uuid}): it is ${d.state}`);
}

/** The libvirt backend as configured (`[hypervisor]`). */
export function fromConfig(config: Config, log: Logger): LibvirtHypervisor {
  return new LibvirtHypervisor({
    virsh: config.hypervisor.virsh,
    uri: config.hypervisor.libvirt_uri,
    qemuImg: qemuImgFromConfig(config.hypervisor, config.DEFAULT.agent_cpus),
    commandTimeoutMs: config.hypervisor.qmp_timeout * 1000,
    jobTimeoutMs: config.hypervisor.job_timeout * 1000,
    shutdownTimeoutMs: config.hypervisor.shutdown_timeout * 1000,
    runningExportSpeed: config.hypervisor.running_export_rate_mb * 2 ** 20,
    log,
  });
}
