import { writeFile } from 'node:fs/promises';
import { setImmediate as nextTurn, setTimeout as sleep } from 'node:timers/promises';
import {
  GuestAgentError,
  InstanceExists,
  InstanceInvalidState,
  InstanceNotFound,
  InvalidInstanceId,
  QemuImgError,
  QemuProcessError,
  QmpError,
  SafetyViolation,
} from '../../errors.js';
import { isUuid } from '../../util/uuid.js';
import {
  ExportDest,
  exportFile,
  processHoldsDisk,
  type BackupJob,
  type DiskInfo,
  type ExportOptions,
  type Hypervisor,
  type InstanceFactory,
  type InstanceInfo,
  type InstanceSpec,
  type InternalSnapshot,
  type LiveSnapshotResult,
  type LaunchHooks,
  type PowerState,
  type ResumeResult,
  type SaveResult,
} from '../types.js';
import { copyIntoTarget, createTarget, type FakeBackupRecord } from './fake-backup.js';
import { DEFAULT_DISK_BYTES, FakeDisk, fakeDiskSize } from './fake-disk.js';
import { FAKE_GUEST_FILESYSTEMS, type FakeGuestAgent } from './fake-guest-agent.js';
import { FaultInjector, type FakeOp, type FaultSpec, type HoldSpec } from './fault-injector.js';

export type { FakeOp, FaultSpec, HoldSpec } from './fault-injector.js';
export type { FakeBackupRecord } from './fake-backup.js';
export type { FakeGuestAgent } from './fake-guest-agent.js';

/** One public call, as the fake saw it (args as passed). */
export interface FakeCall {
  op: FakeOp;
  uuid: string | undefined;
  args: unknown[];
}

export interface FakeHypervisorOptions {
  /** Pretend to be a backend without live backups (default: with them). */
  supportsLiveBackup?: boolean;
  /** Disk size when the spec gives none (or more than 16 MiB). Default 64 KiB. */
  defaultDiskBytes?: number;
  /**
   * Clock in epoch ms: snapshot dates, the vCPU stop/resume times of managedSave/resume, a backup
   * job's startedAt. Default Date.now.
   */
  now?: () => number;
  /** What a live backup job reports as its startPauseMs. Default 0. */
  backupStartPauseMs?: number;
  /** What a snapshot created through the monitor reports as its ioHeldMs. Default 0. */
  liveSnapshotIoHeldMs?: number;
}

interface FakeInstance {
  uuid: string;
  name: string;
  memoryMb: number;
  state: PowerState;
  disk: FakeDisk;
  /** The state before a managed save; set only while 'saved'. */
  priorState?: 'running' | 'paused';
  launches: number;
  /** Offline disk operations in progress (qemu-img holds the file): no process may start now. */
  offlineBusy: number;
  /** Exports in progress per snapshot name: deleting that snapshot now would tear the export. */
  readers: Map<string, number>;
  agent: FakeGuestAgent;
  /** Filesystems frozen by the guest agent: the guest does not write to its disk. */
  frozen: boolean;
  /** thawFails given as a count: thaws still to fail. */
  thawFailuresLeft: number;
  /**
   * The process holds the disk inactive (no image lock taken): a resume's new process until its vCPUs
   * first run (QMP `cont` activates the disk, taking the lock), when activating it at the end of the
   * load failed. Such a disk cannot take an internal snapshot through the monitor.
   */
  diskInactive: boolean;
  /** Another process holds the disk's write lock (holdDiskLock): no process may activate or open the disk. */
  foreignLock: boolean;
}

/** What QEMU 7.2 says when another process holds the image's lock. */
const WRITE_LOCK_ERROR = 'Failed to get "write" lock';

const EXPORT_CHUNKS = 4;
const ROOT_DEVICE = 'root';

/**
 * In-memory hypervisor for unit tests (SPEC §4 `fake`). It enforces the safety rule of SPEC §2 by
 * throwing SafetyViolation and recording it in `violations` (so a test sees it even when the caller
 * swallowed the error), simulates a running guest that writes to its disk at the start of every
 * public call, and injects one-shot faults.
 *
 * Test helpers (guestWrite, crash, diskContent, …) are not public calls: they neither tick running
 * guests nor appear in `calls`.
 */
export class FakeHypervisor implements Hypervisor, InstanceFactory {
  readonly driver = 'fake' as const;
  readonly supportsLiveBackup: boolean;
  /** Every §2 violation, in order, even those the caller caught. */
  readonly violations: string[] = [];
  /** Every public call, in order. A test may truncate it (`calls.length = 0`). */
  readonly calls: FakeCall[] = [];

  private readonly instances = new Map<string, FakeInstance>();
  private readonly faults = new FaultInjector();
  private readonly backups: FakeBackupRecord[] = [];
  private readonly defaultDiskBytes: number;
  private readonly now: () => number;
  private readonly backupStartPauseMs: number;
  private readonly liveSnapshotIoHeldMs: number;

  constructor(opts: FakeHypervisorOptions = {}) {
    this.supportsLiveBackup = opts.supportsLiveBackup ?? true;
    this.defaultDiskBytes = opts.defaultDiskBytes ?? DEFAULT_DISK_BYTES;
    this.now = opts.now ?? Date.now;
    this.backupStartPauseMs = opts.backupStartPauseMs ?? 0;
    this.liveSnapshotIoHeldMs = opts.liveSnapshotIoHeldMs ?? 0;
  }

  // ---- InstanceFactory ----

  createInstance(spec: InstanceSpec): Promise<InstanceInfo> {
    return this.call('createInstance', spec.uuid, [spec], () => {
      if (!isUuid(spec.uuid)) throw new InvalidInstanceId(spec.uuid);
      if (this.instances.has(spec.uuid)) throw new InstanceExists(spec.uuid);
      const inst: FakeInstance = {
        uuid: spec.uuid,
        name: spec.name,
        memoryMb: spec.memoryMb,
        state: 'shutoff',
        disk: new FakeDisk(fakeDiskSize(spec.diskSizeBytes, this.defaultDiskBytes)),
        launches: 0,
        offlineBusy: 0,
        readers: new Map(),
        agent: { present: false },
        frozen: false,
        thawFailuresLeft: 0,
        diskInactive: false,
        foreignLock: false,
      };
      this.instances.set(spec.uuid, inst);
      return infoOf(inst);
    });
  }

  deleteInstance(uuid: string): Promise<void> {
    return this.call('deleteInstance', uuid, [uuid], () => {
      this.get(uuid);
      this.instances.delete(uuid);
    });
  }

  // ---- Hypervisor: inventory ----

  list(): Promise<InstanceInfo[]> {
    return this.call('list', undefined, [], () => [...this.instances.values()].map(infoOf));
  }

  info(uuid: string): Promise<InstanceInfo> {
    return this.call('info', uuid, [uuid], () => infoOf(this.get(uuid)));
  }

  diskInfo(uuid: string): Promise<DiskInfo> {
    return this.call('diskInfo', uuid, [uuid], () => {
      const inst = this.get(uuid);
      return { path: fakeDiskPath(uuid), virtualSize: inst.disk.active.length, actualSize: inst.disk.storedBytes() };
    });
  }

  // ---- Hypervisor: power ----

  start(uuid: string, hooks?: LaunchHooks): Promise<void> {
    return this.call('start', uuid, [uuid, hooks], async () => {
      const inst = this.get(uuid);
      requireState(inst, 'start', ['shutoff', 'crashed']);
      await hooks?.beforeLaunch?.(uuid);
      if (inst.foreignLock) throw new QemuProcessError(`QEMU failed to start (exit code 1): ${fakeDiskPath(uuid)}: ${WRITE_LOCK_ERROR}`);
      this.launch(inst, 'start', ['shutoff', 'crashed'], 'running');
    });
  }

  stop(uuid: string, opts: { graceful: boolean }): Promise<void> {
    return this.call('stop', uuid, [uuid, opts], () => {
      const inst = this.get(uuid);
      requireState(inst, 'stop', ['running', 'paused']);
      this.requireThawed(inst, 'stop');
      inst.state = 'shutoff';
      inst.diskInactive = false;
    });
  }

  softReboot(uuid: string, opts: { waitMs: number } = { waitMs: 0 }): Promise<boolean> {
    return this.call('softReboot', uuid, [uuid, opts], () => {
      requireState(this.get(uuid), 'softReboot', ['running', 'paused']);
      return true;
    });
  }

  pause(uuid: string): Promise<void> {
    return this.call('pause', uuid, [uuid], () => {
      const inst = this.get(uuid);
      requireState(inst, 'pause', ['running']);
      inst.state = 'paused';
    });
  }

  unpause(uuid: string): Promise<void> {
    return this.call('unpause', uuid, [uuid], async () => {
      const inst = this.get(uuid);
      requireState(inst, 'unpause', ['paused']);
      await this.cont(inst);
    });
  }

  /**
   * Stops the vCPUs of a running guest, writes its state (the `saveMigration` point), and ends its
   * process. A save that fails half-way is undone as the qemu backend does: no state file, and the
   * vCPUs run again if they ran (a `cont` that fails then leaves the guest paused; the save throws its
   * own error).
   */
  managedSave(uuid: string): Promise<SaveResult> {
    return this.call('managedSave', uuid, [uuid], async () => {
      const inst = this.get(uuid);
      // A frozen guest may be saved (SPEC §3 freezes right before the save): the freeze is in its RAM.
      const prior = requireState(inst, 'managedSave', ['running', 'paused']);
      const vcpusStoppedAt = prior === 'running' ? this.now() : undefined;
      inst.state = 'paused';
      try {
        await this.point('saveMigration', uuid, async () => {
          requireState(inst, 'managedSave', ['paused']);
          inst.priorState = prior;
          inst.state = 'saved';
          inst.diskInactive = false;
        });
      } catch (err) {
        if (inst.state === 'paused' && prior === 'running') await this.cont(inst).catch(() => undefined);
        throw err;
      }
      const result: SaveResult = { priorState: prior, bytes: inst.memoryMb * 1024 * 1024 };
      if (vcpusStoppedAt !== undefined) result.vcpusStoppedAt = vcpusStoppedAt;
      return result;
    });
  }

  /**
   * A new process loads the saved state (the state file is gone from then on) and its vCPUs run again
   * if they ran (the `cont` point). Under a foreign lock the disk cannot be activated: the state loads,
   * the `cont` fails and the guest is left paused, as with real QEMU.
   */
  resume(uuid: string, hooks?: LaunchHooks): Promise<ResumeResult> {
    return this.call('resume', uuid, [uuid, hooks], async () => {
      const inst = this.get(uuid);
      requireState(inst, 'resume', ['saved']);
      await hooks?.beforeLaunch?.(uuid);
      const prior = inst.priorState ?? 'running';
      this.launch(inst, 'resume', ['saved'], 'paused');
      delete inst.priorState;
      // The load ends by activating the disk; under a foreign lock that fails (QEMU only reports it).
      inst.diskInactive = inst.foreignLock;
      const result: ResumeResult = { state: prior };
      if (prior === 'running') {
        await this.cont(inst);
        result.vcpusResumedAt = this.now();
      }
      return result;
    });
  }

  // ---- Hypervisor: live backup ----

  /**
   * The job's point in time is the active layer right after this call's guest write. The target is
   * created at once (sparse, the disk's size); the data is copied by wait(), while a running guest
   * keeps writing to its disk.
   */
  startLiveBackup(uuid: string, target: ExportDest | string): Promise<BackupJob> {
    const dest = exportFile(target);
    return this.call('startLiveBackup', uuid, [uuid, dest], async () => {
      const inst = this.get(uuid);
      requireProcess(inst, 'startLiveBackup');
      if (inst.diskInactive) throw new QemuProcessError(`cannot start a live backup: the disk of instance ${uuid} is inactive in its QEMU`);
      const launch = inst.launches;
      const sink = typeof target === 'string' ? undefined : target;
      const rec: FakeBackupRecord = { uuid, dest, sink, startedAt: this.now(), pointInTime: Buffer.from(inst.disk.active), status: 'running' };
      if (sink === undefined) await createTarget(dest, rec.pointInTime.length);
      this.backups.push(rec);
      return this.backupJob(inst, launch, rec);
    });
  }

  private backupJob(inst: FakeInstance, launch: number, rec: FakeBackupRecord): BackupJob {
    let copying: Promise<void> | undefined;
    const copy = (onProgress?: (fraction: number) => void) =>
      copyIntoTarget(
        rec.pointInTime,
        rec.sink ?? rec.dest,
        () => {
          if (rec.status === 'cancelled') throw new QmpError('block-job', 'GenericError', `backup job of ${rec.uuid} was cancelled`);
          if (inst.launches !== launch || !processHoldsDisk(inst.state)) {
            rec.status = 'failed';
            throw new QmpError('block-job', 'GenericError', `the QEMU process running the backup job of ${rec.uuid} is gone`);
          }
          if (inst.state === 'running' && !inst.frozen) inst.disk.guestTick();
        },
        onProgress,
      ).then(
        () => {
          if (rec.status === 'running') rec.status = 'completed';
        },
        (err: unknown) => {
          if (rec.status === 'running') rec.status = 'failed';
          throw err;
        },
      );
    return {
      startedAt: rec.startedAt,
      startPauseMs: this.backupStartPauseMs,
      wait: (onProgress) =>
        this.call('backupWait', rec.uuid, [rec.uuid, rec.dest], async () => {
          if (rec.status === 'completed') {
            onProgress?.(1);
            return;
          }
          if (rec.status !== 'running') throw new QmpError('block-job', 'GenericError', `backup job of ${rec.uuid} was ${rec.status}`);
          copying ??= copy(onProgress);
          await copying;
        }),
      cancel: () =>
        this.call('backupCancel', rec.uuid, [rec.uuid, rec.dest], async () => {
          if (rec.status === 'running') rec.status = 'cancelled';
          // The target is released once a copy in progress has stopped.
          await copying?.catch(() => undefined);
        }),
    };
  }

  /** The fake's managed save runs within one call (a dead agent cannot stop it half-way): only backup jobs can be left going. */
  endInterruptedWork(uuid: string): Promise<string[]> {
    return this.call('endInterruptedWork', uuid, [uuid], () => {
      this.get(uuid);
      const running = this.backups.filter((b) => b.uuid === uuid && b.status === 'running');
      for (const b of running) b.status = 'cancelled';
      return running.length > 0 ? [`cancelled ${running.length} backup job(s)`] : [];
    });
  }

  // ---- Hypervisor: guest agent ----

  guestAgentAvailable(uuid: string, timeoutMs: number): Promise<boolean> {
    return this.call('guestAgentAvailable', uuid, [uuid, timeoutMs], async () => {
      const inst = this.get(uuid);
      // With no process there is no agent channel at all.
      if (!processHoldsDisk(inst.state) || !inst.agent.present) return false;
      // A paused guest's agent cannot run: it never answers.
      if (inst.agent.hangs === true || inst.state === 'paused') {
        await sleep(timeoutMs);
        return false;
      }
      return true;
    });
  }

  freezeFilesystems(uuid: string, timeoutMs: number): Promise<number> {
    return this.call('freezeFilesystems', uuid, [uuid, timeoutMs], async () => {
      const inst = this.get(uuid);
      requireAgent(inst, 'guest-fsfreeze-freeze');
      const { agent } = inst;
      if (agent.hangs === true || inst.state === 'paused') return agentTimeout(inst, 'guest-fsfreeze-freeze', timeoutMs);
      if (inst.frozen) throw new GuestAgentError(`guest agent of ${uuid}: guest-fsfreeze-freeze: the filesystems are frozen already`);
      if (agent.freezeFails === true) throw new GuestAgentError(`guest agent of ${uuid}: guest-fsfreeze-freeze failed: failed to freeze /`);
      inst.frozen = true;
      if (agent.hangs === 'freeze') return agentTimeout(inst, 'guest-fsfreeze-freeze', timeoutMs);
      return FAKE_GUEST_FILESYSTEMS;
    });
  }

  thawFilesystems(uuid: string, timeoutMs: number): Promise<number> {
    return this.call('thawFilesystems', uuid, [uuid, timeoutMs], async () => {
      const inst = this.get(uuid);
      requireAgent(inst, 'guest-fsfreeze-thaw');
      const { agent } = inst;
      if (agent.hangs === true || agent.hangs === 'thaw' || inst.state === 'paused') {
        return agentTimeout(inst, 'guest-fsfreeze-thaw', timeoutMs);
      }
      if (agent.thawFails === true || inst.thawFailuresLeft > 0) {
        if (inst.thawFailuresLeft > 0) inst.thawFailuresLeft--;
        throw new GuestAgentError(`guest agent of ${uuid}: guest-fsfreeze-thaw failed: failed to thaw /`);
      }
      const thawed = inst.frozen ? FAKE_GUEST_FILESYSTEMS : 0;
      inst.frozen = false;
      return thawed;
    });
  }

  // ---- Hypervisor: internal snapshots ----

  listInternalSnapshots(uuid: string): Promise<InternalSnapshot[]> {
    return this.call('listInternalSnapshots', uuid, [uuid], () =>
      [...this.get(uuid).disk.snapshots].map(([name, s]) => ({ id: s.id, name, vmStateSize: 0, dateSec: s.dateSec })),
    );
  }

  offlineSnapshotCreate(uuid: string, name: string): Promise<void> {
    return this.call('offlineSnapshotCreate', uuid, [uuid, name], async () => {
      const inst = this.get(uuid);
      this.requireNoProcess(inst, `offlineSnapshotCreate(${uuid}, ${JSON.stringify(name)})`);
      await this.offline(inst, () => {
        if (inst.foreignLock) throw qemuImgFailure(['snapshot', '-c', name, fakeDiskPath(uuid)], `Could not open '${fakeDiskPath(uuid)}': ${WRITE_LOCK_ERROR}`);
        if (inst.disk.snapshots.has(name)) {
          throw qemuImgFailure(['snapshot', '-c', name, fakeDiskPath(uuid)], `Could not create snapshot '${name}': a snapshot with this name already exists`);
        }
        inst.disk.addSnapshot(name, this.nowSec());
      });
    });
  }

  offlineSnapshotDelete(uuid: string, name: string): Promise<void> {
    return this.call('offlineSnapshotDelete', uuid, [uuid, name], async () => {
      const inst = this.get(uuid);
      const what = `offlineSnapshotDelete(${uuid}, ${JSON.stringify(name)})`;
      this.requireNoProcess(inst, what);
      await this.offline(inst, () => {
        if (inst.foreignLock) throw qemuImgFailure(['snapshot', '-d', name, fakeDiskPath(uuid)], `Could not open '${fakeDiskPath(uuid)}': ${WRITE_LOCK_ERROR}`);
        if (!inst.disk.snapshots.has(name)) {
          throw qemuImgFailure(['snapshot', '-d', name, fakeDiskPath(uuid)], `Could not delete snapshot '${name}': snapshot not found`);
        }
        this.requireNoReaders(inst, name, what);
        inst.disk.snapshots.delete(name);
      });
    });
  }

  liveSnapshotCreate(uuid: string, name: string): Promise<LiveSnapshotResult> {
    return this.call('liveSnapshotCreate', uuid, [uuid, name], () => {
      const inst = this.get(uuid);
      requireProcess(inst, 'liveSnapshotCreate');
      if (inst.diskInactive) {
        throw new QmpError('blockdev-snapshot-internal-sync', 'GenericError', `Block format 'qcow2' used by device '${ROOT_DEVICE}' does not support internal snapshots`);
      }
      if (inst.disk.snapshots.has(name)) {
        throw new QmpError('blockdev-snapshot-internal-sync', 'GenericError', `Snapshot with name '${name}' already exists on device '${ROOT_DEVICE}'`);
      }
      inst.disk.addSnapshot(name, this.nowSec());
      return { ioHeldMs: this.liveSnapshotIoHeldMs };
    });
  }

  liveSnapshotDelete(uuid: string, name: string): Promise<void> {
    return this.call('liveSnapshotDelete', uuid, [uuid, name], () => {
      const inst = this.get(uuid);
      requireProcess(inst, 'liveSnapshotDelete');
      if (inst.diskInactive) {
        throw new QmpError('blockdev-snapshot-delete-internal-sync', 'GenericError', `Node '${ROOT_DEVICE}' is inactive: ${WRITE_LOCK_ERROR}`);
      }
      if (!inst.disk.snapshots.has(name)) {
        throw new QmpError(
          'blockdev-snapshot-delete-internal-sync',
          'GenericError',
          `Snapshot with id 'null' and name '${name}' does not exist on device '${ROOT_DEVICE}'`,
        );
      }
      this.requireNoReaders(inst, name, `liveSnapshotDelete(${uuid}, ${JSON.stringify(name)})`);
      inst.disk.snapshots.delete(name);
    });
  }

  // ---- Hypervisor: export ----

  exportDisk(uuid: string, opts: ExportOptions): Promise<void> {
    return this.call('exportDisk', uuid, [uuid, opts], async () => {
      const inst = this.get(uuid);
      const name = opts.snapshotName;
      let data: Buffer;
      if (name !== undefined) {
        const snap = inst.disk.snapshots.get(name);
        if (snap === undefined) {
          throw qemuImgFailure(['convert', '-U', '-l', `snapshot.name=${name}`, fakeDiskPath(uuid), typeof opts.dest === 'string' ? opts.dest : opts.dest.nbdUri], `Failed to load snapshot '${name}': snapshot not found`);
        }
        inst.readers.set(name, (inst.readers.get(name) ?? 0) + 1);
        try {
          data = await readInChunks(snap.data, opts.onProgress);
        } finally {
          const left = (inst.readers.get(name) ?? 1) - 1;
          if (left === 0) inst.readers.delete(name);
          else inst.readers.set(name, left);
        }
      } else {
        this.requireNoProcess(inst, `exportDisk(${uuid}) of the active layer`);
        data = await this.offline(inst, () => readInChunks(inst.disk.active, opts.onProgress));
      }
      if (typeof opts.dest === 'string') await writeFile(opts.dest, data);
      else await putAsQemuImg(opts.dest, data, [...(name !== undefined ? ['-U', '-l', `snapshot.name=${name}`] : []), fakeDiskPath(uuid), opts.dest.nbdUri]);
      opts.onProgress?.(1);
    });
  }

  // ---- Fault injection ----

  /** Arms a one-shot fault; see FaultSpec. */
  injectFault(spec: FaultSpec): void {
    this.faults.inject(spec);
  }

  clearFaults(): void {
    this.faults.clear();
  }

  /** Calls of `op` made so far (for `uuid` only, when given): the base for a fault's `nth`. */
  callCount(op: FakeOp, uuid?: string): number {
    return this.faults.count(op, uuid);
  }

  /** Faults armed and not yet fired. */
  pendingFaults(): FaultSpec[] {
    return this.faults.pending();
  }

  // ---- Test helpers (not public calls: no guest tick, not logged) ----

  /** The guest writes `data` at `offset` of its active layer; only a running guest can write. */
  guestWrite(uuid: string, offset: number, data: Buffer): void {
    const inst = this.get(uuid);
    requireState(inst, 'guestWrite', ['running']);
    inst.disk.write(offset, data);
  }

  /** The guest's QEMU process dies: running | paused → crashed. */
  crash(uuid: string): void {
    const inst = this.get(uuid);
    requireState(inst, 'crash', ['running', 'paused']);
    inst.state = 'crashed';
    inst.frozen = false;
    inst.diskInactive = false;
  }

  /**
   * Another process (an operator's qemu-io, a backup tool) takes the disk's write lock. Only possible
   * while no process holds the disk active (shut off, saved, or a resume's process whose disk could not
   * be activated), as with real image locks. While held, nothing can activate or open the disk: a `cont`
   * that must activate it fails (the guest stays paused), and so do a start and qemu-img's changes.
   */
  holdDiskLock(uuid: string): void {
    const inst = this.get(uuid);
    if (processHoldsDisk(inst.state) && !inst.diskInactive) throw new Error(`${fakeDiskPath(uuid)}: ${WRITE_LOCK_ERROR}: the guest's QEMU holds it`);
    inst.foreignLock = true;
  }

  /** The other process lets go of the disk's write lock. */
  releaseDiskLock(uuid: string): void {
    this.get(uuid).foreignLock = false;
  }

  /** The current power state, without counting as a call. */
  powerState(uuid: string): PowerState {
    return this.get(uuid).state;
  }

  /** A copy of the active layer now. */
  diskContent(uuid: string): Buffer {
    return Buffer.from(this.get(uuid).disk.active);
  }

  /** A copy of an internal snapshot's data; throws if there is none of that name. */
  snapshotContent(uuid: string, name: string): Buffer {
    const snap = this.get(uuid).disk.snapshots.get(name);
    if (snap === undefined) throw new Error(`instance ${uuid} has no internal snapshot ${JSON.stringify(name)}`);
    return Buffer.from(snap.data);
  }

  /** Names of the disk's internal snapshots, in creation order. */
  snapshotNames(uuid: string): string[] {
    return [...this.get(uuid).disk.snapshots.keys()];
  }

  /** How many times a QEMU process was launched for the instance (start, resume). */
  launches(uuid: string): number {
    return this.get(uuid).launches;
  }

  /** True if `data` equals the active layer as it was at one moment (any moment so far). */
  wasDiskState(uuid: string, data: Buffer): boolean {
    return this.get(uuid).disk.wasState(data);
  }

  /** Installs (or removes, or breaks) the instance's guest agent. Default: none. */
  setGuestAgent(uuid: string, agent: FakeGuestAgent): void {
    const inst = this.get(uuid);
    inst.agent = { ...agent };
    inst.thawFailuresLeft = typeof agent.thawFails === 'number' ? agent.thawFails : 0;
  }

  /** Whether the guest's filesystems are frozen now. */
  frozen(uuid: string): boolean {
    return this.get(uuid).frozen;
  }

  /** Live backup jobs started for the instance, oldest first (each with its point in time). */
  liveBackups(uuid: string): readonly FakeBackupRecord[] {
    this.get(uuid);
    return this.backups.filter((b) => b.uuid === uuid);
  }

  /** Holds a call back until `spec.until` settles; see HoldSpec. */
  holdCall(spec: HoldSpec): void {
    this.faults.hold(spec);
  }

  // ---- internals ----

  /**
   * Every public call: running guests write first, the call is logged, faults fire. The part before
   * `body` runs synchronously at call time, so the order of ticks follows the order of calls.
   */
  private call<T>(op: FakeOp, uuid: string | undefined, args: unknown[], body: () => T | Promise<T>): Promise<T> {
    for (const inst of this.instances.values()) if (inst.state === 'running' && !inst.frozen) inst.disk.guestTick();
    this.calls.push({ op, uuid, args });
    const fired = this.faults.onCall(op, uuid);
    return (async () => {
      if (fired.hold !== undefined) await fired.hold;
      if (fired.before !== undefined) throw fired.before;
      const result = await body();
      if (fired.after !== undefined) throw fired.after;
      return result;
    })();
  }

  /**
   * A point inside a call (`cont`, `saveMigration`): counted, held and faulted like a call. `effect` is
   * what the point does; a fault 'before' throws instead, 'after' throws once it is done.
   */
  private async point(op: FakeOp, uuid: string, effect: () => void | Promise<void>): Promise<void> {
    const fired = this.faults.onCall(op, uuid);
    if (fired.hold !== undefined) await fired.hold;
    if (fired.before !== undefined) throw fired.before;
    await effect();
    if (fired.after !== undefined) throw fired.after;
  }

  /** QMP `cont` of a paused guest: activates its disk first if it is inactive (fails under a foreign lock). */
  private cont(inst: FakeInstance): Promise<void> {
    return this.point('cont', inst.uuid, () => {
      requireState(inst, 'cont', ['paused']);
      if (inst.diskInactive) {
        if (inst.foreignLock) throw new QmpError('cont', 'GenericError', WRITE_LOCK_ERROR);
        inst.diskInactive = false;
      }
      inst.state = 'running';
    });
  }

  private get(uuid: string): FakeInstance {
    const inst = this.instances.get(uuid);
    if (inst === undefined) throw new InstanceNotFound(uuid);
    return inst;
  }

  /** A new QEMU process takes the disk; the state is re-checked since the hook awaited. */
  private launch(inst: FakeInstance, op: string, from: readonly PowerState[], to: PowerState): void {
    if (inst.offlineBusy > 0) {
      this.violation(`${op}(${inst.uuid}) launched a QEMU process while an offline disk operation was in progress (SPEC §2)`);
    }
    requireState(inst, op, from);
    inst.state = to;
    inst.launches++;
  }

  /** Runs an offline disk operation, yielding once so a concurrent launch would be caught. */
  private async offline<T>(inst: FakeInstance, work: () => T | Promise<T>): Promise<T> {
    inst.offlineBusy++;
    try {
      await nextTurn();
      return await work();
    } finally {
      inst.offlineBusy--;
    }
  }

  private requireNoProcess(inst: FakeInstance, what: string): void {
    if (processHoldsDisk(inst.state)) {
      this.violation(`${what} while the instance is ${inst.state}: a QEMU process holds the disk (SPEC §2)`);
    }
  }

  /** Stopping the process of a frozen guest is our bug: the freeze must end first. */
  private requireThawed(inst: FakeInstance, op: string): void {
    if (inst.frozen) this.violation(`${op}(${inst.uuid}) while the guest's filesystems are frozen (quiesce must end first)`);
  }

  private requireNoReaders(inst: FakeInstance, name: string, what: string): void {
    if ((inst.readers.get(name) ?? 0) > 0) {
      this.violation(`${what} while an export is reading that snapshot: the export would not be one point in time (SPEC §2)`);
    }
  }

  private violation(message: string): never {
    this.violations.push(message);
    throw new SafetyViolation(message);
  }

  private nowSec(): number {
    return Math.floor(this.now() / 1000);
  }
}

export function fakeDiskPath(uuid: string): string {
  return `/fake/${uuid}/disk`;
}

function infoOf(inst: FakeInstance): InstanceInfo {
  return { uuid: inst.uuid, name: inst.name, state: inst.state };
}

/** Throws InstanceInvalidState naming the current and the allowed states; returns the current one. */
function requireState<S extends PowerState>(inst: FakeInstance, op: string, allowed: readonly S[]): S {
  if (!(allowed as readonly PowerState[]).includes(inst.state)) {
    throw new InstanceInvalidState(
      `cannot ${op} instance ${inst.uuid}: it is ${inst.state}, expected ${allowed.join(' or ')}`,
    );
  }
  return inst.state as S;
}

function requireProcess(inst: FakeInstance, op: string): void {
  if (!processHoldsDisk(inst.state)) {
    throw new InstanceInvalidState(
      `cannot ${op} on instance ${inst.uuid}: it is ${inst.state}, expected running or paused (no QEMU monitor without a process)`,
    );
  }
}

function requireAgent(inst: FakeInstance, command: string): void {
  requireProcess(inst, command);
  if (!inst.agent.present) throw new GuestAgentError(`guest agent of ${inst.uuid}: ${command}: QEMU guest agent is not connected`);
}

async function agentTimeout(inst: FakeInstance, command: string, timeoutMs: number): Promise<never> {
  await sleep(timeoutMs);
  throw new GuestAgentError(`guest agent of ${inst.uuid}: ${command}: no answer within ${timeoutMs} ms`);
}

function qemuImgFailure(argv: string[], message: string): QemuImgError {
  return new QemuImgError(`qemu-img ${argv[0]} failed: ${message}`, ['qemu-img', ...argv], message);
}

/**
 * Writes `data` into the store's receiver as `qemu-img convert -n --target-is-zero` writes into its
 * NBD export: in increasing offset order, in EXPORT_CHUNKS pieces, the all-zero ones skipped. A write
 * the receiver refuses (a streamed upload that failed) fails the export half-way, as qemu-img does.
 */
async function putAsQemuImg(dest: ExportDest, data: Buffer, argv: string[]): Promise<void> {
  const step = Math.max(1, Math.ceil(data.length / EXPORT_CHUNKS));
  for (let off = 0; off < data.length; off += step) {
    const piece = data.subarray(off, Math.min(off + step, data.length));
    if (isZero(piece)) continue;
    try {
      await dest.put(off, piece);
    } catch (err) {
      throw qemuImgFailure(['convert', '-n', '--target-is-zero', ...argv], `error while writing at byte ${off}: Input/output error (${(err as Error).message})`);
    }
  }
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** Copies `src` in a few steps with a turn of the event loop between, reporting progress. */
async function readInChunks(src: Buffer, onProgress?: (fraction: number) => void): Promise<Buffer> {
  const out = Buffer.alloc(src.length);
  const step = Math.ceil(src.length / EXPORT_CHUNKS);
  for (let off = 0; off < src.length; off += step) {
    src.copy(out, off, off, Math.min(off + step, src.length));
    onProgress?.(Math.min(off + step, src.length) / src.length);
    await nextTurn();
  }
  return out;
}
