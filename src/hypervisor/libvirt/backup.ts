import fs from 'node:fs/promises';
import path from 'node:path';
import { errorMessage, UsageError } from '../../errors.js';
import type { Logger } from '../../log.js';
import type { QemuImg } from '../../qemu-img/qemu-img.js';
import { exportFile, type BackupJob, type ExportDest } from '../types.js';
import type { DomainXml } from './domain-xml.js';
import type { Virsh } from './virsh.js';

/**
 * `live` on libvirt: a pull backup (`virsh backup-begin`), its point-in-time view of the root disk
 * exported over NBD on a unix socket and copied by `qemu-img convert` into the store's raw file. A
 * push backup to a raw file is not sparse (QEMU writes the zeros: a 4 GiB disk with 64 MiB of data
 * gave a 4 GiB file), and one to a qcow2 would need a second copy; pulling gives the sparse raw image
 * directly. The only other host disk used is the scratch file beside the guest's disk: what the guest
 * overwrites during the job. QEMU never opens the store's file; only our qemu-img writes it.
 * Ending the job (`domjobabort`) makes libvirt remove the socket and the scratch file.
 */

/** sun_path is 108 bytes including the terminating NUL. */
const UNIX_SOCKET_PATH_MAX = 108;

function xmlAttr(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
}

/** The backup definition: the root disk pulled, every other disk left out. */
export function pullBackupXml(domain: DomainXml, socket: string, scratch: string): string {
  return [
    "<domainbackup mode='pull'>",
    `  <server transport='unix' socket='${xmlAttr(socket)}'/>`,
    '  <disks>',
    `    <disk name='${xmlAttr(domain.rootDisk.target)}' type='file'><scratch file='${xmlAttr(scratch)}'/></disk>`,
    ...domain.otherDisks.map((d) => `    <disk name='${xmlAttr(d)}' backup='no'/>`),
    '  </disks>',
    '</domainbackup>',
    '',
  ].join('\n');
}

export interface PullBackupContext {
  virsh: Virsh;
  qemuImg: QemuImg;
  log: Logger;
  /** Copy rate limit in bytes/s (qemu-img convert -r); unset or 0: unlimited. */
  speed?: number;
}

/** `virtualSize`: the root disk's, the most the copy can carry. */
export async function startPullBackup(ctx: PullBackupContext, domain: DomainXml, virtualSize: number, target: ExportDest | string): Promise<BackupJob> {
  const dest = exportFile(target);
  const socket = `${dest}.nbd`;
  if (Buffer.byteLength(socket) >= UNIX_SOCKET_PATH_MAX) {
    throw new UsageError(`the backup's NBD socket ${JSON.stringify(socket)} would not fit in a unix socket path: choose a shorter [image_store] path`);
  }
  // Beside the guest's disk, never in the store: the guest's writes wait for their copy-before-write
  // into it, so it must be as fast, and as full, as the disk itself (a slow or full store must never
  // hold or fail a guest write).
  const scratch = path.join(path.dirname(domain.rootDisk.path), `snapdrv-scratch-${path.basename(dest)}.qcow2`);
  const xmlFile = `${dest}.backup.xml`;
  const log = ctx.log.child({ instance_uuid: domain.uuid });
  await fs.writeFile(xmlFile, pullBackupXml(domain, socket, scratch), { mode: 0o600 });
  let startPauseMs: number;
  try {
    // An upper bound of how long the job's start held the guest's I/O: the whole command as virsh
    // times it (libvirt's round trip and its QMP transaction; virsh's own start left out).
    startPauseMs = (await ctx.virsh.runTimed(['backup-begin', domain.uuid, xmlFile], { uuid: domain.uuid })).commandMs;
  } finally {
    await fs.rm(xmlFile, { force: true });
  }
  const startedAt = Date.now();
  log.info({ start_pause_ms: Math.round(startPauseMs), socket }, 'live backup started (libvirt pull backup)');
  return new PullBackupJob(ctx, domain, socket, target, virtualSize, startedAt, startPauseMs, log);
}

class PullBackupJob implements BackupJob {
  private readonly abort = new AbortController();
  private ended = false;
  private copying?: Promise<void>;

  constructor(
    private readonly ctx: PullBackupContext,
    private readonly domain: DomainXml,
    private readonly socket: string,
    private readonly dest: ExportDest | string,
    private readonly virtualSize: number,
    readonly startedAt: number,
    readonly startPauseMs: number,
    private readonly log: Logger,
  ) {}

  async wait(onProgress?: (fraction: number) => void): Promise<void> {
    const uri = `nbd+unix:///${encodeURIComponent(this.domain.rootDisk.target)}?socket=${this.socket}`;
    // The guest runs all along.
    this.copying ??= this.ctx.qemuImg.convertNbdToRaw(uri, this.dest, {
      onProgress,
      signal: this.abort.signal,
      rateLimit: this.ctx.speed || undefined,
      sizeBytes: this.virtualSize,
      background: true,
    });
    try {
      await this.copying;
    } finally {
      await this.end();
    }
    onProgress?.(1);
  }

  async cancel(): Promise<void> {
    this.abort.abort();
    await this.copying?.catch(() => undefined);
    await this.end();
  }

  /** Ends the pull job (libvirt removes the socket and the scratch file). Safe to call twice. */
  private async end(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    await this.ctx.virsh.run(['domjobabort', this.domain.uuid], { uuid: this.domain.uuid }).catch((err: unknown) => {
      this.log.warn({ err: errorMessage(err) }, 'cannot end the pull backup job');
      this.ended = false;
      throw err;
    });
  }
}
