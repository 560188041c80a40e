import type { Config } from '../../config/schema.js';
import { QemuProcessError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { qemuImgFromConfig } from '../../qemu-img/qemu-img.js';
import type {
  ExportDest,
  DiskInfo,
  ExportOptions,
  Hypervisor,
  InstanceFactory,
  InstanceInfo,
  InstanceSpec,
  InternalSnapshot,
  LiveSnapshotResult,
  LaunchHooks,
  ResumeResult,
  SaveResult,
} from '../types.js';
import * as disk from './disk.js';
import { QemuGuests, type QemuGuestsOptions } from './guests.js';
import * as instances from './instances.js';
import { endInterruptedWork } from './interrupted-work.js';
import type { LiveBackupOptions, QemuBackupJob } from './live-backup.js';
import * as saves from './managed-save.js';
import * as power from './power.js';
import type { QmpClient } from './qmp.js';
import * as quiesce from './quiesce.js';

export { powerStateOfRunState } from './guests.js';

const DEFAULT_JOB_TIMEOUT_MS = 600_000;

export interface QemuHypervisorOptions extends QemuGuestsOptions {
  /** How long a graceful stop waits for the guest to power off before forcing it. */
  shutdownTimeoutMs: number;
  /**
   * Bound on a long job in the guest's QEMU that must not be abandoned half-way (an internal snapshot
   * created or deleted through the monitor walks the whole disk's refcounts), and on the migration of
   * a managed save (cancelled when it fires: the guest runs on) or of a resume. Default 600 s.
   */
  jobTimeoutMs?: number;
  /** Test hook: sees the connection a managed save's stream arrives on, before it is read (saves.SaveOptions). */
  beforeReadingSaveStream?: saves.SaveOptions['beforeReadingSaveStream'];
  /**
   * Rate limit (bytes/s; qemu-img convert -r) of a copy no one waits for of a running or paused
   * guest's disk: live's copy, and the export of an internal snapshot while the guest runs; unset or
   * 0: unlimited.
   */
  runningExportSpeed?: number;
  /**
   * copy-before-write `cbw-timeout` of live backups (whole seconds): a guest write whose copy into
   * the local fleece image takes longer breaks the backup instead of waiting on. Default 5.
   */
  liveBackupCbwTimeoutS?: number;
  /** Test hook: awaited before each QMP command that starts a live backup (live-backup.ts). */
  liveBackupBeforeStartCommand?: LiveBackupOptions['beforeStartCommand'];
  /** Where the guest agent of an instance is reached; default `<instance dir>/qga.sock` (tests point it elsewhere). */
  guestAgentSocket?: (uuid: string) => string;
}

/**
 * The `qemu` backend (SPEC §4): QEMU processes the agent launches itself, daemonized. This class only
 * delegates: the core is QemuGuests (guests.ts), each job has its own module.
 */
export class QemuHypervisor implements Hypervisor, InstanceFactory {
  readonly driver = 'qemu' as const;
  readonly supportsLiveBackup = true;
  readonly instancesPath: string;
  private readonly jobTimeoutMs: number;
  private readonly guests: QemuGuests;

  constructor(private readonly opts: QemuHypervisorOptions) {
    this.instancesPath = opts.instancesPath;
    this.jobTimeoutMs = opts.jobTimeoutMs ?? DEFAULT_JOB_TIMEOUT_MS;
    this.guests = new QemuGuests(opts);
  }

  // ---- instances ------------------------------------------------------------------------------

  createInstance(spec: InstanceSpec): Promise<InstanceInfo> {
    return instances.createInstance(this.guests, spec);
  }

  deleteInstance(uuid: string): Promise<void> {
    return instances.deleteInstance(this.guests, uuid);
  }

  list(): Promise<InstanceInfo[]> {
    return instances.list(this.guests);
  }

  info(uuid: string): Promise<InstanceInfo> {
    return instances.info(this.guests, uuid);
  }

  // ---- power ----------------------------------------------------------------------------------

  start(uuid: string, hooks: LaunchHooks = {}): Promise<void> {
    return power.start(this.guests, uuid, hooks);
  }

  stop(uuid: string, opts: { graceful: boolean }): Promise<void> {
    return power.stop(this.guests, uuid, opts, this.opts.shutdownTimeoutMs);
  }

  softReboot(uuid: string, opts: { waitMs: number }): Promise<boolean> {
    return power.softReboot(this.guests, uuid, opts.waitMs);
  }

  pause(uuid: string): Promise<void> {
    return power.pause(this.guests, uuid);
  }

  unpause(uuid: string): Promise<void> {
    return power.unpause(this.guests, uuid);
  }

  // ---- managed save ---------------------------------------------------------------------------

  managedSave(uuid: string): Promise<SaveResult> {
    return saves.managedSave(this.guests, uuid, this.saveOptions());
  }

  resume(uuid: string, hooks: LaunchHooks = {}): Promise<ResumeResult> {
    return saves.resume(this.guests, uuid, hooks, this.saveOptions());
  }

  private saveOptions(): saves.SaveOptions {
    return { jobTimeoutMs: this.jobTimeoutMs, beforeReadingSaveStream: this.opts.beforeReadingSaveStream };
  }

  endInterruptedWork(uuid: string): Promise<string[]> {
    return endInterruptedWork(this.guests, uuid);
  }

  // ---- disk: internal snapshots, export, live backup ------------------------------------------

  diskInfo(uuid: string): Promise<DiskInfo> {
    return disk.diskInfo(this.guests, uuid);
  }

  listInternalSnapshots(uuid: string): Promise<InternalSnapshot[]> {
    return disk.listInternalSnapshots(this.guests, uuid);
  }

  offlineSnapshotCreate(uuid: string, name: string): Promise<void> {
    return disk.offlineSnapshotCreate(this.guests, uuid, name);
  }

  offlineSnapshotDelete(uuid: string, name: string): Promise<void> {
    return disk.offlineSnapshotDelete(this.guests, uuid, name);
  }

  async liveSnapshotCreate(uuid: string, name: string): Promise<LiveSnapshotResult> {
    await this.requireActiveDisk(uuid, `create internal snapshot ${name} through its monitor`);
    return disk.liveSnapshotCreate(this.guests, uuid, name, this.jobTimeoutMs);
  }

  async liveSnapshotDelete(uuid: string, name: string): Promise<void> {
    await this.requireActiveDisk(uuid, `delete internal snapshot ${name} through its monitor`);
    return disk.liveSnapshotDelete(this.guests, uuid, name, this.jobTimeoutMs);
  }

  /**
   * Refuses to work on a disk its QEMU holds inactive (a resume whose `cont` failed: saves.diskInactive):
   * QEMU 7.2 dies when asked to delete an internal snapshot of it. The guest has to run first.
   */
  private async requireActiveDisk(uuid: string, what: string): Promise<void> {
    const p = await this.guests.requireProcess(uuid, what);
    if (await this.guests.withQmp(p.layout, (qmp) => saves.diskInactive(qmp))) {
      throw new QemuProcessError(
        `cannot ${what}: the disk of instance ${p.layout.uuid} is inactive in its QEMU (the saved state was loaded, ` +
          `but the disk could not be activated: another process may hold its write lock); the guest must run first`,
      );
    }
  }

  exportDisk(uuid: string, opts: ExportOptions): Promise<void> {
    return disk.exportDisk(this.guests, uuid, opts, this.opts.runningExportSpeed);
  }

  async startLiveBackup(uuid: string, dest: ExportDest | string): Promise<QemuBackupJob> {
    await this.requireActiveDisk(uuid, 'start a live backup');
    return disk.startLiveBackup(this.guests, uuid, dest, {
      speed: this.opts.runningExportSpeed,
      cbwTimeoutS: this.opts.liveBackupCbwTimeoutS,
      beforeStartCommand: this.opts.liveBackupBeforeStartCommand,
    });
  }

  // ---- guest agent ----------------------------------------------------------------------------

  guestAgentAvailable(uuid: string, timeoutMs: number): Promise<boolean> {
    return quiesce.guestAgentAvailable(this.guests, uuid, timeoutMs, this.opts.guestAgentSocket);
  }

  freezeFilesystems(uuid: string, timeoutMs: number): Promise<number> {
    return quiesce.freezeFilesystems(this.guests, uuid, timeoutMs, this.opts.guestAgentSocket);
  }

  thawFilesystems(uuid: string, timeoutMs: number): Promise<number> {
    return quiesce.thawFilesystems(this.guests, uuid, timeoutMs, this.opts.guestAgentSocket);
  }

  // ---- monitor access for tests and the CLI ---------------------------------------------------

  /** Runs one QMP command on the guest's QEMU; resolves with its `return` value. */
  async qmp<T = unknown>(uuid: string, execute: string, args?: Record<string, unknown>): Promise<T> {
    const p = await this.guests.requireProcess(uuid, `run QMP ${execute}`);
    return this.guests.withQmp(p.layout, (qmp) => qmp.execute<T>(execute, args));
  }

  /**
   * Runs `fn` with the guest's QMP connection, which this object's overlapping operations share
   * (e.g. to watch events while they run).
   */
  async withMonitor<T>(uuid: string, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    const p = await this.guests.requireProcess(uuid, 'use the QMP monitor');
    return this.guests.withQmp(p.layout, fn);
  }

  /** Runs one HMP command line (`human-monitor-command`); resolves with its output. */
  async hmp(uuid: string, commandLine: string): Promise<string> {
    return this.qmp<string>(uuid, 'human-monitor-command', { 'command-line': commandLine });
  }
}

/** The qemu backend as configured (`[DEFAULT] instances_path`, `[hypervisor]`). */
export function fromConfig(config: Config, log: Logger): QemuHypervisor {
  return new QemuHypervisor({
    instancesPath: config.DEFAULT.instances_path,
    qemuBinary: config.hypervisor.qemu_binary,
    agentCpus: config.DEFAULT.agent_cpus || undefined,
    qemuImg: qemuImgFromConfig(config.hypervisor, config.DEFAULT.agent_cpus),
    accel: config.hypervisor.accel,
    shutdownTimeoutMs: config.hypervisor.shutdown_timeout * 1000,
    jobTimeoutMs: config.hypervisor.job_timeout * 1000,
    liveBackupCbwTimeoutS: config.hypervisor.backup_cbw_timeout,
    runningExportSpeed: config.hypervisor.running_export_rate_mb * 2 ** 20,
    qmpTimeoutMs: config.hypervisor.qmp_timeout * 1000,
    log,
  });
}
