import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FileJournal, type FileJournalOptions } from '../../src/compute/journal.js';
import { silentLogger } from '../../src/log.js';
import type { RpcRequest } from '../../src/messaging/rpc-types.js';

let tmp: DirectoryResult;
let jdir: string;
beforeEach(async () => {
  tmp = await dir({ unsafeCleanup: true });
  jdir = path.join(tmp.path, 'state', 'journal');
});
afterEach(async () => {
  await tmp.cleanup();
});

function journal(opts: Partial<FileJournalOptions> = {}): FileJournal {
  return new FileJournal({ dir: jdir, log: silentLogger(), ...opts });
}

function request(n: number, uniqueId: string | undefined = `uid-${n}`): RpcRequest {
  return {
    method: 'snapshot_instance',
    args: { instance: { uuid: randomUUID() }, image_id: randomUUID(), n },
    version: '6.0',
    uniqueId,
    context: { request_id: `req-${n}`, auth_token: 'secret' },
  };
}

async function entryFiles(): Promise<string[]> {
  return (await fs.readdir(jdir)).filter((n) => n.endsWith('.json')).sort();
}

describe('FileJournal', () => {
  it('writes the entry file, mode 0600, before accept() resolves', async () => {
    const j = journal();
    const req = request(1);
    const entry = await j.accept(req);
    const files = await entryFiles();
    expect(files).toEqual([`${entry.id}.json`]);
    const file = path.join(jdir, files[0]!);
    const stored = JSON.parse(await fs.readFile(file, 'utf8'));
    expect(stored.request).toEqual(req);
    expect(stored.id).toBe(entry.id);
    expect(stored.acceptedAt).toBe(entry.acceptedAt);
    expect(new Date(entry.acceptedAt).toISOString()).toBe(entry.acceptedAt);
    expect((await fs.stat(file)).mode & 0o777).toBe(0o600);
    expect((await fs.stat(jdir)).mode & 0o777).toBe(0o700);
  });

  it('has() knows unfinished and finished unique ids, and nothing else', async () => {
    const j = journal();
    expect(await j.has('uid-1')).toBe(false);
    const e = await j.accept(request(1));
    expect(await j.has('uid-1')).toBe(true);
    await j.finish(e.id, { ok: true });
    expect(await j.has('uid-1')).toBe(true);
    expect(await j.has('uid-2')).toBe(false);
    expect(await entryFiles()).toEqual([]);
    expect(await j.unfinished()).toEqual([]);
  });

  it('knows a unique id as soon as accept() is called, before the write is durable', async () => {
    const j = journal();
    await j.open();
    const pending = j.accept(request(1));
    expect(await j.has('uid-1')).toBe(true);
    await pending;
  });

  it('returns unfinished entries in acceptance order, also for concurrent accepts', async () => {
    const j = journal();
    const entries = await Promise.all(Array.from({ length: 12 }, (_, i) => j.accept(request(i))));
    await j.finish(entries[3]!.id, { ok: true });
    await j.finish(entries[7]!.id, { ok: false, error: 'boom' });
    const unfinished = await j.unfinished();
    expect(unfinished.map((e) => e.request.args.n)).toEqual([0, 1, 2, 4, 5, 6, 8, 9, 10, 11]);
    expect(unfinished.map((e) => e.id)).toEqual(entries.filter((_, i) => i !== 3 && i !== 7).map((e) => e.id));
  });

  it('a new FileJournal on the same dir sees what the old one accepted (restart)', async () => {
    const old = journal();
    const a = await old.accept(request(1));
    const b = await old.accept(request(2));
    const c = await old.accept(request(3));
    await old.finish(b.id, { ok: true });

    const j = journal();
    const unfinished = await j.unfinished();
    expect(unfinished).toEqual([a, c]);
    expect(await j.has('uid-1')).toBe(true);
    expect(await j.has('uid-2')).toBe(true); // finished before the restart: still a duplicate
    expect(await j.has('uid-3')).toBe(true);
    expect(await j.has('uid-4')).toBe(false);

    // New requests come after the old unfinished ones; finishing an old one works.
    const d = await j.accept(request(4));
    await j.finish(a.id, { ok: true });
    expect((await j.unfinished()).map((e) => e.id)).toEqual([c.id, d.id]);

    const again = journal();
    expect((await again.unfinished()).map((e) => e.id)).toEqual([c.id, d.id]);
    expect(await again.has('uid-1')).toBe(true);
  });

  it('accepts requests without a unique id', async () => {
    const j = journal();
    const e = await j.accept(request(1, undefined));
    expect((await j.unfinished()).map((x) => x.id)).toEqual([e.id]);
    await j.finish(e.id, { ok: true });
    expect(await journal().unfinished()).toEqual([]);
  });

  it('moves a corrupt entry aside and loads the rest', async () => {
    const old = journal();
    const a = await old.accept(request(1));
    const b = await old.accept(request(2));
    const c = await old.accept(request(3));
    await fs.writeFile(path.join(jdir, `${b.id}.json`), '{"id": "trunc');
    const wrongShape = { ...JSON.parse(await fs.readFile(path.join(jdir, `${c.id}.json`), 'utf8')), request: 'nope' };
    await fs.writeFile(path.join(jdir, `${c.id}.json`), JSON.stringify(wrongShape));
    await fs.writeFile(path.join(jdir, 'stray.json'), '{}');

    const j = journal();
    expect((await j.unfinished()).map((e) => e.id)).toEqual([a.id]);
    const names = (await fs.readdir(jdir)).sort();
    expect(names).toContain(`${b.id}.json.corrupt`);
    expect(names).toContain(`${c.id}.json.corrupt`);
    expect(names).toContain('stray.json.corrupt');
    expect(await entryFiles()).toEqual([`${a.id}.json`]);
    // Sequence numbers of the corrupt files are not reused.
    const d = await j.accept(request(4));
    expect(d.id > c.id).toBe(true);
  });

  it('removes temp-file debris of a write that crashed', async () => {
    await fs.mkdir(jdir, { recursive: true });
    const debris = path.join(jdir, '.0000000000000001-deadbeef.json.tmp-123-abcdef');
    await fs.writeFile(debris, '{"half');
    const j = journal();
    expect(await j.unfinished()).toEqual([]);
    await expect(fs.stat(debris)).rejects.toThrow(/ENOENT/);
  });

  it('treats an entry whose finish was recorded but whose file survived (crash mid-finish) as finished', async () => {
    const old = journal();
    const a = await old.accept(request(1));
    const file = path.join(jdir, `${a.id}.json`);
    const copy = await fs.readFile(file);
    await old.finish(a.id, { ok: true });
    await fs.writeFile(file, copy); // as if the process died before the unlink

    const j = journal();
    expect(await j.unfinished()).toEqual([]);
    expect(await j.has('uid-1')).toBe(true);
    expect(await entryFiles()).toEqual([]);
  });

  it('survives a torn last line in the seen log', async () => {
    const old = journal();
    const a = await old.accept(request(1));
    await old.finish(a.id, { ok: true });
    await fs.appendFile(path.join(jdir, 'seen.log'), '{"at":17,"entry":"00');

    const j = journal();
    expect(await j.has('uid-1')).toBe(true);
    const b = await j.accept(request(2));
    await j.finish(b.id, { ok: true });

    const again = journal();
    expect(await again.has('uid-1')).toBe(true);
    expect(await again.has('uid-2')).toBe(true);
    const lines = (await fs.readFile(path.join(jdir, 'seen.log'), 'utf8')).split('\n').filter(Boolean);
    for (const line of lines) expect(() => JSON.parse(line)).not.toThrow();
  });

  it('keeps only the last maxSeen finished ids, and compacts its log', async () => {
    const j = journal({ maxSeen: 3 });
    for (let i = 1; i <= 10; i++) {
      const e = await j.accept(request(i));
      await j.finish(e.id, { ok: true });
    }
    const known = async (jj: FileJournal) => {
      const out: number[] = [];
      for (let i = 1; i <= 10; i++) if (await jj.has(`uid-${i}`)) out.push(i);
      return out;
    };
    expect(await known(j)).toEqual([8, 9, 10]);
    const lines = (await fs.readFile(path.join(jdir, 'seen.log'), 'utf8')).split('\n').filter(Boolean);
    expect(lines.length).toBeLessThanOrEqual(6);
    expect(await known(journal({ maxSeen: 3 }))).toEqual([8, 9, 10]);
  });

  it('forgets finished ids older than the TTL', async () => {
    let now = Date.parse('2026-01-01T00:00:00Z');
    const clock = () => new Date(now);
    const ttl = 7 * 24 * 3600 * 1000;
    const j = journal({ now: clock, seenTtlMs: ttl });
    const e = await j.accept(request(1));
    await j.finish(e.id, { ok: true });
    now += ttl;
    expect(await j.has('uid-1')).toBe(true);
    now += 1;
    expect(await j.has('uid-1')).toBe(false);
    expect(await journal({ now: clock, seenTtlMs: ttl }).has('uid-1')).toBe(false);
  });

  it('acceptIfNew records a unique id once, even when called concurrently', async () => {
    const j = journal();
    const results = await Promise.all([j.acceptIfNew(request(1)), j.acceptIfNew(request(1)), j.acceptIfNew(request(2))]);
    expect(results.filter((r) => r !== undefined)).toHaveLength(2);
    expect(results[1]).toBeUndefined();
    expect((await j.unfinished()).map((e) => e.request.uniqueId)).toEqual(['uid-1', 'uid-2']);
    await j.finish(results[0]!.id, { ok: true });
    expect(await j.acceptIfNew(request(1))).toBeUndefined();
  });

  it('ignores finish() of an unknown or already finished entry', async () => {
    const j = journal();
    const e = await j.accept(request(1));
    await j.finish(e.id, { ok: true });
    await expect(j.finish(e.id, { ok: true })).resolves.toBeUndefined();
    await expect(j.finish('0000000000000099-00000000', { ok: false })).resolves.toBeUndefined();
  });

  it('records a finish once when finish() is called twice at the same time', async () => {
    const j = journal();
    const e = await j.accept(request(1));
    await Promise.all([j.finish(e.id, { ok: true }), j.finish(e.id, { ok: true })]);
    const lines = (await fs.readFile(path.join(jdir, 'seen.log'), 'utf8')).split('\n').filter(Boolean);
    expect(lines).toHaveLength(1);
    expect(JSON.parse(lines[0]!)).toMatchObject({ entry: e.id, uid: 'uid-1', ok: true });
  });

  it('stays consistent under concurrent accepts and finishes', async () => {
    const j = journal({ maxSeen: 5 });
    const work = Array.from({ length: 30 }, async (_, i) => {
      const e = await j.accept(request(i));
      if (i % 3 !== 0) await j.finish(e.id, { ok: true });
      return e;
    });
    const entries = await Promise.all(work);
    const expected = entries.filter((_, i) => i % 3 === 0).map((e) => e.id);
    expect((await j.unfinished()).map((e) => e.id)).toEqual(expected);
    const again = journal({ maxSeen: 5 });
    expect((await again.unfinished()).map((e) => e.id)).toEqual(expected);
    expect(await entryFiles()).toEqual(expected.map((id) => `${id}.json`));
    // Unfinished ids are known whatever the seen bound.
    for (let i = 0; i < 30; i += 3) expect(await again.has(`uid-${i}`)).toBe(true);
  });
});
