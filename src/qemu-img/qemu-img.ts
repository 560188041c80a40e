import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import { ProgramTimeout, QemuImgError } from '../errors.js';
import { runProgram } from '../util/exec.js';
import { cpusFor, onCpus } from '../util/affinity.js';

/**
 * A thin wrapper over the qemu-img program. The format of a guest-written disk is never probed:
 * `-f qcow2` is always given, and `snapshot` (which has no -f) gets `--image-opts driver=qcow2`.
 */

export interface ImageInfo {
  virtualSize: number;
  actualSize: number;
  format: string;
  backingFilename?: string;
  snapshots: SnapshotEntry[];
}

export interface SnapshotEntry {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
}

export interface CheckResult {
  clean: boolean;
  /** corruptions + leaks + check-errors, as qemu-img check reports them. */
  corruptions: number;
  leaks: number;
  checkErrors: number;
}

export interface ConvertOptions {
  /** Read this internal snapshot instead of the active layer. */
  snapshotName?: string;
  /** The image is open in a running QEMU: read without taking a lock (-U). Only safe with a snapshot. */
  forceShare?: boolean;
  onProgress?: (fraction: number) => void;
  /** Nothing waits for this copy but its snapshot (the guest runs, or is shut off): at the background niceness. */
  background?: boolean;
  /** Bytes/s of data copied (-r; holes cost nothing); unset or 0: unlimited. */
  rateLimit?: number;
  /** The image's virtual size: with rateLimit, the copy's bound is what that needs when export_timeout is shorter. */
  sizeBytes?: number;
}

/**
 * Default niceness of a copy that no guest waits for (`[hypervisor] background_export_nice`; the
 * image store's hash threads run at 10 too): on a busy host the CPUs go first to guests and to the
 * managed saves and restores of other snapshots, whose guests are down until they end (bench:pair
 * measures one guest's downtime beside another's export).
 */
export const BACKGROUND_NICE = 10;

/** A qemu-img -p output reader: it prints "    (12.34/100%)\r" repeatedly. */
function progressParser(onProgress: ((fraction: number) => void) | undefined): ((chunk: string) => void) | undefined {
  if (!onProgress) return undefined;
  return (chunk) => {
    for (const m of chunk.matchAll(/\((\d+(?:\.\d+)?)\/100%\)/g)) onProgress(Number(m[1]) / 100);
  };
}

/**
 * `-t none` (the target written with O_DIRECT) where the target's filesystem takes it, else nothing
 * (qemu-img's default for convert: the page cache, never flushed). An export writes GiBs: through the
 * page cache they pile up as dirty pages whose writeback stalls every fsync on the same disk — the
 * running guest's own, during `live` and `monitor-snapshot` — for hundreds of ms (bench:downtime,
 * the guest writer's longest write+fsync). The store fsyncs the file before it is active either way.
 * Probed on the target itself (created, mode 0640, when absent: qemu-img then writes over it); any
 * trouble opening it is left for qemu-img to meet and report.
 */
async function directTargetArgs(dest: string): Promise<string[]> {
  try {
    const fh = await open(dest, constants.O_WRONLY | constants.O_CREAT | constants.O_DIRECT, 0o640);
    await fh.close();
    return ['-t', 'none'];
  } catch {
    return [];
  }
}

/** Escapes a value for qemu's comma-separated option syntax (`,` → `,,`). */
export function escapeOptValue(v: string): string {
  return v.replace(/,/g, ',,');
}

/**
 * Bounds of qemu-img runs, each the value of the option an operator tunes it with. Past its bound a
 * qemu-img is stopped (SIGTERM, SIGKILL after the grace) and the call rejects with ProgramTimeout
 * naming the option.
 */
export interface QemuImgBounds {
  /** info, check, create, snapshot listing: metadata reads and writes. `[hypervisor] qemu_img_timeout`. */
  quickMs: number;
  /**
   * snapshot -c / -d of an offline disk: they walk the refcounts of the whole disk, as the same
   * work through a running QEMU's monitor does, so they get the same bound. `[hypervisor] job_timeout`.
   */
  snapshotMs: number;
  /** convert: a raw export of a disk or internal snapshot, a live backup's copy. `[hypervisor] export_timeout`. */
  exportMs: number;
  /** From SIGTERM to SIGKILL once a bound has passed (default: exec.ts's). */
  killGraceMs?: number;
}

export const QEMU_IMG_TIMEOUT_OPTION = '[hypervisor] qemu_img_timeout';
export const JOB_TIMEOUT_OPTION = '[hypervisor] job_timeout';
export const EXPORT_TIMEOUT_OPTION = '[hypervisor] export_timeout';

/** The options' defaults (etc/snapshot-driver.conf). */
export const DEFAULT_QEMU_IMG_BOUNDS: QemuImgBounds = { quickMs: 120_000, snapshotMs: 600_000, exportMs: 3_600_000 };

type BoundKind = 'quick' | 'snapshot' | 'export';

/**
 * The bound of a copy of at most `sizeBytes` of data at `rateLimit` bytes/s: `exportMs`, or what the
 * limit alone needs with a quarter more when that is longer (a rate limit the operator set must
 * never be what kills a copy that keeps to it).
 */
export function rateLimitedBoundMs(exportMs: number, rateLimit: number | undefined, sizeBytes: number | undefined): number {
  if (rateLimit === undefined || !(rateLimit > 0) || sizeBytes === undefined) return exportMs;
  return Math.max(exportMs, Math.ceil((sizeBytes / rateLimit) * 1250));
}

/** `-r <bytes/s>` of a rate limit, none for unset or 0. */
function rateArgs(rateLimit: number | undefined): string[] {
  return rateLimit !== undefined && rateLimit > 0 ? ['-r', String(Math.max(1, Math.floor(rateLimit)))] : [];
}

/** qemu-img as `[hypervisor]` configures it: its program and its bounds. */
export function qemuImgFromConfig(h: {
  qemu_img: string;
  qemu_img_timeout: number;
  job_timeout: number;
  export_timeout: number;
  background_export_nice: number;
}, agentCpus = ''): QemuImg {
  return new QemuImg(
    h.qemu_img,
    { quickMs: h.qemu_img_timeout * 1000, snapshotMs: h.job_timeout * 1000, exportMs: h.export_timeout * 1000 },
    h.background_export_nice,
    agentCpus || undefined,
  );
}

export class QemuImg {
  readonly bounds: QemuImgBounds;

  constructor(
    readonly binary = 'qemu-img',
    bounds: Partial<QemuImgBounds> = {},
    /** Niceness of a background copy (ConvertOptions.background); 0: none. */
    readonly backgroundNice = BACKGROUND_NICE,
    /**
     * `[DEFAULT] agent_cpus` (a CPU list): a background copy runs there, everything else on every
     * online CPU (the agent itself may be pinned to agent_cpus: its children would inherit that).
     * Undefined: no affinity is set.
     */
    readonly agentCpus?: string,
  ) {
    this.bounds = { ...DEFAULT_QEMU_IMG_BOUNDS, ...bounds };
  }

  /**
   * runProgram with the bound of `kind`. With agentCpus it runs as `taskset -c <cpus> qemu-img …`:
   * taskset sets the affinity and executes qemu-img in its own process, so every thread qemu-img
   * starts has it.
   */
  private runBounded(kind: BoundKind, args: string[], onStdout?: (c: string) => void, signal?: AbortSignal, background?: boolean, exportMs = this.bounds.exportMs) {
    const [timeoutMs, timeoutOption] =
      kind === 'quick'
        ? [this.bounds.quickMs, QEMU_IMG_TIMEOUT_OPTION]
        : kind === 'snapshot'
          ? [this.bounds.snapshotMs, JOB_TIMEOUT_OPTION]
          : [exportMs, exportMs === this.bounds.exportMs ? EXPORT_TIMEOUT_OPTION : `${EXPORT_TIMEOUT_OPTION}, lengthened to what the copy's rate limit needs`];
    const nice = background && this.backgroundNice > 0 ? this.backgroundNice : undefined;
    const [file, argv] = onCpus(this.binary, args, cpusFor(this.agentCpus, background ? 'background' : 'guest'));
    return runProgram(file, argv, { onStdout, signal, timeoutMs, timeoutOption, killGraceMs: this.bounds.killGraceMs, nice });
  }

  private async run(kind: BoundKind, args: string[], onStdout?: (c: string) => void, signal?: AbortSignal, background?: boolean, exportMs?: number): Promise<string> {
    let res;
    try {
      res = await this.runBounded(kind, args, onStdout, signal, background, exportMs);
    } catch (err) {
      if (err instanceof ProgramTimeout) throw err;
      const cpus = cpusFor(this.agentCpus, background ? 'background' : 'guest');
      const how = cpus !== undefined ? ` under taskset -c ${cpus}` : '';
      throw new QemuImgError(`cannot run ${this.binary}${how}: ${(err as Error).message}`, args, '', { cause: err });
    }
    if (signal?.aborted) throw new QemuImgError(`qemu-img ${args[0]} was cancelled`, args, res.stderr);
    if (res.code !== 0) {
      const msg = res.stderr.trim() || res.stdout.trim() || `exit code ${res.code}`;
      throw new QemuImgError(`qemu-img ${args[0]} failed: ${msg}`, args, res.stderr);
    }
    return res.stdout;
  }

  private imageOpts(path: string): string[] {
    return ['--image-opts', `driver=qcow2,file.driver=file,file.filename=${escapeOptValue(path)}`];
  }

  /** Creates a qcow2 image of `sizeBytes`, or on top of `backing` (its size when sizeBytes is unset). */
  async create(path: string, opts: { sizeBytes?: number; backing?: string; backingFormat?: 'qcow2' | 'raw' }): Promise<void> {
    const args = ['create', '-q', '-f', 'qcow2'];
    if (opts.backing !== undefined) {
      args.push('-b', opts.backing, '-F', opts.backingFormat ?? 'qcow2');
    }
    args.push(path);
    if (opts.sizeBytes !== undefined) args.push(String(opts.sizeBytes));
    await this.run('quick', args);
  }

  /** `qemu-img info --output=json -f qcow2`; forceShare (-U) reads an image a running QEMU holds. */
  async info(path: string, opts: { forceShare?: boolean } = {}): Promise<ImageInfo> {
    const args = ['info', '--output=json', '-f', 'qcow2'];
    if (opts.forceShare) args.push('-U');
    args.push(path);
    const out = await this.run('quick', args);
    let j: Record<string, unknown>;
    try {
      j = JSON.parse(out) as Record<string, unknown>;
    } catch (err) {
      throw new QemuImgError(`qemu-img info printed unparseable output for ${path}`, args, '', { cause: err });
    }
    const snaps = Array.isArray(j.snapshots) ? (j.snapshots as Record<string, unknown>[]) : [];
    return {
      virtualSize: Number(j['virtual-size']),
      actualSize: Number(j['actual-size'] ?? 0),
      format: String(j.format),
      backingFilename: typeof j['backing-filename'] === 'string' ? j['backing-filename'] : undefined,
      snapshots: snaps.map((s) => ({
        id: String(s.id),
        name: String(s.name),
        vmStateSize: Number(s['vm-state-size'] ?? 0),
        dateSec: Number(s['date-sec'] ?? 0),
      })),
    };
  }

  /** Lists internal snapshots (read-only, -U: allowed while QEMU holds the image). */
  async snapshotList(path: string): Promise<SnapshotEntry[]> {
    return (await this.info(path, { forceShare: true })).snapshots;
  }

  /** `qemu-img snapshot -c`. Only while no QEMU process has the image open (SPEC §2). */
  async snapshotCreate(path: string, name: string): Promise<void> {
    await this.run('snapshot', ['snapshot', '-q', '-c', name, ...this.imageOpts(path)]);
  }

  /** `qemu-img snapshot -d`. Only while no QEMU process has the image open (SPEC §2). */
  async snapshotDelete(path: string, name: string): Promise<void> {
    await this.run('snapshot', ['snapshot', '-q', '-d', name, ...this.imageOpts(path)]);
  }

  /**
   * Converts a qcow2 image (or one of its internal snapshots) to raw: a sparse file, or into an NBD
   * export of the image's size that reads as zeros (`-n --target-is-zero`: zeros are not sent, and
   * qemu-img writes in increasing offset order).
   */
  async convertToRaw(src: string, dest: string | { nbdUri: string }, opts: ConvertOptions = {}): Promise<void> {
    const args = ['convert', '-f', 'qcow2', '-O', 'raw'];
    if (opts.forceShare) args.push('-U');
    if (opts.snapshotName !== undefined) args.push('-l', `snapshot.name=${escapeOptValue(opts.snapshotName)}`);
    args.push(...rateArgs(opts.rateLimit));
    if (opts.onProgress) args.push('-p');
    if (typeof dest === 'string') args.push(...(await directTargetArgs(dest)), src, dest);
    else args.push('-n', '--target-is-zero', src, dest.nbdUri);
    const boundMs = rateLimitedBoundMs(this.bounds.exportMs, opts.rateLimit, opts.sizeBytes);
    await this.run('export', args, progressParser(opts.onProgress), undefined, opts.background, boundMs);
  }

  /**
   * Copies what an NBD server exports (e.g. libvirt's pull backup, `nbd+unix:///vda?socket=…`) into a
   * sparse raw file, or into the image store's NBD receiver: the export's holes are asked for (block
   * status), not read. `signal` stops it.
   * `rateLimit`: bytes/s of data copied (-r; holes cost nothing); with `sizeBytes` (the export's
   * size), the copy's bound is what that needs when export_timeout is shorter. `targetExists`: write into `dest`
   * as it is, a file of the export's size reading as zeros (-n --target-is-zero: holes stay holes).
   *
   * One request at a time (-m 1, not qemu-img's 8): the server is a running guest's own QEMU, whose
   * main loop also serves that guest's I/O, and the store paces the copy to its hashes anyway. With
   * one, `live`'s copy ended no later and the guest's fsync p99 during it was lower (bench:downtime).
   */
  async convertNbdToRaw(
    uri: string,
    dest: string | { nbdUri: string },
    opts: { onProgress?: (fraction: number) => void; signal?: AbortSignal; rateLimit?: number; sizeBytes?: number; targetExists?: boolean; background?: boolean } = {},
  ): Promise<void> {
    const args = ['convert', '-m', '1', '-f', 'raw', '-O', 'raw'];
    if (opts.targetExists || typeof dest !== 'string') args.push('-n', '--target-is-zero');
    args.push(...rateArgs(opts.rateLimit));
    if (opts.onProgress) args.push('-p');
    if (typeof dest === 'string') args.push(...(await directTargetArgs(dest)), uri, dest);
    else args.push(uri, dest.nbdUri);
    const boundMs = rateLimitedBoundMs(this.bounds.exportMs, opts.rateLimit, opts.sizeBytes);
    await this.run('export', args, progressParser(opts.onProgress), opts.signal, opts.background, boundMs);
  }

  /** `qemu-img check --output=json -f qcow2`. Exit codes 2/3 (errors/leaks) are results, not failures. */
  async check(path: string, opts: { forceShare?: boolean } = {}): Promise<CheckResult> {
    const args = ['check', '--output=json', '-f', 'qcow2'];
    if (opts.forceShare) args.push('-U');
    args.push(path);
    const res = await this.runBounded('quick', args).catch((err: Error) => {
      if (err instanceof ProgramTimeout) throw err;
      throw new QemuImgError(`cannot run ${this.binary}: ${err.message}`, args);
    });
    let j: Record<string, unknown>;
    try {
      j = JSON.parse(res.stdout) as Record<string, unknown>;
    } catch {
      throw new QemuImgError(`qemu-img check failed: ${res.stderr.trim() || `exit code ${res.code}`}`, args, res.stderr);
    }
    const corruptions = Number(j.corruptions ?? 0);
    const leaks = Number(j.leaks ?? 0);
    const checkErrors = Number(j['check-errors'] ?? 0);
    return { clean: corruptions === 0 && leaks === 0 && checkErrors === 0, corruptions, leaks, checkErrors };
  }
}
