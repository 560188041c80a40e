import { QemuImgError } from '../errors.js';
import { runProgram } from '../util/exec.js';

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
}

/** A qemu-img -p output reader: it prints "    (12.34/100%)\r" repeatedly. */
function progressParser(onProgress: ((fraction: number) => void) | undefined): ((chunk: string) => void) | undefined {
  if (!onProgress) return undefined;
  return (chunk) => {
    for (const m of chunk.matchAll(/\((\d+(?:\.\d+)?)\/100%\)/g)) onProgress(Number(m[1]) / 100);
  };
}

/** Escapes a value for qemu's comma-separated option syntax (`,` → `,,`). */
export function escapeOptValue(v: string): string {
  return v.replace(/,/g, ',,');
}

export class QemuImg {
  constructor(readonly binary = 'qemu-img') {}

  private async run(args: string[], onStdout?: (c: string) => void, signal?: AbortSignal): Promise<string> {
    let res;
    try {
      res = await runProgram(this.binary, args, { onStdout, signal });
    } catch (err) {
      throw new QemuImgError(`cannot run ${this.binary}: ${(err as Error).message}`, args, '', { cause: err });
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
    await this.run(args);
  }

  /** `qemu-img info --output=json -f qcow2`; forceShare (-U) reads an image a running QEMU holds. */
  async info(path: string, opts: { forceShare?: boolean } = {}): Promise<ImageInfo> {
    const args = ['info', '--output=json', '-f', 'qcow2'];
    if (opts.forceShare) args.push('-U');
    args.push(path);
    const out = await this.run(args);
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
    await this.run(['snapshot', '-q', '-c', name, ...this.imageOpts(path)]);
  }

  /** `qemu-img snapshot -d`. Only while no QEMU process has the image open (SPEC §2). */
  async snapshotDelete(path: string, name: string): Promise<void> {
    await this.run(['snapshot', '-q', '-d', name, ...this.imageOpts(path)]);
  }

  /** Converts a qcow2 image (or one of its internal snapshots) to a sparse raw file. */
  async convertToRaw(src: string, dest: string, opts: ConvertOptions = {}): Promise<void> {
    const args = ['convert', '-f', 'qcow2', '-O', 'raw'];
    if (opts.forceShare) args.push('-U');
    if (opts.snapshotName !== undefined) args.push('-l', `snapshot.name=${escapeOptValue(opts.snapshotName)}`);
    if (opts.onProgress) args.push('-p');
    args.push(src, dest);
    await this.run(args, progressParser(opts.onProgress));
  }

  /**
   * Copies what an NBD server exports (e.g. libvirt's pull backup, `nbd+unix:///vda?socket=…`) into a
   * sparse raw file: the export's holes are asked for (block status), not read. `signal` stops it.
   * `rateLimit`: bytes/s of data copied (-r; holes cost nothing). `targetExists`: write into `dest`
   * as it is, a file of the export's size reading as zeros (-n --target-is-zero: holes stay holes).
   */
  async convertNbdToRaw(
    uri: string,
    dest: string,
    opts: { onProgress?: (fraction: number) => void; signal?: AbortSignal; rateLimit?: number; targetExists?: boolean } = {},
  ): Promise<void> {
    const args = ['convert', '-f', 'raw', '-O', 'raw'];
    if (opts.targetExists) args.push('-n', '--target-is-zero');
    if (opts.rateLimit !== undefined && opts.rateLimit > 0) args.push('-r', String(Math.max(1, Math.floor(opts.rateLimit))));
    if (opts.onProgress) args.push('-p');
    args.push(uri, dest);
    await this.run(args, progressParser(opts.onProgress), opts.signal);
  }

  /** `qemu-img check --output=json -f qcow2`. Exit codes 2/3 (errors/leaks) are results, not failures. */
  async check(path: string, opts: { forceShare?: boolean } = {}): Promise<CheckResult> {
    const args = ['check', '--output=json', '-f', 'qcow2'];
    if (opts.forceShare) args.push('-U');
    args.push(path);
    const res = await runProgram(this.binary, args).catch((err: Error) => {
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
