import { mkdir, readdir, readFile, rename } from 'node:fs/promises';
import path from 'node:path';
import type { StrategyName } from '../config/schema.js';
import { errorMessage, ImageExists } from '../errors.js';
import type { PowerState } from '../hypervisor/types.js';
import type { Logger } from '../log.js';
import { fsyncDir, isErrno, pathExists, unlinkIfExists, writeFileAtomic } from '../util/durable-fs.js';
import { isRunning, selfIdentity, type ProcessIdentity } from '../util/process-identity.js';
import { isUuid } from '../util/uuid.js';

const FILE_MODE = 0o600;
/** The temp file of an atomic write (src/util/durable-fs.ts writeFileAtomic), with its writer's pid. */
const TEMP_NAME = /^\.[^/]+\.tmp-(\d+)-[0-9a-f]+$/;
const DIR_MODE = 0o700;

/**
 * Where a snapshot operation is: `setup` (recorded; the image may be created, no step begun), `run`
 * or `undo` of step `step_index` (which may have acted, fully or in part), `commit` (every step done,
 * the image being made active).
 */
export type OperationPhase = 'setup' | 'run' | 'undo' | 'commit';

/** One unfinished snapshot operation, as `<state_path>/operations/<image_id>.json`. */
export interface OperationRecord {
  version: 1;
  image_id: string;
  instance_uuid: string;
  request_id: string;
  strategy: StrategyName;
  /** The internal snapshot this operation makes (name_prefix + image id). */
  snapshot_name: string;
  /** The guest's power state before the operation: recovery brings it back to it. */
  prior_state: PowerState;
  /** The strategy's step names, in order. */
  steps: string[];
  phase: OperationPhase;
  /** Index into `steps` of the step running or being undone; -1 in `setup`, steps.length in `commit`. */
  step_index: number;
  /** The process carrying the operation out: recovery leaves the records of running ones alone. */
  owner: ProcessIdentity;
  /**
   * Set when the operation ended with something left to put right (an undo failed: e.g. a guest left
   * paused because its `cont` failed) while its owner lives on (a serving agent): recovery takes such
   * a record although its owner runs.
   */
  abandoned?: true;
  started_at: string;
  updated_at: string;
}

export type NewOperation = Omit<OperationRecord, 'version' | 'phase' | 'step_index' | 'owner' | 'started_at' | 'updated_at'>;

/**
 * The operation journal (SPEC §2 on every path, including crashes): one file per snapshot operation
 * under way, rewritten atomically and fsynced before each step acts and removed when the operation
 * has ended either way. What is left at start-up is what a crash interrupted (src/snapshot/recovery.ts).
 */
export class OperationJournal {
  constructor(
    readonly dir: string,
    private readonly log: Logger,
  ) {}

  private file(imageId: string): string {
    if (!isUuid(imageId)) throw new TypeError(`operation journal: image id ${JSON.stringify(imageId)} is not a UUID`);
    return path.join(this.dir, `${imageId.toLowerCase()}.json`);
  }

  /**
   * Records a new operation (phase `setup`). ImageExists if an operation on the same image is
   * recorded already (under way in some process, or interrupted and not recovered yet).
   */
  async begin(op: NewOperation): Promise<OperationHandle> {
    const created = await mkdir(this.dir, { recursive: true, mode: DIR_MODE });
    if (created) await fsyncDir(path.dirname(created));
    const now = new Date().toISOString();
    const record: OperationRecord = {
      version: 1,
      ...op,
      phase: 'setup',
      step_index: -1,
      owner: await selfIdentity(),
      started_at: now,
      updated_at: now,
    };
    try {
      await writeFileAtomic(this.file(op.image_id), serialize(record), { mode: FILE_MODE, exclusive: true });
    } catch (err) {
      if (isErrno(err, 'EEXIST')) throw new ImageExists(op.image_id);
      throw err;
    }
    return new OperationHandle(this, record);
  }

  /** Rewrites a record (atomically, fsynced). */
  async write(record: OperationRecord): Promise<void> {
    record.updated_at = new Date().toISOString();
    await writeFileAtomic(this.file(record.image_id), serialize(record), { mode: FILE_MODE });
  }

  /** True if an operation on this image is recorded (under way, or interrupted and not recovered). */
  async has(imageId: string): Promise<boolean> {
    return pathExists(this.file(imageId));
  }

  /** Removes a record: the operation has ended (or has been recovered). */
  async remove(imageId: string): Promise<void> {
    if (await unlinkIfExists(this.file(imageId))) await fsyncDir(this.dir);
  }

  /**
   * Every recorded operation, oldest first. An unreadable record is moved aside as `<name>.corrupt`
   * (and logged); write debris (`.<name>.tmp-<pid>-<hex>`) of a crash is removed once the process
   * that wrote it is gone (as the store sweep does); a write under way is never touched.
   */
  async list(): Promise<OperationRecord[]> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return [];
      throw err;
    }
    const records: OperationRecord[] = [];
    for (const name of names.sort()) {
      const file = path.join(this.dir, name);
      const temp = TEMP_NAME.exec(name);
      if (temp) {
        // Only a dead writer's: a live one (this process, or another one recording its operation)
        // renames its temp file into place next, and must find it.
        if (!(await isRunning({ pid: Number(temp[1]), start: null, boot: null }))) await unlinkIfExists(file);
        continue;
      }
      if (name.startsWith('.') && name.includes('.tmp-')) continue; // not a name writeFileAtomic makes
      if (!name.endsWith('.json')) continue;
      const parsed = await readRecord(file, name);
      // Listed, then removed before it was read: its operation has ended meanwhile.
      if (parsed === undefined) continue;
      if (typeof parsed === 'string') {
        this.log.error({ file, reason: parsed }, `unreadable operation journal record moved aside: ${parsed}`);
        await rename(file, `${file}.corrupt`).catch((err: unknown) => {
          this.log.error({ file, err: errorMessage(err) }, 'cannot move the unreadable record aside');
        });
        continue;
      }
      records.push(parsed);
    }
    return records.sort((a, b) => a.started_at.localeCompare(b.started_at) || a.image_id.localeCompare(b.image_id));
  }
}

/** One operation's record, as its owner updates it. */
export class OperationHandle {
  constructor(
    private readonly journal: OperationJournal,
    readonly record: OperationRecord,
  ) {}

  /** Records that step `index` is about to run (or be undone): before it acts. */
  async step(index: number, phase: 'run' | 'undo'): Promise<void> {
    this.record.step_index = index;
    this.record.phase = phase;
    await this.journal.write(this.record);
  }

  /** Records that every step is done and the image is being committed. */
  async commit(): Promise<void> {
    this.record.step_index = this.record.steps.length;
    this.record.phase = 'commit';
    await this.journal.write(this.record);
  }

  /**
   * The operation has ended, not put right: its record stays for recovery, which may take it now
   * (from this process too: a serving agent recovers it without waiting for its own next start).
   */
  async abandon(): Promise<void> {
    this.record.abandoned = true;
    await this.journal.write(this.record);
  }

  /** The operation has ended (success or handled failure): its record goes. */
  async end(): Promise<void> {
    await this.journal.remove(this.record.image_id);
  }
}

function serialize(record: OperationRecord): string {
  return `${JSON.stringify(record)}\n`;
}

const PHASES: readonly string[] = ['setup', 'run', 'undo', 'commit'];
const STATES: readonly string[] = ['running', 'paused', 'shutoff', 'saved', 'crashed'];

/** The record in `file`, or why it is unusable; undefined once it is gone. */
async function readRecord(file: string, name: string): Promise<OperationRecord | string | undefined> {
  let v: unknown;
  try {
    v = JSON.parse(await readFile(file, 'utf8'));
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return undefined;
    return `unreadable: ${errorMessage(err)}`;
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return 'not a JSON object';
  const r = v as Record<string, unknown>;
  if (r.version !== 1) return `unknown version ${JSON.stringify(r.version)}`;
  if (typeof r.image_id !== 'string' || !isUuid(r.image_id) || `${r.image_id.toLowerCase()}.json` !== name) return 'image_id does not match the file name';
  if (typeof r.instance_uuid !== 'string' || !isUuid(r.instance_uuid)) return 'instance_uuid is not a UUID';
  for (const k of ['request_id', 'strategy', 'snapshot_name', 'started_at', 'updated_at'] as const) {
    if (typeof r[k] !== 'string') return `${k} is not a string`;
  }
  if (typeof r.prior_state !== 'string' || !STATES.includes(r.prior_state)) return 'prior_state is not a power state';
  if (!Array.isArray(r.steps) || !r.steps.every((s) => typeof s === 'string')) return 'steps is not a list of names';
  if (typeof r.phase !== 'string' || !PHASES.includes(r.phase)) return 'phase is not one of setup, run, undo, commit';
  if (typeof r.step_index !== 'number' || !Number.isInteger(r.step_index)) return 'step_index is not an integer';
  // Recovery deletes this snapshot: it must be the one named after this image, nothing else.
  if (!(r.snapshot_name as string).endsWith(r.image_id)) return 'snapshot_name is not named after image_id';
  const owner = r.owner as Record<string, unknown> | null;
  if (typeof owner !== 'object' || owner === null || !Number.isSafeInteger(owner.pid) || (owner.pid as number) <= 0) {
    return 'owner is not a process identity';
  }
  if (r.abandoned !== undefined && r.abandoned !== true) return 'abandoned is not true';
  return r as unknown as OperationRecord;
}
