import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { sweepStore, type RecoveryDeps } from '../../src/snapshot/recovery.js';
import { fakeRecoveryDeps, makeFakeEnv, PREFIX, type FakeEnv } from '../helpers/fake-env.js';

const envs: FakeEnv[] = [];
afterEach(async () => {
  for (const e of envs.splice(0)) await e.cleanup();
});

// The sweep looks for receivers' socket folders in the temp folder of the host: this file's own,
// so that what other test files' killed agents leave there is not seen here.
const savedTmpdir = process.env.TMPDIR;
let privateTmp: string;
beforeAll(async () => {
  privateTmp = await fs.mkdtemp(path.join(os.tmpdir(), 'sweep-test-'));
  process.env.TMPDIR = privateTmp;
});
afterAll(async () => {
  if (savedTmpdir === undefined) delete process.env.TMPDIR;
  else process.env.TMPDIR = savedTmpdir;
  await fs.rm(privateTmp, { recursive: true, force: true });
});

function deps(e: FakeEnv): RecoveryDeps {
  return fakeRecoveryDeps(e, { strategy: 'suspend-create-resume-extract', agentTimeoutMs: 100 });
}

async function newImage(e: FakeEnv, id: string, status: 'queued' | 'saving'): Promise<void> {
  await e.store.create({ id, name: 'x', instanceUuid: randomUUID(), imageType: 'snapshot' });
  if (status === 'saving') await e.store.markSaving(id);
}

/** A pid that is gone: a child that has exited. */
async function deadPid(): Promise<number> {
  const child = spawn('true', [], { stdio: 'ignore' });
  await new Promise((r) => child.once('exit', r));
  return child.pid!;
}

describe('start-up sweep of the image store', () => {
  it('kills unfinished images and removes partial data that no operation explains; keeps what a recorded operation owns', async () => {
    const e = await makeFakeEnv();
    envs.push(e);
    const [orphanQueued, orphanSaving, owned, done] = [randomUUID(), randomUUID(), randomUUID(), randomUUID()];
    await newImage(e, orphanQueued, 'queued');
    await newImage(e, orphanSaving, 'saving');
    await fs.writeFile(e.store.partialPath(orphanSaving), 'half an image');
    // An operation under way (its record exists): its image and partial data are its own.
    await e.operations.begin({ image_id: owned, instance_uuid: randomUUID(), request_id: 'r', strategy: 'cold', snapshot_name: `${PREFIX}${owned}`, prior_state: 'running', steps: ['suspend'] });
    await newImage(e, owned, 'saving');
    await fs.writeFile(e.store.partialPath(owned), 'being written');
    // Partial data of an image that is gone, and a file that is not an image at all.
    await fs.writeFile(e.store.partialPath(done), 'debris');
    await fs.writeFile(path.join(e.store.paths.partialDir, 'not-an-id'), 'debris');
    // Temp files of metadata writes: of a process that is gone, and of this (running) one.
    const deadTemp = path.join(e.store.path, `.${done}.json.tmp-${await deadPid()}-abcdef012345`);
    const liveTemp = path.join(e.store.path, `.${owned}.json.tmp-${process.pid}-abcdef012345`);
    await fs.writeFile(deadTemp, '{');
    await fs.writeFile(liveTemp, '{');
    // Exports' NBD socket folders in the temp dir: of an agent that is gone, and of this one.
    const deadSocketDir = await fs.mkdtemp(path.join(os.tmpdir(), `snapshot-driver-nbd-${await deadPid()}-`));
    const liveSocketDir = await fs.mkdtemp(path.join(os.tmpdir(), `snapshot-driver-nbd-${process.pid}-`));
    await fs.writeFile(path.join(deadSocketDir, 'image.sock'), '');

    const swept = await sweepStore(deps(e));
    expect(swept.imagesKilled.sort()).toEqual([orphanQueued, orphanSaving].sort());
    // (the killed image's partial data goes with the kill)
    expect(swept.partialsRemoved.sort()).toEqual([done, 'not-an-id'].sort());
    expect(swept.tempsRemoved).toEqual([path.basename(deadTemp)]);
    expect(swept.socketDirsRemoved).toEqual([deadSocketDir]);
    await expect(fs.access(deadSocketDir)).rejects.toThrow(/ENOENT/);
    await expect(fs.access(liveSocketDir)).resolves.toBeUndefined();
    await fs.rm(liveSocketDir, { recursive: true });
    expect((await e.store.show(orphanQueued)).status).toBe('killed');
    expect((await e.store.show(orphanSaving)).properties.kill_reason).toMatch(/no operation in the journal/);
    expect((await e.store.show(owned)).status).toBe('saving');
    expect(await fs.readdir(e.store.paths.partialDir)).toEqual([owned]);
    await expect(fs.access(liveTemp)).resolves.toBeUndefined();

    // A second sweep finds nothing more.
    expect(await sweepStore(deps(e))).toEqual({ partialsRemoved: [], tempsRemoved: [], socketDirsRemoved: [], imagesKilled: [] });
  });
});
