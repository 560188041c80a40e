import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename } from 'node:fs/promises';
import path from 'node:path';
import { errorMessage } from '../errors.js';
import type { Logger } from '../log.js';
import type { JournalEntry, RequestJournal, RpcRequest } from '../messaging/rpc-types.js';
import { fsyncDir, isErrno, unlinkIfExists, writeFileAtomic } from '../util/durable-fs.js';

/** Finished `_unique_id`s kept for duplicate detection: at most this many, the most recent. */
export const DEFAULT_MAX_SEEN = 10_000;
/** …and none older than this. */
export const DEFAULT_SEEN_TTL_MS = 7 * 24 * 3600 * 1000;

const FILE_MODE = 0o600; // entries hold the request context (tokens, user ids)
const DIR_MODE = 0o700;
const SEEN_FILE = 'seen.log';
const ENTRY_RE = /^(\d{16})-[0-9a-f]{8}\.json$/;

export interface FileJournalOptions {
  /** The journal's own directory: `<state_path>/journal`. Created on first use. */
  dir: string;
  log: Logger;
  maxSeen?: number;
  seenTtlMs?: number;
  /** Clock (tests). */
  now?: () => Date;
}

interface StoredEntry extends JournalEntry {
  seq: number;
}

/** One line of seen.log: a finished request. */
interface SeenRecord {
  /** Finish time, ms since the epoch. */
  at: number;
  /** The entry id (so that an entry whose file survived a crash after finish is known as finished). */
  entry: string;
  uid: string | null;
  ok: boolean;
}

/**
 * The agent's durable journal of accepted requests (SPEC §5), under `<state_path>/journal/`:
 *
 * - `<seq>-<random>.json`: one file per accepted, unfinished request (written atomically and
 *   fsynced before accept() resolves); `seq` (16 digits) gives the acceptance order, across restarts.
 * - `seen.log`: one JSON line per finished request (`{"at","entry","uid","ok"}`), appended and
 *   fsynced before the entry file is removed. Bounded: the last `maxSeen` (10000) finished ids, none
 *   older than `seenTtlMs` (7 days); the file is rewritten compacted when it holds twice that many.
 * - `*.corrupt`: entry files that could not be read, moved aside at start-up.
 *
 * Safe for concurrent use within one process; one process per directory.
 */
export class FileJournal implements RequestJournal {
  readonly dir: string;
  private readonly log: Logger;
  private readonly maxSeen: number;
  private readonly seenTtlMs: number;
  private readonly now: () => Date;

  private loading: Promise<void> | undefined;
  private nextSeq = 1;
  private readonly entries = new Map<string, StoredEntry>();
  /** unique id → number of unfinished entries (or accepts in flight) carrying it. */
  private readonly unfinishedUids = new Map<string, number>();
  /** unique id → its finish record; insertion order = finish order. */
  private readonly seen = new Map<string, SeenRecord>();
  /** Finish records of entries whose file is not removed yet: kept through any compaction. */
  private readonly finishing = new Map<string, SeenRecord>();
  /** Lines in seen.log (to know when to compact). */
  private seenLines = 0;
  /** Serialises writes to seen.log. */
  private seenLock: Promise<void> = Promise.resolve();

  constructor(opts: FileJournalOptions) {
    this.dir = opts.dir;
    this.log = opts.log.child({ component: 'journal' });
    this.maxSeen = opts.maxSeen ?? DEFAULT_MAX_SEEN;
    this.seenTtlMs = opts.seenTtlMs ?? DEFAULT_SEEN_TTL_MS;
    this.now = opts.now ?? (() => new Date());
    if (!Number.isSafeInteger(this.maxSeen) || this.maxSeen < 1) throw new RangeError(`maxSeen must be an integer >= 1, got ${this.maxSeen}`);
    if (!(this.seenTtlMs > 0)) throw new RangeError(`seenTtlMs must be > 0, got ${this.seenTtlMs}`);
  }

  /** Loads the directory (also done lazily by every method); call it at start-up to fail early. */
  async open(): Promise<this> {
    await this.ready();
    return this;
  }

  async has(uniqueId: string): Promise<boolean> {
    await this.ready();
    return this.knows(uniqueId);
  }

  async accept(request: RpcRequest): Promise<JournalEntry> {
    await this.ready();
    return this.record(request);
  }

  /**
   * has() and accept() in one step, with no gap between them: undefined (nothing recorded) when the
   * request's `_unique_id` is already known, including from an accept still in flight.
   */
  async acceptIfNew(request: RpcRequest): Promise<JournalEntry | undefined> {
    await this.ready();
    if (request.uniqueId !== undefined && this.knows(request.uniqueId)) return undefined;
    return this.record(request);
  }

  async finish(id: string, outcome: { ok: boolean; error?: string }): Promise<void> {
    await this.ready();
    const entry = this.entries.get(id);
    if (!entry || this.finishing.has(id)) {
      this.log.warn({ entry_id: id }, 'finish of an unknown or already finished journal entry ignored');
      return;
    }
    const uid = entry.request.uniqueId ?? null;
    const rec: SeenRecord = { at: this.now().getTime(), entry: id, uid, ok: outcome.ok };
    // Seen first, then remove the entry: a crash in between leaves an entry that start-up knows is finished.
    this.finishing.set(id, rec);
    try {
      await this.withSeenLock(() => this.appendSeen(rec));
      if (uid !== null) this.rememberSeen({ ...rec, uid });
      this.entries.delete(id);
      if (uid !== null) this.dropUnfinishedUid(uid);
      await unlinkIfExists(path.join(this.dir, `${id}.json`));
      await fsyncDir(this.dir);
    } finally {
      this.finishing.delete(id);
    }
    if (this.seenLines > 2 * this.maxSeen) await this.withSeenLock(() => this.compactSeen());
    this.log.debug({ entry_id: id, ok: outcome.ok, error: outcome.error }, 'journal entry finished');
  }

  async unfinished(): Promise<JournalEntry[]> {
    await this.ready();
    return [...this.entries.values()].sort((a, b) => a.seq - b.seq).map(toJournalEntry);
  }

  // ---- internals ----

  private knows(uniqueId: string): boolean {
    if (this.unfinishedUids.has(uniqueId)) return true;
    const rec = this.seen.get(uniqueId);
    return rec !== undefined && this.now().getTime() - rec.at <= this.seenTtlMs;
  }

  private async record(request: RpcRequest): Promise<JournalEntry> {
    // Everything up to the first await is synchronous: the seq follows call order, and the unique id
    // is known to has() at once.
    const seq = this.nextSeq++;
    const id = `${String(seq).padStart(16, '0')}-${randomBytes(4).toString('hex')}`;
    const entry: StoredEntry = { id, seq, request, acceptedAt: this.now().toISOString() };
    const uid = request.uniqueId;
    if (uid !== undefined) this.unfinishedUids.set(uid, (this.unfinishedUids.get(uid) ?? 0) + 1);
    try {
      await writeFileAtomic(path.join(this.dir, `${id}.json`), `${JSON.stringify(entry)}\n`, { mode: FILE_MODE });
    } catch (err) {
      if (uid !== undefined) this.dropUnfinishedUid(uid);
      throw err;
    }
    this.entries.set(id, entry);
    return toJournalEntry(entry);
  }

  private dropUnfinishedUid(uid: string): void {
    const n = (this.unfinishedUids.get(uid) ?? 1) - 1;
    if (n <= 0) this.unfinishedUids.delete(uid);
    else this.unfinishedUids.set(uid, n);
  }

  private rememberSeen(rec: SeenRecord & { uid: string }): void {
    this.seen.delete(rec.uid); // re-insert: keeps insertion order = finish order
    this.seen.set(rec.uid, rec);
    this.pruneSeen();
  }

  /** Drops ids beyond maxSeen and those past the TTL (the oldest come first). */
  private pruneSeen(): void {
    const cutoff = this.now().getTime() - this.seenTtlMs;
    for (const [uid, { at }] of this.seen) {
      if (this.seen.size <= this.maxSeen && at >= cutoff) break;
      this.seen.delete(uid);
    }
  }

  private ready(): Promise<void> {
    this.loading ??= this.load();
    return this.loading;
  }

  private async load(): Promise<void> {
    const created = await mkdir(this.dir, { recursive: true, mode: DIR_MODE });
    if (created) await fsyncDir(path.dirname(created));
    const { finished: finishedEntries, rewrite } = await this.loadSeen();

    const names = (await readdir(this.dir)).sort();
    let changed = false;
    for (const name of names) {
      if (name.startsWith('.') && name.includes('.tmp-')) {
        // Debris of a write that crashed before its rename: never acknowledged, so never accepted.
        await unlinkIfExists(path.join(this.dir, name));
        changed = true;
        continue;
      }
      if (!name.endsWith('.json')) continue;
      const file = path.join(this.dir, name);
      const id = name.slice(0, -'.json'.length);
      if (finishedEntries.has(id)) {
        await unlinkIfExists(file);
        changed = true;
        continue;
      }
      const entry = await readEntry(file, name);
      if (typeof entry === 'string') {
        await this.moveAside(file, entry);
        changed = true;
        continue;
      }
      this.entries.set(entry.id, entry);
      if (entry.request.uniqueId !== undefined) {
        this.unfinishedUids.set(entry.request.uniqueId, (this.unfinishedUids.get(entry.request.uniqueId) ?? 0) + 1);
      }
      this.nextSeq = Math.max(this.nextSeq, entry.seq + 1);
    }
    // Corrupt files keep their seq out of reuse too, so that their names stay unique.
    for (const name of names) {
      const m = /^(\d{16})-/.exec(name);
      if (m?.[1] !== undefined) this.nextSeq = Math.max(this.nextSeq, Number(m[1]) + 1);
    }
    if (changed) await fsyncDir(this.dir);
    // Only now, with leftover entry files of finished requests removed, may their records go.
    if (rewrite || this.seenLines > 2 * this.maxSeen) await this.compactSeen();
    if (this.entries.size > 0) this.log.info({ unfinished: this.entries.size }, 'journal has unfinished requests');
  }

  /**
   * Reads seen.log; returns the entry ids it records as finished (to clear leftover entry files) and
   * whether the file must be rewritten (unreadable or torn lines).
   */
  private async loadSeen(): Promise<{ finished: Set<string>; rewrite: boolean }> {
    const file = path.join(this.dir, SEEN_FILE);
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return { finished: new Set(), rewrite: false };
      throw err;
    }
    const finished = new Set<string>();
    let bad = 0;
    const lines = text.split('\n');
    const torn = lines.pop() !== ''; // a crash mid-append leaves a last line without its newline
    for (const line of lines) {
      const rec = parseSeen(line);
      if (!rec) {
        bad += 1;
        continue;
      }
      finished.add(rec.entry);
      if (rec.uid !== null) this.rememberSeen({ ...rec, uid: rec.uid });
    }
    this.seenLines = lines.length;
    const rewrite = bad > 0 || torn;
    if (rewrite) this.log.warn({ file, bad_lines: bad, torn }, 'journal seen log had unreadable lines; rewriting it');
    return { finished, rewrite };
  }

  /** Runs `task` after every earlier seen.log write has ended. */
  private withSeenLock(task: () => Promise<void>): Promise<void> {
    const run = this.seenLock.then(task);
    this.seenLock = run.catch(() => undefined);
    return run;
  }

  private async appendSeen(rec: SeenRecord): Promise<void> {
    const file = path.join(this.dir, SEEN_FILE);
    const fh = await open(file, 'a', FILE_MODE);
    try {
      await fh.appendFile(`${JSON.stringify(rec)}\n`, 'utf8');
      await fh.sync();
    } finally {
      await fh.close();
    }
    if (this.seenLines === 0) await fsyncDir(this.dir); // the file may be new
    this.seenLines += 1;
  }

  /** Rewrites seen.log with only the records still kept (under the seen lock, or before any append). */
  private async compactSeen(): Promise<void> {
    this.pruneSeen();
    const recs = new Map<string, SeenRecord>();
    for (const rec of this.seen.values()) recs.set(rec.entry, rec);
    for (const rec of this.finishing.values()) recs.set(rec.entry, rec);
    const text = [...recs.values()].map((r) => `${JSON.stringify(r)}\n`).join('');
    await writeFileAtomic(path.join(this.dir, SEEN_FILE), text, { mode: FILE_MODE });
    this.seenLines = recs.size;
  }

  private async moveAside(file: string, reason: string): Promise<void> {
    const aside = `${file}.corrupt`;
    this.log.error({ file, moved_to: aside, reason }, `corrupt journal entry moved aside: ${reason}`);
    try {
      await rename(file, aside);
    } catch (err) {
      this.log.error({ file, err }, `could not move corrupt journal entry aside: ${errorMessage(err)}`);
    }
  }
}

function toJournalEntry(e: StoredEntry): JournalEntry {
  return { id: e.id, request: e.request, acceptedAt: e.acceptedAt };
}

/** The entry in `file`, or a reason why it is unusable. */
async function readEntry(file: string, name: string): Promise<StoredEntry | string> {
  const m = ENTRY_RE.exec(name);
  if (!m) return 'file name is not <16-digit seq>-<8 hex>.json';
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(file, 'utf8'));
  } catch (err) {
    return `unreadable: ${errorMessage(err)}`;
  }
  if (!isObject(parsed)) return 'not a JSON object';
  const { id, seq, acceptedAt, request } = parsed;
  if (id !== name.slice(0, -'.json'.length)) return 'id does not match the file name';
  if (seq !== Number(m[1])) return 'seq does not match the file name';
  if (typeof acceptedAt !== 'string' || Number.isNaN(Date.parse(acceptedAt))) return 'acceptedAt is not a date';
  if (!isObject(request)) return 'request is not an object';
  if (typeof request.method !== 'string') return 'request.method is not a string';
  if (!isObject(request.args)) return 'request.args is not an object';
  if (typeof request.version !== 'string') return 'request.version is not a string';
  if (!isObject(request.context)) return 'request.context is not an object';
  if (request.uniqueId !== undefined && typeof request.uniqueId !== 'string') return 'request.uniqueId is not a string';
  return { id, seq, acceptedAt, request: request as unknown as RpcRequest };
}

function parseSeen(line: string): SeenRecord | undefined {
  try {
    const v: unknown = JSON.parse(line);
    if (!isObject(v)) return undefined;
    const { at, entry, uid, ok } = v;
    if (typeof at !== 'number' || typeof entry !== 'string' || (uid !== null && typeof uid !== 'string') || typeof ok !== 'boolean') {
      return undefined;
    }
    return { at, entry, uid, ok };
  } catch {
    return undefined;
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
