import fs from 'node:fs/promises';
import path from 'node:path';
import type { Config } from '../../config/schema.js';
import {
  GuestAgentError,
  InstanceExists,
  InstanceInvalidState,
  InstanceNotFound,
  InvalidInstanceId,
  QemuProcessError,
  QmpDisconnected,
  SafetyViolation,
  UsageError,
  errorMessage,
} from '../../errors.js';
import type { Logger } from '../../log.js';
import { QemuImg } from '../../qemu-img/qemu-img.js';
import { isUuid } from '../../util/uuid.js';
import { faultPoint, faultPointAfterOutput } from '../../util/fault.js';
import type {
  DiskInfo,
  ExportOptions,
  Hypervisor,
  InstanceFactory,
  InstanceInfo,
  InstanceSpec,
  InternalSnapshot,
  LaunchHooks,
  PowerState,
  ResumeResult,
  SaveResult,
} from '../types.js';
import {
  bootFieldsProblem,
  InstanceLayout,
  type BootFields,
  type InstanceRecord,
  readInstanceRecord,
  resolveBootFiles,
  readManagedSaveRecord,
  writeJsonAtomic,
} from './layout.js';
import { fsyncDir, pathExists } from '../../util/durable-fs.js';
import { DISK_NODE, GUEST_AGENT_CHARDEV, INCOMING_ARGS, launchDaemonized, qemuArgv } from './launch.js';
import { MigrationReceiver, sendMigrationStream } from './migration-stream.js';
import { findGuestProcess, killGuest, waitForGuestExit } from './qemu-process.js';
import { fsCount, withGuestAgent } from './guest-agent.js';
import { cancelOurBackupJobs, QemuBackupJob, startLiveBackup } from './live-backup.js';
import { eventTimeMs, type QmpClient } from './qmp.js';
import { QmpSessions } from './qmp-sessions.js';

export interface QemuHypervisorOptions {
  instancesPath: string;
  qemuBinary: string;
  qemuImg: QemuImg;
  /** `-machine accel=`: "kvm", "tcg" or a fallback list such as "kvm:tcg". */
  accel: string;
  /** How long a graceful stop waits for the guest to power off before forcing it. */
  shutdownTimeoutMs: number;
  /** Default timeout of each QMP command. */
  qmpTimeoutMs: number;
  log: Logger;
  /** Copy rate limit of live backups in bytes/s (QMP `speed`); unset or 0: unlimited. */
  liveBackupSpeed?: number;
  /** Where the guest agent of an instance is reached; default `<instance dir>/qga.sock` (tests point it elsewhere). */
  guestAgentSocket?: (uuid: string) => string;
}

/** Maps a QMP `query-status` run state to a power state. */
export function powerStateOfRunState(status: string): PowerState {
  switch (status) {
    case 'running':
      return 'running';
    case 'internal-error':
    case 'guest-panicked':
    case 'shutdown':
      return 'crashed';
    default:
      // paused, prelaunch, inmigrate, postmigrate, finish-migrate, save-vm, restore-vm, io-error, ...
      return 'paused';
  }
}

/** Lifts QEMU's default 128 MiB/s migration cap for saves into a file (as libvirt does). */
const UNLIMITED_BANDWIDTH = Number.MAX_SAFE_INTEGER;
const MIGRATION_POLL_MS = 10;
/** After SIGKILL, how long to wait for the kernel to reap the process. */
const KILL_WAIT_MS = 10_000;
const MACHINE_RE = /^[A-Za-z0-9._-]{1,64}$/;

interface Probe {
  layout: InstanceLayout;
  record: InstanceRecord;
  state: PowerState;
  /** The guest's live QEMU process, if any. */
  pid?: number;
}

interface MigrateInfo {
  status?: string;
  'error-desc'?: string;
}

/** The `qemu` backend (SPEC §4): QEMU processes the agent launches itself, daemonized. */
export class QemuHypervisor implements Hypervisor, InstanceFactory {
  readonly driver = 'qemu' as const;
  readonly supportsLiveBackup = true;
  readonly instancesPath: string;
  private readonly qemuImg: QemuImg;
  private readonly sessions: QmpSessions;
  private readonly log: Logger;

  constructor(private readonly opts: QemuHypervisorOptions) {
    this.instancesPath = opts.instancesPath;
    this.qemuImg = opts.qemuImg;
    this.log = opts.log;
    this.sessions = new QmpSessions(opts.qmpTimeoutMs);
  }

  // ---- instances ------------------------------------------------------------------------------

  async createInstance(spec: InstanceSpec): Promise<InstanceInfo> {
    const layout = this.layoutOf(spec.uuid);
    validateSpec(spec);
    layout.assertSocketPathsFit();
    const boot: BootFields = { kernel: spec.kernel, initrd: spec.initrd, cmdline: spec.cmdline };
    // Relative boot files are relative to the instance folder, which does not exist yet.
    await resolveBootFiles(layout.dir, boot).catch((err: unknown) => {
      throw new UsageError(`invalid instance spec for ${spec.uuid}: ${errorMessage(err)}`);
    });
    await fs.mkdir(this.instancesPath, { recursive: true });
    try {
      await fs.mkdir(layout.dir, { mode: 0o750 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new InstanceExists(layout.uuid);
      throw err;
    }
    const record: InstanceRecord = {
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
    try {
      await this.qemuImg.create(layout.disk, {
        sizeBytes: spec.diskSizeBytes,
        backing: spec.baseImage,
        backingFormat: spec.baseImageFormat,
      });
      await writeJsonAtomic(layout.instanceJson, record);
    } catch (err) {
      await fs.rm(layout.dir, { recursive: true, force: true });
      throw err;
    }
    this.log.info({ instance_uuid: layout.uuid, instance_name: spec.name }, 'instance created');
    return { uuid: layout.uuid, name: spec.name, state: 'shutoff' };
  }

  async deleteInstance(uuid: string): Promise<void> {
    const p = await this.probeProcess(uuid);
    if (p.pid !== undefined) await this.endProcess(p.layout, p.pid, 'quit');
    await fs.rm(p.layout.dir, { recursive: true, force: true });
    this.log.info({ instance_uuid: p.layout.uuid }, 'instance deleted');
  }

  async list(): Promise<InstanceInfo[]> {
    let names: string[];
    try {
      names = await fs.readdir(this.instancesPath);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const infos = await Promise.all(
      names
        .filter((n) => isUuid(n) && n === n.toLowerCase())
        .map((n) =>
          this.info(n).catch((err: unknown) => {
            if (err instanceof InstanceNotFound) return undefined;
            throw err;
          }),
        ),
    );
    return infos.filter((i): i is InstanceInfo => i !== undefined).sort((a, b) => a.name.localeCompare(b.name));
  }

  async info(uuid: string): Promise<InstanceInfo> {
    const p = await this.probe(uuid);
    return { uuid: p.layout.uuid, name: p.record.name, state: p.state };
  }

  async diskInfo(uuid: string): Promise<DiskInfo> {
    const { layout } = await this.probeProcess(uuid);
    const i = await this.qemuImg.info(layout.disk, { forceShare: true });
    return { path: layout.disk, virtualSize: i.virtualSize, actualSize: i.actualSize };
  }

  // ---- power ----------------------------------------------------------------------------------

  async start(uuid: string, hooks: LaunchHooks = {}): Promise<void> {
    const p = await this.probe(uuid);
    if (p.state !== 'shutoff' && p.state !== 'crashed') throw invalidState(p, 'start');
    // A crashed guest may still have its (stopped) process: end it first.
    if (p.pid !== undefined) await this.endProcess(p.layout, p.pid, 'quit');
    await hooks.beforeLaunch?.(p.layout.uuid);
    await this.launch(p.layout, p.record, []);
    this.log.info({ instance_uuid: p.layout.uuid }, 'instance started');
  }

  async stop(uuid: string, opts: { graceful: boolean }): Promise<void> {
    const p = await this.probe(uuid);
    if (p.state === 'shutoff' || p.state === 'saved') throw invalidState(p, 'stop');
    const log = this.log.child({ instance_uuid: p.layout.uuid });
    if (p.pid === undefined) {
      // Crashed and gone: only its runtime files are left.
      await removeFiles(p.layout.staleRuntimeFiles);
      log.info('crashed instance cleaned up');
      return;
    }
    // A paused guest cannot act on an ACPI power-down: no point waiting for it.
    if (opts.graceful && p.state === 'running') {
      await this.withQmp(p.layout, (qmp) => qmp.execute('system_powerdown'));
      if (await waitForGuestExit(p.pid, p.layout.uuid, this.opts.shutdownTimeoutMs)) {
        await removeFiles(p.layout.processFiles);
        log.info('instance powered off by the guest');
        return;
      }
      log.warn({ timeout_ms: this.opts.shutdownTimeoutMs }, 'guest did not power off in time: forcing');
    }
    await this.endProcess(p.layout, p.pid, 'quit');
    log.info('instance stopped');
  }

  async softReboot(uuid: string): Promise<void> {
    const p = await this.probe(uuid);
    if (p.state !== 'running' && p.state !== 'paused') throw invalidState(p, 'reboot');
    await this.withQmp(p.layout, (qmp) => qmp.execute('system_reset'));
  }

  async pause(uuid: string): Promise<void> {
    const p = await this.probe(uuid);
    if (p.state !== 'running') throw invalidState(p, 'pause');
    await this.withQmp(p.layout, (qmp) => qmp.execute('stop'));
  }

  async unpause(uuid: string): Promise<void> {
    const p = await this.probe(uuid);
    if (p.state !== 'paused') throw invalidState(p, 'unpause');
    await this.withQmp(p.layout, (qmp) => qmp.execute('cont'));
  }

  // ---- managed save ---------------------------------------------------------------------------

  async managedSave(uuid: string): Promise<SaveResult> {
    const p = await this.probe(uuid);
    if ((p.state !== 'running' && p.state !== 'paused') || p.pid === undefined) throw invalidState(p, 'save');
    const { layout } = p;
    const priorState = p.state;
    const log = this.log.child({ instance_uuid: layout.uuid });
    layout.assertSocketPathsFit();

    let vcpusStoppedAt: number | undefined;
    const bytes = await this.withQmp(layout, async (qmp) => {
      // Everything that can be prepared is, before the guest stops: downtime starts at `stop`.
      await removeFiles([layout.saveSocket, layout.saveStatePartial]);
      await qmp.execute('migrate-set-parameters', { 'max-bandwidth': UNLIMITED_BANDWIDTH });
      const receiver = await MigrationReceiver.listen(layout.saveSocket, layout.saveStatePartial);
      let bytes: number;
      try {
        if (priorState === 'running') vcpusStoppedAt = await this.stopVcpus(qmp, log);
        await qmp.execute('migrate', { uri: `unix:${layout.saveSocket}` });
        await faultPointAfterOutput('managed-save:migrating');
        [, bytes] = await Promise.all([this.waitForMigration(qmp, 'save'), receiver.done]);
        await receiver.close();
        // managed-save.json first: a state file never exists without it.
        await writeJsonAtomic(layout.saveMeta, { prior_state: priorState, bytes });
        await fs.rename(layout.saveStatePartial, layout.saveState);
        await fsyncDir(layout.dir);
      } catch (err) {
        await receiver.close().catch(() => undefined);
        await this.undoSave(qmp, layout, priorState, log);
        throw err;
      }
      // The state is on disk: from here the process only has to go.
      await qmp.execute('quit').catch((err: unknown) => {
        if (!(err instanceof QmpDisconnected)) log.warn({ err: errorMessage(err) }, 'quit after managed save failed');
      });
      return bytes;
    });
    await this.endProcess(layout, p.pid, 'quit-sent');
    log.info({ prior_state: priorState, bytes }, 'instance managed-saved');
    return vcpusStoppedAt === undefined ? { priorState, bytes } : { priorState, bytes, vcpusStoppedAt };
  }

  /** QMP `stop`; resolves with when the vCPUs stopped (the STOP event's time). */
  private async stopVcpus(qmp: QmpClient, log: Logger): Promise<number> {
    const stopped = qmp.waitForEvent('STOP', undefined, this.opts.qmpTimeoutMs);
    stopped.catch(() => undefined);
    const sentAt = Date.now();
    await qmp.execute('stop');
    return stopped.then(eventTimeMs, (err: unknown) => {
      // The vCPUs did stop (the command succeeded): the send time bounds it from below.
      log.warn({ err: errorMessage(err) }, 'no STOP event after stop: downtime measured from the command');
      return sentAt;
    });
  }

  /** QMP `cont`; resolves with when the vCPUs ran again (the RESUME event's time). */
  private async continueVcpus(qmp: QmpClient, log: Logger): Promise<number> {
    const resumed = qmp.waitForEvent('RESUME', undefined, this.opts.qmpTimeoutMs);
    resumed.catch(() => undefined);
    await qmp.execute('cont');
    const answeredAt = Date.now();
    return resumed.then(eventTimeMs, (err: unknown) => {
      log.warn({ err: errorMessage(err) }, 'no RESUME event after cont: downtime measured to the reply');
      return answeredAt;
    });
  }

  /** Leaves a guest whose save failed as it was: partial files removed, vCPUs running again if they were. */
  private async undoSave(qmp: QmpClient, layout: InstanceLayout, priorState: 'running' | 'paused', log: Logger): Promise<void> {
    await this.cancelMigration(qmp).catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'migrate_cancel failed'));
    await removeFiles([layout.saveStatePartial, layout.saveState, layout.saveMeta, `${layout.saveMeta}.tmp`, layout.saveSocket]).catch(
      (err: unknown) => log.warn({ err: errorMessage(err) }, 'cannot remove partial managed-save files'),
    );
    if (priorState === 'running') {
      await qmp.execute('cont').catch((err: unknown) => log.error({ err: errorMessage(err) }, 'cannot resume the guest after a failed save'));
    }
  }

  async settleAfterCrash(uuid: string): Promise<string[]> {
    const p = await this.probeProcess(uuid);
    const { layout } = p;
    const log = this.log.child({ instance_uuid: layout.uuid });
    const done: string[] = [];
    let quitSent = false;
    let unfinishedResume = false;
    if (p.pid !== undefined) {
      await this.withQmp(layout, async (qmp) => {
        // A process still waiting for (or loading) the saved state is a resume that never finished:
        // the state file is kept until a load completes, so ending the process leaves the guest saved.
        if ((await qmp.execute<{ status: string }>('query-status')).status === 'inmigrate') {
          unfinishedResume = true;
          return;
        }
        const mig = await qmp.execute<MigrateInfo>('query-migrate');
        if (mig.status === 'completed' && (await pathExists(layout.saveState))) {
          // The save was complete and in place; only the process had not gone yet.
          await qmp.execute('quit').catch((err: unknown) => {
            if (!(err instanceof QmpDisconnected)) throw err;
          });
          quitSent = true;
          done.push('ended the process of a completed managed save');
          return;
        }
        if (mig.status !== undefined && !['none', 'completed', 'failed', 'cancelled'].includes(mig.status)) {
          await this.cancelMigration(qmp);
          done.push(`cancelled a managed save left ${mig.status}`);
        }
        const jobs = await cancelOurBackupJobs(qmp, log, this.opts.qmpTimeoutMs);
        if (jobs.length > 0) done.push(`cancelled backup job(s) ${jobs.join(', ')}`);
      });
      if (quitSent) await this.endProcess(layout, p.pid, 'quit-sent');
      if (unfinishedResume) {
        await this.endProcess(layout, p.pid, 'kill');
        await removeFiles([layout.restoreSocket]);
        done.push('ended a resume that had not finished loading the saved state (the state is kept)');
      }
    }
    if (!(await pathExists(layout.saveState))) {
      // A state file is valid only once renamed into place (with its record written first).
      const leftovers = [layout.saveStatePartial, layout.saveMeta, `${layout.saveMeta}.tmp`, layout.saveSocket];
      const present = (await Promise.all(leftovers.map(pathExists))).some(Boolean);
      await removeFiles(leftovers);
      if (present) done.push('removed the files of an unfinished managed save');
    }
    if (done.length > 0) log.warn({ actions: done }, 'settled what an interrupted operation left');
    return done;
  }

  async resume(uuid: string, hooks: LaunchHooks = {}): Promise<ResumeResult> {
    const p = await this.probe(uuid);
    if (p.state !== 'saved') throw invalidState(p, 'resume');
    const { layout } = p;
    const log = this.log.child({ instance_uuid: layout.uuid });
    const saved = await readManagedSaveRecord(layout.saveMeta).catch((err: unknown) => {
      throw new QemuProcessError(`cannot resume instance ${layout.uuid}: ${errorMessage(err)}`, { cause: err });
    });
    await hooks.beforeLaunch?.(layout.uuid);
    const pid = await this.launch(layout, p.record, INCOMING_ARGS);
    let loaded = false;
    let state: PowerState;
    let vcpusResumedAt: number | undefined;
    try {
      state = await this.withQmp(layout, async (qmp) => {
        await qmp.execute('migrate-incoming', { uri: `unix:${layout.restoreSocket}` });
        faultPoint('resume:loading');
        await sendMigrationStream(layout.restoreSocket, layout.saveState);
        await this.waitForMigration(qmp, 'restore');
        loaded = true;
        // The new process holds the state now. Remove the file before the guest runs again: a
        // state file older than the disk must never be resumed later.
        await removeFiles([layout.saveState, layout.saveMeta, layout.restoreSocket]);
        await fsyncDir(layout.dir);
        faultPoint('resume:loaded');
        if (saved.prior_state === 'running') vcpusResumedAt = await this.continueVcpus(qmp, log);
        return this.queryPowerState(qmp);
      });
    } catch (err) {
      // Once loaded, the new process is the guest: it must not be killed.
      if (loaded) throw err;
      const died = (await findGuestProcess(layout.pidFile, layout.uuid)) === undefined;
      log.error({ err: errorMessage(err), qemu_exited: died }, 'resume failed: ending the new process, keeping the saved state');
      await this.endProcess(layout, pid, 'kill').catch((e: unknown) =>
        log.error({ err: errorMessage(e) }, 'cannot end the failed QEMU process'),
      );
      await removeFiles([layout.restoreSocket]);
      if (died) {
        throw new QemuProcessError(
          `cannot resume instance ${layout.uuid}: its QEMU exited while loading the saved state ` +
            `(${errorMessage(err)}); the saved state is kept`,
          { cause: err },
        );
      }
      throw err;
    }
    log.info({ state }, 'instance resumed from managed save');
    return vcpusResumedAt === undefined ? { state } : { state, vcpusResumedAt };
  }

  // ---- internal snapshots and export ----------------------------------------------------------

  async listInternalSnapshots(uuid: string): Promise<InternalSnapshot[]> {
    const { layout } = await this.probeProcess(uuid);
    return this.qemuImg.snapshotList(layout.disk);
  }

  async offlineSnapshotCreate(uuid: string, name: string): Promise<void> {
    const { layout } = await this.requireNoProcess(uuid, `qemu-img snapshot -c ${name}`);
    await this.qemuImg.snapshotCreate(layout.disk, name);
  }

  async offlineSnapshotDelete(uuid: string, name: string): Promise<void> {
    const { layout } = await this.requireNoProcess(uuid, `qemu-img snapshot -d ${name}`);
    await this.qemuImg.snapshotDelete(layout.disk, name);
  }

  async liveSnapshotCreate(uuid: string, name: string): Promise<void> {
    const p = await this.requireProcess(uuid, 'create an internal snapshot through QMP');
    await this.withQmp(p.layout, (qmp) => qmp.execute('blockdev-snapshot-internal-sync', { device: DISK_NODE, name }));
  }

  async liveSnapshotDelete(uuid: string, name: string): Promise<void> {
    const p = await this.requireProcess(uuid, 'delete an internal snapshot through QMP');
    await this.withQmp(p.layout, (qmp) =>
      qmp.execute('blockdev-snapshot-delete-internal-sync', { device: DISK_NODE, name }),
    );
  }

  async exportDisk(uuid: string, opts: ExportOptions): Promise<void> {
    if (opts.snapshotName === undefined) {
      const { layout } = await this.requireNoProcess(uuid, 'export the active layer of the disk');
      await this.qemuImg.convertToRaw(layout.disk, opts.dest, { onProgress: opts.onProgress });
      return;
    }
    // An internal snapshot's clusters are never rewritten while it exists: safe to read with -U.
    const p = await this.probeProcess(uuid);
    await this.qemuImg.convertToRaw(p.layout.disk, opts.dest, {
      snapshotName: opts.snapshotName,
      forceShare: p.pid !== undefined,
      onProgress: opts.onProgress,
    });
  }

  // ---- live backup ---------------------------------------------------------------------------

  async startLiveBackup(uuid: string, dest: string): Promise<QemuBackupJob> {
    const { layout, pid } = await this.requireProcess(uuid, 'start a live backup');
    const alive = async () => (await findGuestProcess(layout.pidFile, layout.uuid)) === pid;
    return startLiveBackup(
      {
        withQmp: async (fn) => {
          if (!(await alive())) {
            throw new InstanceInvalidState(`live backup of instance ${layout.uuid}: its QEMU process ${pid} is gone`);
          }
          return this.withQmp(layout, fn);
        },
        alive,
        qemuImg: this.qemuImg,
        log: this.log.child({ instance_uuid: layout.uuid }),
        timeoutMs: this.opts.qmpTimeoutMs,
        speed: this.opts.liveBackupSpeed,
      },
      dest,
    );
  }

  // ---- guest agent ----------------------------------------------------------------------------

  async guestAgentAvailable(uuid: string, timeoutMs: number): Promise<boolean> {
    const { layout, pid } = await this.probeProcess(uuid);
    if (pid === undefined) return false;
    // As libvirt does: no agent in the guest has the port open, so nothing can answer; asking would
    // only wait out the timeout. (A test-provided agent socket has no such port to ask about.)
    if (this.opts.guestAgentSocket === undefined && !(await this.guestAgentPortOpen(layout))) {
      this.log.debug({ instance_uuid: layout.uuid }, 'no guest agent: the guest has not opened its channel');
      return false;
    }
    try {
      await withGuestAgent(this.guestAgentSocket(layout), timeoutMs, 'reach the guest agent', async () => undefined);
      return true;
    } catch (err) {
      if (!(err instanceof GuestAgentError)) throw err;
      this.log.debug({ instance_uuid: layout.uuid, err: err.message }, 'no guest agent');
      return false;
    }
  }

  async freezeFilesystems(uuid: string, timeoutMs: number): Promise<number> {
    const { layout } = await this.requireProcess(uuid, 'freeze the guest filesystems');
    const socket = this.guestAgentSocket(layout);
    let sent = false;
    try {
      return await withGuestAgent(socket, timeoutMs, `freeze the filesystems of instance ${layout.uuid}`, async (agent) => {
        sent = true;
        return fsCount('guest-fsfreeze-freeze', await agent.execute('guest-fsfreeze-freeze', undefined, timeoutMs));
      });
    } catch (err) {
      if (!sent) throw err;
      // A freeze that got no answer may still happen (or have half happened): never leave a guest
      // frozen behind a failed freeze. Thawing filesystems that are not frozen is harmless. The
      // agent answers nothing before it is done freezing, hence the longer wait.
      const thawed = await this.thawFilesystems(uuid, 2 * timeoutMs).then(
        (n) => `thawed ${n} afterwards`,
        (e: unknown) => `the thaw afterwards failed too, the guest may stay frozen: ${errorMessage(e)}`,
      );
      throw new GuestAgentError(`${errorMessage(err)} (${thawed})`, { cause: err });
    }
  }

  async thawFilesystems(uuid: string, timeoutMs: number): Promise<number> {
    const { layout } = await this.requireProcess(uuid, 'thaw the guest filesystems');
    return withGuestAgent(this.guestAgentSocket(layout), timeoutMs, `thaw the filesystems of instance ${layout.uuid}`, async (agent) =>
      fsCount('guest-fsfreeze-thaw', await agent.execute('guest-fsfreeze-thaw', undefined, timeoutMs)),
    );
  }

  /** Whether the guest has opened the agent's virtio-serial port (QMP query-chardev `frontend-open`). */
  private async guestAgentPortOpen(layout: InstanceLayout): Promise<boolean> {
    const chardevs = await this.withQmp(layout, (qmp) => qmp.execute<{ label: string; 'frontend-open'?: boolean }[]>('query-chardev'));
    return chardevs.find((c) => c.label === GUEST_AGENT_CHARDEV)?.['frontend-open'] === true;
  }

  private guestAgentSocket(layout: InstanceLayout): string {
    return this.opts.guestAgentSocket?.(layout.uuid) ?? layout.guestAgentSocket;
  }

  // ---- monitor access for tests and the CLI ---------------------------------------------------

  /** Runs one QMP command on the guest's QEMU; resolves with its `return` value. */
  async qmp<T = unknown>(uuid: string, execute: string, args?: Record<string, unknown>): Promise<T> {
    const p = await this.requireProcess(uuid, `run QMP ${execute}`);
    return this.withQmp(p.layout, (qmp) => qmp.execute<T>(execute, args));
  }

  /**
   * Runs `fn` with the guest's QMP connection, which this object's overlapping operations share
   * (e.g. to watch events while they run).
   */
  async withMonitor<T>(uuid: string, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    const p = await this.requireProcess(uuid, 'use the QMP monitor');
    return this.withQmp(p.layout, fn);
  }

  /** Runs one HMP command line (`human-monitor-command`); resolves with its output. */
  async hmp(uuid: string, commandLine: string): Promise<string> {
    return this.qmp<string>(uuid, 'human-monitor-command', { 'command-line': commandLine });
  }

  // ---- internals ------------------------------------------------------------------------------

  private layoutOf(uuid: string): InstanceLayout {
    if (!isUuid(uuid)) throw new InvalidInstanceId(uuid);
    return new InstanceLayout(this.instancesPath, uuid.toLowerCase());
  }

  private async readRecord(layout: InstanceLayout): Promise<InstanceRecord> {
    try {
      return await readInstanceRecord(layout.instanceJson);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new InstanceNotFound(layout.uuid);
      throw err;
    }
  }

  /** The instance and its live process (if any), without asking QEMU anything. */
  private async probeProcess(uuid: string): Promise<Omit<Probe, 'state'>> {
    const layout = this.layoutOf(uuid);
    const record = await this.readRecord(layout);
    const pid = await findGuestProcess(layout.pidFile, layout.uuid);
    return { layout, record, pid };
  }

  /** The instance with its power state (asks QEMU over QMP when a process is alive). */
  private async probe(uuid: string): Promise<Probe> {
    for (let attempt = 0; ; attempt++) {
      const p = await this.probeProcess(uuid);
      if (p.pid === undefined) return { ...p, state: await this.offlineState(p.layout) };
      try {
        const state = await this.withQmp(p.layout, (qmp) => this.queryPowerState(qmp));
        return { ...p, state };
      } catch (err) {
        // The process may have exited between the pid check and the query: look again, once.
        if (attempt === 0 && (await findGuestProcess(p.layout.pidFile, p.layout.uuid)) === undefined) continue;
        throw err;
      }
    }
  }

  private async offlineState(layout: InstanceLayout): Promise<PowerState> {
    if (await pathExists(layout.saveState)) return 'saved';
    // QEMU removes its pidfile when it exits cleanly; one left behind means it died.
    if (await pathExists(layout.pidFile)) return 'crashed';
    return 'shutoff';
  }

  private async queryPowerState(qmp: QmpClient): Promise<PowerState> {
    const st = await qmp.execute<{ status: string }>('query-status');
    return powerStateOfRunState(st.status);
  }

  private async requireProcess(uuid: string, what: string): Promise<Omit<Probe, 'state'> & { pid: number }> {
    const p = await this.probeProcess(uuid);
    if (p.pid === undefined) {
      const state = await this.offlineState(p.layout);
      throw new InstanceInvalidState(`cannot ${what}: instance ${p.layout.uuid} has no QEMU process (it is ${state})`);
    }
    return { ...p, pid: p.pid };
  }

  /** SPEC §2: nothing but the guest's own QEMU may touch the disk while that QEMU has it open. */
  private async requireNoProcess(uuid: string, what: string): Promise<Omit<Probe, 'state'>> {
    const p = await this.probeProcess(uuid);
    if (p.pid !== undefined) {
      throw new SafetyViolation(
        `refusing to ${what} on ${p.layout.disk}: QEMU process ${p.pid} of instance ${p.layout.uuid} has the disk open`,
      );
    }
    return p;
  }

  private withQmp<T>(layout: InstanceLayout, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    return this.sessions.use(layout.qmpSocket, fn);
  }

  /** Launches the guest's QEMU daemonized; resolves with its pid. */
  private async launch(layout: InstanceLayout, record: InstanceRecord, extraArgs: readonly string[]): Promise<number> {
    layout.assertSocketPathsFit();
    const boot = await resolveBootFiles(layout.dir, record).catch((err: unknown) => {
      throw new QemuProcessError(`cannot start instance ${layout.uuid}: ${layout.instanceJson}: ${errorMessage(err)}`);
    });
    await removeFiles(layout.staleRuntimeFiles);
    const argv = [...qemuArgv(record, layout, this.opts.accel, boot), ...extraArgs];
    this.log.debug({ instance_uuid: layout.uuid, argv }, 'launching QEMU');
    await launchDaemonized(this.opts.qemuBinary, argv, layout.qemuLog, `QEMU of instance ${layout.uuid}`);
    const pid = await findGuestProcess(layout.pidFile, layout.uuid);
    if (pid === undefined) {
      const out = (await fs.readFile(layout.qemuLog, 'utf8').catch(() => '')).trim();
      throw new QemuProcessError(`QEMU of instance ${layout.uuid} exited right after starting: ${out || '(no output)'}`);
    }
    return pid;
  }

  /**
   * Ends the guest's process and removes its runtime files. `quit`: send QMP quit and wait for the
   * exit; `quit-sent`: only wait; `kill`: SIGKILL at once. SIGKILL is the last resort of all three.
   */
  private async endProcess(layout: InstanceLayout, pid: number, how: 'quit' | 'quit-sent' | 'kill'): Promise<void> {
    const uuid = layout.uuid;
    if (how === 'quit') {
      await this.withQmp(layout, (qmp) => qmp.execute('quit')).catch((err: unknown) => {
        if (!(err instanceof QmpDisconnected)) {
          this.log.warn({ instance_uuid: uuid, err: errorMessage(err) }, 'QMP quit failed');
        }
      });
    }
    const waitMs = how === 'kill' ? 0 : this.opts.qmpTimeoutMs;
    if (!(await waitForGuestExit(pid, uuid, waitMs))) {
      if (how !== 'kill') this.log.warn({ instance_uuid: uuid, pid }, 'QEMU did not exit after quit: killing it');
      await killGuest(pid, uuid);
      if (!(await waitForGuestExit(pid, uuid, KILL_WAIT_MS))) {
        throw new QemuProcessError(`QEMU process ${pid} of instance ${uuid} survived SIGKILL`);
      }
    }
    await removeFiles(layout.processFiles);
  }

  /** Polls `query-migrate` until the migration completed; throws if it failed. */
  private async waitForMigration(qmp: QmpClient, what: 'save' | 'restore'): Promise<void> {
    const startedAt = Date.now();
    for (;;) {
      const info = await qmp.execute<MigrateInfo>('query-migrate');
      switch (info.status) {
        case 'completed':
          return;
        case 'failed':
        case 'cancelled':
          throw new QemuProcessError(
            `${what} migration ${info.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`,
          );
        case undefined:
          // Not begun yet; it must begin soon.
          if (Date.now() - startedAt > this.opts.qmpTimeoutMs) {
            throw new QemuProcessError(`${what} migration did not begin within ${this.opts.qmpTimeoutMs} ms`);
          }
      }
      await new Promise((r) => setTimeout(r, MIGRATION_POLL_MS));
    }
  }

  /** Cancels an outgoing migration still in progress and waits until it has stopped. */
  private async cancelMigration(qmp: QmpClient): Promise<void> {
    const info = await qmp.execute<MigrateInfo>('query-migrate');
    const active = (s?: string) => s !== undefined && !['completed', 'failed', 'cancelled'].includes(s);
    if (!active(info.status)) return;
    await qmp.execute('migrate_cancel');
    const deadline = Date.now() + this.opts.qmpTimeoutMs;
    while (active((await qmp.execute<MigrateInfo>('query-migrate')).status) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, MIGRATION_POLL_MS));
    }
  }
}

/** The qemu backend as configured (`[DEFAULT] instances_path`, `[hypervisor]`). */
export function fromConfig(config: Config, log: Logger): QemuHypervisor {
  return new QemuHypervisor({
    instancesPath: config.DEFAULT.instances_path,
    qemuBinary: config.hypervisor.qemu_binary,
    qemuImg: new QemuImg(config.hypervisor.qemu_img),
    accel: config.hypervisor.accel,
    shutdownTimeoutMs: config.hypervisor.shutdown_timeout * 1000,
    qmpTimeoutMs: config.hypervisor.qmp_timeout * 1000,
    log,
  });
}

function invalidState(p: Probe, action: string): InstanceInvalidState {
  return new InstanceInvalidState(`cannot ${action} instance ${p.layout.uuid}: it is ${p.state}`);
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

async function removeFiles(files: readonly string[]): Promise<void> {
  await Promise.all(files.map((f) => fs.rm(f, { force: true })));
}
