import { InstanceInvalidState } from '../../errors.js';
import { performance } from 'node:perf_hooks';
import type { DiskInfo, ExportDest, ExportOptions, InternalSnapshot, LiveSnapshotResult } from '../types.js';
import type { QemuGuests } from './guests.js';
import { DISK_NODE } from './launch.js';
import { type LiveBackupOptions, type QemuBackupJob, startLiveBackup as startBackupJob } from './live-backup.js';
import { findGuestProcess } from './qemu-process.js';

/**
 * The guest's disk in the qemu backend: its size, its internal snapshots (with qemu-img while no QEMU
 * process has the disk open, through the guest's own QMP monitor while one has: SPEC §2), raw
 * exports and live backups (the job itself: live-backup.ts).
 */

export async function diskInfo(g: QemuGuests, uuid: string): Promise<DiskInfo> {
  const { layout } = await g.probeProcess(uuid);
  const i = await g.qemuImg.info(layout.disk, { forceShare: true });
  return { path: layout.disk, virtualSize: i.virtualSize, actualSize: i.actualSize };
}

export async function listInternalSnapshots(g: QemuGuests, uuid: string): Promise<InternalSnapshot[]> {
  const { layout } = await g.probeProcess(uuid);
  return g.qemuImg.snapshotList(layout.disk);
}

export async function offlineSnapshotCreate(g: QemuGuests, uuid: string, name: string): Promise<void> {
  const { layout } = await g.requireNoProcess(uuid, `qemu-img snapshot -c ${name}`);
  await g.qemuImg.snapshotCreate(layout.disk, name);
}

export async function offlineSnapshotDelete(g: QemuGuests, uuid: string, name: string): Promise<void> {
  const { layout } = await g.requireNoProcess(uuid, `qemu-img snapshot -d ${name}`);
  await g.qemuImg.snapshotDelete(layout.disk, name);
}

/**
 * Through the guest's own QMP. QEMU drains the disk and writes the snapshot table inside the
 * command: its round trip bounds how long the guest's I/O waited. Both commands walk the refcounts of
 * the whole disk, so they get the job timeout: a merely slow one must not be abandoned (it would go
 * on inside QEMU, and the operation fail over a snapshot that is there after all).
 */
export async function liveSnapshotCreate(g: QemuGuests, uuid: string, name: string, jobTimeoutMs: number): Promise<LiveSnapshotResult> {
  const p = await g.requireProcess(uuid, 'create an internal snapshot through QMP');
  return g.withQmp(p.layout, async (qmp) => {
    const t0 = performance.now();
    await qmp.execute('blockdev-snapshot-internal-sync', { device: DISK_NODE, name }, { timeoutMs: jobTimeoutMs });
    return { ioHeldMs: performance.now() - t0 };
  });
}

export async function liveSnapshotDelete(g: QemuGuests, uuid: string, name: string, jobTimeoutMs: number): Promise<void> {
  const p = await g.requireProcess(uuid, 'delete an internal snapshot through QMP');
  await g.withQmp(p.layout, (qmp) => qmp.execute('blockdev-snapshot-delete-internal-sync', { device: DISK_NODE, name }, { timeoutMs: jobTimeoutMs }));
}

/**
 * `runningSpeed`: the rate limit (bytes/s) of a copy no one waits for of a running or paused guest's
 * disk (`[hypervisor] running_export_rate_mb`): the guest's own I/O shares the host with it.
 */
export async function exportDisk(g: QemuGuests, uuid: string, opts: ExportOptions, runningSpeed?: number): Promise<void> {
  if (opts.snapshotName === undefined) {
    const { layout } = await g.requireNoProcess(uuid, 'export the active layer of the disk');
    await g.qemuImg.convertToRaw(layout.disk, opts.dest, { onProgress: opts.onProgress, background: opts.background });
    return;
  }
  // An internal snapshot's clusters are never rewritten while it exists: safe to read with -U.
  const p = await g.probeProcess(uuid);
  const limited = p.pid !== undefined && opts.background === true && runningSpeed !== undefined && runningSpeed > 0;
  await g.qemuImg.convertToRaw(p.layout.disk, opts.dest, {
    snapshotName: opts.snapshotName,
    forceShare: p.pid !== undefined,
    onProgress: opts.onProgress,
    background: opts.background,
    rateLimit: limited ? runningSpeed : undefined,
    sizeBytes: opts.virtualSize,
  });
}

/**
 * Starts a live backup of the disk in the guest's QEMU process, which must be there; the job works
 * only with that process (live-backup.ts: fleecing in the instance's folder, pulled by qemu-img).
 */
export async function startLiveBackup(g: QemuGuests, uuid: string, dest: ExportDest | string, opts: LiveBackupOptions = {}): Promise<QemuBackupJob> {
  const { layout, pid } = await g.requireProcess(uuid, 'start a live backup');
  const alive = async () => (await findGuestProcess(layout.pidFile, layout.uuid)) === pid;
  return startBackupJob(
    {
      withQmp: async (fn) => {
        if (!(await alive())) {
          throw new InstanceInvalidState(`live backup of instance ${layout.uuid}: its QEMU process ${pid} is gone`);
        }
        return g.withQmp(layout, fn);
      },
      alive,
      qemuImg: g.qemuImg,
      log: g.log.child({ instance_uuid: layout.uuid }),
      timeoutMs: g.qmpTimeoutMs,
      instanceDir: layout.dir,
      ...opts,
    },
    dest,
  );
}
