/**
 * The one hypervisor interface (SPEC §4). Implementations: `qemu/` (embedded default), `fake/` (unit
 * tests; enforces §2 and injects faults), `libvirt/` (later).
 *
 * The interface keeps offline and live disk-metadata changes apart on purpose: a strategy must say
 * which one it means, and the fake proves it chose right (SPEC §2).
 */

export type PowerState = 'running' | 'paused' | 'shutoff' | 'saved' | 'crashed';

/** States in which the guest's process (its QEMU) holds the disk open. */
export function processHoldsDisk(state: PowerState): boolean {
  return state === 'running' || state === 'paused';
}

export interface InstanceInfo {
  uuid: string;
  name: string;
  state: PowerState;
}

export interface InstanceSpec {
  uuid: string;
  name: string;
  memoryMb: number;
  vcpus: number;
  /** QEMU machine type, e.g. "pc". */
  machine: string;
  /** Disk: a new qcow2 of this many bytes, or a qcow2 on top of `baseImage` (its size if unset). */
  diskSizeBytes?: number;
  baseImage?: string;
  /** Format of the base image ("qcow2" or "raw"); never probed. */
  baseImageFormat?: 'qcow2' | 'raw';
  /**
   * Absolute path of a file whose content the guest's RAM starts with (mapped private: the guest's
   * writes never reach it). For benchmarks that need RAM that is not all zero pages.
   */
  memoryFile?: string;
  /**
   * Direct kernel boot (as nova's kernel_id/ramdisk_id images): kernel and initrd paths (absolute, or
   * relative to the instance folder) and the kernel command line, used on every power on and resume.
   */
  kernel?: string;
  initrd?: string;
  cmdline?: string;
}

export interface InternalSnapshot {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
}

export interface DiskInfo {
  path: string;
  virtualSize: number;
  /** Bytes the qcow2 file takes on the host. */
  actualSize: number;
}

export interface SaveResult {
  /** The power state the guest had before the save; resume restores it. */
  priorState: 'running' | 'paused';
  /** Size of the saved state in bytes, when the backend knows it without asking again. */
  bytes?: number;
  /**
   * When the vCPUs stopped, in the hypervisor's own clock (epoch ms), if this save stopped them (a
   * paused guest's were stopped already). Guest downtime is measured from here. (qemu: the QMP STOP
   * event's timestamp.)
   */
  vcpusStoppedAt?: number;
}

export interface LiveSnapshotResult {
  /**
   * How long the create held the guest's disk I/O (ms), at most: the monitor command's round trip
   * (the disk is drained inside it), plus what the backend cannot tell apart from it (libvirt: virsh).
   */
  ioHeldMs: number;
}

export interface ResumeResult {
  /** The power state restored (the prior one). */
  state: PowerState;
  /**
   * When the vCPUs ran again, in the hypervisor's own clock (epoch ms), if they did. (qemu: the QMP
   * RESUME event's timestamp.)
   */
  vcpusResumedAt?: number;
}

export interface LaunchHooks {
  /**
   * Runs when no process of the instance holds the disk, right before a new one is started (power
   * on, hard reboot, resume from managed save). Used for deferred deletion.
   */
  beforeLaunch?: (uuid: string) => Promise<void>;
}

/**
 * Where an export's raw data goes when the image store receives it (it writes and hashes it as it
 * comes): qemu-img writes into its NBD export; a backend that makes the bytes itself calls `put`.
 */
export interface ExportDest {
  /** The file the data lands in (for names and messages: it is the store's to write). */
  readonly file: string;
  /** `nbd+unix://…`: written with `qemu-img convert -n --target-is-zero` (in offset order, zeros skipped). */
  readonly nbdUri: string;
  /** The same receiver in this process: pieces in increasing offset order, ranges skipped are zeros. */
  put(offset: number, data: Buffer): Promise<void>;
}

/** The file an export writes: the receiver's, or the plain file given. */
export function exportFile(dest: ExportDest | string): string {
  return typeof dest === 'string' ? dest : dest.file;
}

export interface ExportOptions {
  /** Read this internal snapshot; without it, the active layer of the offline disk is read. */
  snapshotName?: string;
  /** The store's receiver, or a raw output file to create (sparse where the disk is). */
  dest: ExportDest | string;
  /** Progress as a fraction 0..1. */
  onProgress?: (fraction: number) => void;
  /**
   * No guest waits for this export (it runs again, or was shut off before): it yields the CPUs to
   * guests and to other snapshots' saves and restores.
   */
  background?: boolean;
  /** The disk's virtual size as the operation read it: bounds a rate-limited copy (qemu-img.ts rateLimitedBoundMs). */
  virtualSize?: number;
}

/**
 * A point-in-time backup of a running guest's disk: the process that holds the disk keeps the
 * point-in-time view (copy-before-write into a local temporary image), and a copy reads that view
 * into the store, so the guest's writes never wait for the store (qemu: fleecing exported over NBD;
 * libvirt: a pull backup; both copied by qemu-img).
 */
export interface BackupJob {
  /** When the job started (epoch ms): the image is the disk as of this moment. */
  readonly startedAt: number;
  /** How long starting it held the guest's disk I/O (ms): the guest-visible pause. */
  readonly startPauseMs: number;
  /** Resolves when everything is copied and the target is released; rejects if the job failed. */
  wait(onProgress?: (fraction: number) => void): Promise<void>;
  /** Cancels the job (if still running) and releases the target file. Safe to call twice. */
  cancel(): Promise<void>;
}

/**
 * What a backend does with a guest. The contract holds for every backend; where a comment names a
 * mechanism (QMP, qemu-img), it is how the qemu backend does it, an example.
 */
export interface Hypervisor {
  readonly driver: 'qemu' | 'libvirt' | 'fake';
  /** Whether startLiveBackup works on this backend (the `live` strategy needs it). */
  readonly supportsLiveBackup: boolean;

  list(): Promise<InstanceInfo[]>;
  /** Throws InstanceNotFound. */
  info(uuid: string): Promise<InstanceInfo>;
  /** The root disk; UnsupportedInstance when the instance has none the agent can snapshot. */
  diskInfo(uuid: string): Promise<DiskInfo>;
  /**
   * Refuses (UnsupportedInstance), before anything is touched, an instance a snapshot cannot be taken
   * of as it is defined: e.g. a transient libvirt domain when the strategy needs a managed save.
   * Backends whose every instance can be snapshotted leave it out.
   */
  checkSnapshottable?(uuid: string, needs: { managedSave: boolean }): Promise<void>;

  /** shutoff | crashed → running. beforeLaunch runs first. */
  start(uuid: string, hooks?: LaunchHooks): Promise<void>;
  /** running | paused → shutoff. graceful: ACPI power-down first, forced after the shutdown timeout. */
  stop(uuid: string, opts: { graceful: boolean }): Promise<void>;
  /**
   * Guest-cooperative reboot without restarting the process (SPEC §3, as nova's soft reboot): the
   * ACPI power button; once the guest has shut down it is reset and runs again. Resolves true when
   * the guest did so within `waitMs`, false when it did not (a paused guest cannot: false at once),
   * and the caller then hard reboots it (Lifecycle). Throws InstanceInvalidState unless running or paused.
   */
  softReboot(uuid: string, opts: { waitMs: number }): Promise<boolean>;
  /** running → paused (vCPUs stopped, process kept). */
  pause(uuid: string): Promise<void>;
  /** paused → running. */
  unpause(uuid: string): Promise<void>;
  /** running | paused → saved: RAM and device state to a state file, then the process exits. */
  managedSave(uuid: string): Promise<SaveResult>;
  /** saved → the prior state (running or paused), in a new process. beforeLaunch runs first. */
  resume(uuid: string, hooks?: LaunchHooks): Promise<ResumeResult>;

  /** Read-only listing of the disk's internal snapshots; allowed in any state. */
  listInternalSnapshots(uuid: string): Promise<InternalSnapshot[]>;
  /**
   * Creates an internal snapshot in the disk of a guest that no process holds (e.g. qemu-img
   * snapshot -c). Throws SafetyViolation if a process holds the disk.
   */
  offlineSnapshotCreate(uuid: string, name: string): Promise<void>;
  /** Deletes one the same way (e.g. qemu-img snapshot -d). Throws SafetyViolation if a process holds the disk. */
  offlineSnapshotDelete(uuid: string, name: string): Promise<void>;
  /**
   * Creates an internal snapshot of the open disk by the very process that holds it, never by
   * another program (through the guest's own monitor, e.g. QMP blockdev-snapshot-internal-sync):
   * the vCPUs run on, the guest's disk I/O waits while the snapshot table is written.
   * Throws InstanceInvalidState if no process holds the disk.
   */
  liveSnapshotCreate(uuid: string, name: string): Promise<LiveSnapshotResult>;
  /**
   * Deletes one the same way. It walks the refcounts of the whole disk: bounded by the job timeout,
   * not a command timeout. Throws InstanceInvalidState if no process holds the disk.
   */
  liveSnapshotDelete(uuid: string, name: string): Promise<void>;

  /**
   * Exports a raw image: of an internal snapshot (allowed while the disk is open: its data never
   * changes, it is read without taking the disk's lock, e.g. qemu-img convert -U), or of the active
   * layer (only when no process holds the disk; else SafetyViolation).
   */
  exportDisk(uuid: string, opts: ExportOptions): Promise<void>;

  /**
   * Starts a point-in-time full backup of a running or paused guest's disk into `dest` (a raw file it
   * creates, sparse where the disk is), by the process that holds the disk: no metadata change to
   * the qcow2, no pause of the vCPUs.
   * Throws InstanceInvalidState if no process holds the disk.
   */
  startLiveBackup(uuid: string, dest: ExportDest | string): Promise<BackupJob>;

  /**
   * After an agent died in the middle of an operation on this instance (never while another process
   * works on it): ends what it left going in the hypervisor. A managed save under way is cancelled
   * (the guest is left paused, its partial state removed); one that had completed has its process
   * ended (the guest is `saved`); our backup jobs are cancelled and their target files let go; a
   * resume that never finished loading the saved state is ended (the guest stays `saved`, its state
   * kept). Resolves with what was done, for the log (empty: nothing was left).
   */
  endInterruptedWork(uuid: string): Promise<string[]>;

  /** Whether a guest agent answers within the timeout (qemu: guest-sync on its channel). */
  guestAgentAvailable(uuid: string, timeoutMs: number): Promise<boolean>;
  /** Guest agent: freeze the guest's filesystems; resolves with how many were frozen. */
  freezeFilesystems(uuid: string, timeoutMs: number): Promise<number>;
  /** Guest agent: thaw them; resolves with how many were thawed. Safe when none are frozen. */
  thawFilesystems(uuid: string, timeoutMs: number): Promise<number>;
}

/** Backends that own their instances' lifecycle (the qemu backend; the fake for tests). */
export interface InstanceFactory {
  createInstance(spec: InstanceSpec): Promise<InstanceInfo>;
  deleteInstance(uuid: string): Promise<void>;
}
