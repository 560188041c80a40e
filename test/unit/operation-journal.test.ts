import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { once } from 'node:events';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { dir } from 'tmp-promise';
import { afterEach, describe, expect, it } from 'vitest';
import { ImageExists } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { OperationJournal, type NewOperation, type OperationRecord } from '../../src/snapshot/operation-journal.js';
import { PidLock } from '../../src/util/pid-lock.js';
import { isRunning, selfIdentity, type ProcessIdentity } from '../../src/util/process-identity.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

const cleanups: Array<() => Promise<void>> = [];
const children: ChildProcess[] = [];
afterEach(async () => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const c of cleanups.splice(0)) await c();
});

async function tmpDir(): Promise<string> {
  const t = await dir({ unsafeCleanup: true });
  cleanups.push(() => t.cleanup());
  return t.path;
}

async function journal(): Promise<OperationJournal> {
  return new OperationJournal(path.join(await tmpDir(), 'state', 'operations'), silentLogger());
}

function newOp(over: Partial<NewOperation> = {}): NewOperation {
  const imageId = over.image_id ?? randomUUID();
  return {
    image_id: imageId,
    instance_uuid: randomUUID(),
    request_id: 'req-1',
    strategy: 'suspend-create-resume-extract',
    snapshot_name: `snapdrv-${imageId}`,
    prior_state: 'running',
    steps: ['suspend', 'create-snapshot', 'resume', 'export-snapshot', 'delete-snapshot'],
    ...over,
  };
}

async function readBack(j: OperationJournal, imageId: string): Promise<OperationRecord> {
  return JSON.parse(await fs.readFile(path.join(j.dir, `${imageId}.json`), 'utf8')) as OperationRecord;
}

describe('OperationJournal', () => {
  it('begin records the operation in phase setup, owned by this process, 0600 in a 0700 folder', async () => {
    const j = await journal();
    const op = newOp();
    const h = await j.begin(op);
    const rec = await readBack(j, op.image_id);
    expect(rec).toEqual(h.record);
    expect(rec).toMatchObject({ version: 1, ...op, phase: 'setup', step_index: -1 });
    expect(rec.owner).toEqual(await selfIdentity());
    expect(rec.owner.pid).toBe(process.pid);
    expect(rec.started_at).toBe(rec.updated_at);
    expect(new Date(rec.started_at).toISOString()).toBe(rec.started_at);
    expect((await fs.stat(path.join(j.dir, `${op.image_id}.json`))).mode & 0o777).toBe(0o600);
    expect((await fs.stat(j.dir)).mode & 0o777).toBe(0o700);
    expect(await j.has(op.image_id)).toBe(true);
    expect(await j.has(randomUUID())).toBe(false);
    // Nothing but the record in the folder: the temp file of the atomic write is gone.
    expect(await fs.readdir(j.dir)).toEqual([`${op.image_id}.json`]);
  });

  it('begin is exclusive: a second begin for the same image (any case) is ImageExists and leaves the first record', async () => {
    const j = await journal();
    const op = newOp();
    await j.begin(op);
    const first = await readBack(j, op.image_id);
    await expect(j.begin(newOp({ image_id: op.image_id, request_id: 'req-2' }))).rejects.toBeInstanceOf(ImageExists);
    await expect(j.begin(newOp({ image_id: op.image_id.toUpperCase() }))).rejects.toBeInstanceOf(ImageExists);
    expect(await readBack(j, op.image_id)).toEqual(first);
    expect(await fs.readdir(j.dir)).toEqual([`${op.image_id}.json`]);
  });

  it('concurrent begins for one image: exactly one wins', async () => {
    const j = await journal();
    const id = randomUUID();
    const outcomes = await Promise.allSettled(Array.from({ length: 8 }, (_x, k) => j.begin(newOp({ image_id: id, request_id: `req-${k}` }))));
    expect(outcomes.filter((o) => o.status === 'fulfilled')).toHaveLength(1);
    for (const o of outcomes) if (o.status === 'rejected') expect(o.reason).toBeInstanceOf(ImageExists);
    expect(await fs.readdir(j.dir)).toEqual([`${id}.json`]);
  });

  it('refuses an image id that is not a UUID (no path outside its folder)', async () => {
    const j = await journal();
    await expect(j.begin(newOp({ image_id: '../../etc/passwd' }))).rejects.toThrow(/is not a UUID/);
    await expect(j.has('../x')).rejects.toThrow(/is not a UUID/);
    await expect(j.remove('x')).rejects.toThrow(/is not a UUID/);
  });

  it('step and commit rewrite the record before returning; end removes it', async () => {
    const j = await journal();
    const op = newOp();
    const h = await j.begin(op);
    await h.step(0, 'run');
    expect(await readBack(j, op.image_id)).toMatchObject({ phase: 'run', step_index: 0 });
    await h.step(3, 'run');
    expect(await readBack(j, op.image_id)).toMatchObject({ phase: 'run', step_index: 3 });
    await h.step(1, 'undo');
    const undo = await readBack(j, op.image_id);
    expect(undo).toMatchObject({ ...op, phase: 'undo', step_index: 1, started_at: h.record.started_at });
    expect(undo.updated_at >= undo.started_at).toBe(true);
    await h.commit();
    expect(await readBack(j, op.image_id)).toMatchObject({ phase: 'commit', step_index: op.steps.length });
    expect((await fs.stat(path.join(j.dir, `${op.image_id}.json`))).mode & 0o777).toBe(0o600);
    expect(await j.list()).toEqual([await readBack(j, op.image_id)]);
    await h.end();
    expect(await j.has(op.image_id)).toBe(false);
    expect(await fs.readdir(j.dir)).toEqual([]);
    expect(await j.list()).toEqual([]);
    // Ending twice is harmless; so is removing what is not there.
    await h.end();
    await j.remove(randomUUID());
  });

  it('list() is empty when the folder does not exist yet', async () => {
    const j = await journal();
    expect(await j.list()).toEqual([]);
  });

  it('list() sorts oldest first (started_at, then image id)', async () => {
    const j = await journal();
    const ids = Array.from({ length: 4 }, () => randomUUID());
    const handles = [];
    for (const id of ids) handles.push(await j.begin(newOp({ image_id: id })));
    const starts = ['2026-01-01T00:00:03.000Z', '2026-01-01T00:00:01.000Z', '2026-01-01T00:00:02.000Z', '2026-01-01T00:00:01.000Z'];
    for (const [k, h] of handles.entries()) {
      h.record.started_at = starts[k]!;
      await j.write(h.record);
    }
    const expected = [
      ...[ids[1]!, ids[3]!].sort(), // same start: by image id
      ids[2]!,
      ids[0]!,
    ];
    expect((await j.list()).map((r) => r.image_id)).toEqual(expected);
  });

  it('list() removes the debris of an interrupted atomic write and ignores other files', async () => {
    const j = await journal();
    const op = newOp();
    await j.begin(op);
    const debris = [`.${op.image_id}.json.tmp-${await deadPid()}-abcdef`, `.${randomUUID()}.json.tmp-${await deadPid()}-0`];
    for (const d of debris) await fs.writeFile(path.join(j.dir, d), '{"version":1');
    await fs.writeFile(path.join(j.dir, 'README'), 'not a record');
    await fs.writeFile(path.join(j.dir, '.hidden'), 'not debris');
    const list = await j.list();
    expect(list.map((r) => r.image_id)).toEqual([op.image_id]);
    expect((await fs.readdir(j.dir)).sort()).toEqual(['.hidden', `${op.image_id}.json`, 'README'].sort());
  });

  it('list() leaves alone the temp file of a write under way in a live process, and removes a dead writer\'s', async () => {
    const j = await journal();
    await j.begin(newOp()); // creates the folder
    // Another process (alive) is recording an operation: its atomic write's temp file, not yet renamed.
    const writer = spawn('sleep', ['60'], { stdio: 'ignore' });
    children.push(writer);
    const id = randomUUID();
    const record = { ...valid(id), owner: { pid: writer.pid!, start: null, boot: null } };
    const live = path.join(j.dir, `.${id}.json.tmp-${writer.pid}-0a1b2c3d4e5f`);
    await fs.writeFile(live, JSON.stringify(record));
    // And this process too: the agent lists the journal while its own operations write to it.
    const mine = path.join(j.dir, `.${randomUUID()}.json.tmp-${process.pid}-abcdef012345`);
    await fs.writeFile(mine, '{"version":1');
    const dead = path.join(j.dir, `.${randomUUID()}.json.tmp-${await deadPid()}-0123456789ab`);
    await fs.writeFile(dead, '{"version":1');

    expect(await j.list()).toHaveLength(1);
    await expect(fs.access(live)).resolves.toBeUndefined();
    await expect(fs.access(mine)).resolves.toBeUndefined();
    await expect(fs.access(dead)).rejects.toThrow();
    // The writer's rename still finds its file: its record is there.
    await fs.rename(live, path.join(j.dir, `${id}.json`));
    expect((await j.list()).map((r) => r.image_id)).toContain(id);

    // Once the writer is gone (killed and reaped), its debris goes.
    const debris = path.join(j.dir, `.${randomUUID()}.json.tmp-${writer.pid}-ffffffffffff`);
    await fs.writeFile(debris, '{');
    writer.kill('SIGKILL');
    await once(writer, 'exit');
    await j.list();
    await expect(fs.access(debris)).rejects.toThrow();
    await fs.rm(mine);
  });

  const valid = (id: string): Record<string, unknown> => ({
    version: 1,
    ...newOp({ image_id: id }),
    phase: 'run',
    step_index: 2,
    owner: { pid: 12345, start: '42', boot: 'b' },
    started_at: '2026-01-01T00:00:00.000Z',
    updated_at: '2026-01-01T00:00:00.000Z',
  });
  const corruptions: Array<[string, (id: string) => string]> = [
    ['empty file', () => ''],
    ['truncated JSON', (id) => JSON.stringify(valid(id)).slice(0, 40)],
    ['binary garbage', () => '\u0000\u0001\u00ff\u0013'],
    ['a JSON array', (id) => JSON.stringify([valid(id)])],
    ['JSON null', () => 'null'],
    ['a JSON string', () => '"record"'],
    ['unknown version', (id) => JSON.stringify({ ...valid(id), version: 2 })],
    ['no version', (id) => JSON.stringify({ ...valid(id), version: undefined })],
    ['image_id of another file', (id) => JSON.stringify({ ...valid(id), image_id: randomUUID() })],
    ['image_id not a UUID', (id) => JSON.stringify({ ...valid(id), image_id: '../../etc/passwd' })],
    ['instance_uuid not a UUID', (id) => JSON.stringify({ ...valid(id), instance_uuid: 'vm-1' })],
    ['request_id missing', (id) => JSON.stringify({ ...valid(id), request_id: undefined })],
    ['strategy a number', (id) => JSON.stringify({ ...valid(id), strategy: 3 })],
    ['snapshot_name missing', (id) => JSON.stringify({ ...valid(id), snapshot_name: undefined })],
    ['prior_state unknown', (id) => JSON.stringify({ ...valid(id), prior_state: 'hibernated' })],
    ['steps not a list', (id) => JSON.stringify({ ...valid(id), steps: 'suspend' })],
    ['steps with a number', (id) => JSON.stringify({ ...valid(id), steps: ['suspend', 1] })],
    ['phase unknown', (id) => JSON.stringify({ ...valid(id), phase: 'done' })],
    ['step_index fractional', (id) => JSON.stringify({ ...valid(id), step_index: 1.5 })],
    ['step_index a string', (id) => JSON.stringify({ ...valid(id), step_index: '2' })],
    ['owner missing', (id) => JSON.stringify({ ...valid(id), owner: undefined })],
    ['owner null', (id) => JSON.stringify({ ...valid(id), owner: null })],
    ['owner without pid', (id) => JSON.stringify({ ...valid(id), owner: { start: '1', boot: null } })],
  ];

  it('the valid record the corruption cases start from is accepted', async () => {
    const j = await journal();
    const id = randomUUID();
    await fs.mkdir(j.dir, { recursive: true });
    const record = valid(id);
    await fs.writeFile(path.join(j.dir, `${id}.json`), JSON.stringify(record));
    expect(await j.list()).toEqual([record]);
  });

  it.each(corruptions)('an unreadable record (%s) is moved aside as .corrupt, the others listed', async (_name, content) => {
    const j = await journal();
    const good = newOp();
    await j.begin(good);
    const id = randomUUID();
    const file = path.join(j.dir, `${id}.json`);
    const text = content(id);
    await fs.writeFile(file, text);
    const list = await j.list();
    expect(list.map((r) => r.image_id)).toEqual([good.image_id]);
    await expect(fs.stat(file)).rejects.toThrow();
    expect(await fs.readFile(`${file}.corrupt`, 'utf8')).toBe(text);
    // Once aside it is no longer looked at; the id is free again.
    expect((await j.list()).map((r) => r.image_id)).toEqual([good.image_id]);
    expect(await j.has(id)).toBe(false);
    await j.begin(newOp({ image_id: id }));
    expect((await j.list()).map((r) => r.image_id).sort()).toEqual([good.image_id, id].sort());
  });

  it('a record listed but gone when it is read (its operation ended meanwhile) is skipped, not moved aside', async () => {
    const j = await journal();
    const kept = newOp();
    await j.begin(kept);
    // A name in the listing whose file cannot be opened: what an ended operation leaves a listing.
    const gone = `${randomUUID()}.json`;
    await fs.symlink(path.join(j.dir, 'removed-meanwhile'), path.join(j.dir, gone));
    expect((await j.list()).map((r) => r.image_id)).toEqual([kept.image_id]);
    expect((await fs.readdir(j.dir)).filter((n) => n.endsWith('.corrupt'))).toEqual([]);
  });

  it('a folder where a record should be is moved aside too', async () => {
    const j = await journal();
    const id = randomUUID();
    await fs.mkdir(path.join(j.dir, `${id}.json`), { recursive: true });
    expect(await j.list()).toEqual([]);
    expect((await fs.stat(path.join(j.dir, `${id}.json.corrupt`))).isDirectory()).toBe(true);
  });
});

// ---- process identity and the agent lock ----

/** Runs a short-lived program to its end; resolves with its pid (gone now) once it has been reaped. */
async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ['-e', ''], { stdio: 'ignore' });
  const pid = child.pid!;
  await once(child, 'exit');
  return pid;
}

/** Field 22 (starttime) of a /proc/<pid>/stat text, read independently of the product's parser. */
function startTimeOf(stat: string): string {
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  expect(fields[0]).toMatch(/^[RSDT]$/); // running, sleeping, disk wait, stopped
  return fields[19]!;
}

/** A child that runs until killed; resolves once it is up. */
async function sleeper(): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['-e', 'process.stdout.write("up\\n"); setInterval(() => undefined, 1000)'], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(child);
  await once(child.stdout!, 'data');
  return child;
}

async function bootId(): Promise<string> {
  return (await fs.readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
}

describe('process identity', () => {
  it('names this process: pid, its start time from /proc, the boot id', async () => {
    const me = await selfIdentity();
    expect(me.pid).toBe(process.pid);
    expect(me.start).toBe(startTimeOf(await fs.readFile(`/proc/${process.pid}/stat`, 'utf8')));
    expect(me.boot).toBe(await bootId());
    expect(await isRunning(me)).toBe(true);
  });

  it('another live process is running; after it is killed and reaped, it is not', async () => {
    const child = await sleeper();
    const pid = child.pid!;
    const id: ProcessIdentity = { pid, start: startTimeOf(await fs.readFile(`/proc/${pid}/stat`, 'utf8')), boot: await bootId() };
    expect(await isRunning(id)).toBe(true);
    expect(await isRunning({ pid, start: null, boot: null })).toBe(true);
    child.kill('SIGKILL');
    await once(child, 'exit');
    expect(await isRunning(id)).toBe(false);
    expect(await isRunning({ pid, start: null, boot: null })).toBe(false);
  });

  it('a pid that is gone is not running', async () => {
    const pid = await deadPid();
    expect(await isRunning({ pid, start: null, boot: null })).toBe(false);
    expect(await isRunning({ pid, start: '1', boot: await bootId() })).toBe(false);
  });

  it('a running pid with another start time (reused pid) is not the same process', async () => {
    const me = await selfIdentity();
    expect(await isRunning({ ...me, start: String(Number(me.start) + 1) })).toBe(false);
    expect(await isRunning({ ...me, start: '0' })).toBe(false);
  });

  // kill(0, 0) signals our own process group and kill(-1, 0) every process we may signal: both
  // succeed, so neither may be taken as "that process exists".
  it.each([0, -1])('pid %i names no single process: not running', async (pid) => {
    expect(await isRunning({ pid, start: null, boot: null })).toBe(false);
    expect(await isRunning({ pid, start: '5', boot: await bootId() })).toBe(false);
  });

  it('a record from before a reboot (other boot id) is not running', async () => {
    const me = await selfIdentity();
    expect(await isRunning({ ...me, boot: randomUUID() })).toBe(false);
  });
});

/** A child process that takes a PidLock on `file` and reports, then holds it (or not) until killed. */
async function lockInChild(file: string): Promise<{ child: ChildProcess; result: { held: boolean; holder?: ProcessIdentity; pid: number } }> {
  const script = [
    `const { PidLock } = await import(${JSON.stringify(pathToFileURL(path.join(ROOT, 'src/util/pid-lock.ts')).href)});`,
    `const lock = new PidLock(${JSON.stringify(file)});`,
    'const holder = await lock.acquire();',
    'process.stdout.write(JSON.stringify({ held: holder === undefined, holder, pid: process.pid }) + "\\n");',
    'setInterval(() => undefined, 1000);',
  ].join('\n');
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  let out = '';
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', () => out.includes('\n') && resolve());
    child.on('exit', (code) => reject(new Error(`lock child exited (${code}): ${err}`)));
  });
  return { child, result: JSON.parse(out) as { held: boolean; holder?: ProcessIdentity; pid: number } };
}

describe('PidLock', () => {
  it('acquire writes our identity (0600); release removes it; acquire again works', async () => {
    const file = path.join(await tmpDir(), 'state', 'agent.lock');
    const lock = new PidLock(file);
    expect(await lock.acquire()).toBeUndefined();
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toEqual(await selfIdentity());
    expect((await fs.stat(file)).mode & 0o777).toBe(0o600);
    expect(await lock.holder()).toEqual(await selfIdentity());
    await lock.release();
    await expect(fs.stat(file)).rejects.toThrow();
    expect(await lock.holder()).toBeUndefined();
    await lock.release(); // twice: harmless
    expect(await lock.acquire()).toBeUndefined();
    await lock.release();
  });

  it('a second lock on the same file in this process sees the holder, and its release leaves the lock', async () => {
    const file = path.join(await tmpDir(), 'agent.lock');
    const a = new PidLock(file);
    const b = new PidLock(file);
    expect(await a.acquire()).toBeUndefined();
    expect(await b.acquire()).toEqual(await selfIdentity());
    await b.release(); // b does not hold it
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toEqual(await selfIdentity());
    await a.release();
  });

  it('a PidLock in a child process sees this process holding it', async () => {
    const file = path.join(await tmpDir(), 'agent.lock');
    const lock = new PidLock(file);
    expect(await lock.acquire()).toBeUndefined();
    const { result } = await lockInChild(file);
    expect(result.held).toBe(false);
    expect(result.holder).toEqual(await selfIdentity());
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toEqual(await selfIdentity());
    await lock.release();
  });

  it('a lock held by a child is refused here; once the child is killed, the stale lock is taken over', async () => {
    const file = path.join(await tmpDir(), 'agent.lock');
    const { child, result } = await lockInChild(file);
    expect(result.held).toBe(true);
    const lock = new PidLock(file);
    const holder = await lock.acquire();
    expect(holder?.pid).toBe(child.pid);
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toMatchObject({ pid: child.pid });
    child.kill('SIGKILL');
    await once(child, 'exit');
    expect(await lock.acquire()).toBeUndefined();
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toEqual(await selfIdentity());
    await lock.release();
  });

  it('a stale lock naming a pid that is gone is taken over', async () => {
    const file = path.join(await tmpDir(), 'agent.lock');
    const stale: ProcessIdentity = { pid: await deadPid(), start: '12345', boot: await bootId() };
    await fs.writeFile(file, JSON.stringify(stale));
    const lock = new PidLock(file);
    expect(await lock.holder()).toBeUndefined();
    expect(await lock.acquire()).toBeUndefined();
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toEqual(await selfIdentity());
    await lock.release();
  });

  it.each([0, -1])('a lock file naming pid %i (no single process) is taken over', async (pid) => {
    const file = path.join(await tmpDir(), 'agent.lock');
    await fs.writeFile(file, JSON.stringify({ pid, start: null, boot: null }));
    const lock = new PidLock(file);
    expect(await lock.acquire()).toBeUndefined();
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toEqual(await selfIdentity());
    await lock.release();
  });

  it.each([
    ['garbage', 'not json'],
    ['empty', ''],
    ['no pid', '{"start":"1"}'],
  ])('a lock file with %s content is taken over', async (_name, content) => {
    const file = path.join(await tmpDir(), 'agent.lock');
    await fs.writeFile(file, content);
    const lock = new PidLock(file);
    expect(await lock.acquire()).toBeUndefined();
    expect(JSON.parse(await fs.readFile(file, 'utf8'))).toEqual(await selfIdentity());
    await lock.release();
  });
});
