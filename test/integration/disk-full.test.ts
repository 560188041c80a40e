/**
 * Disk full in the image store (issue 5, scope 4), for real: the store lives on a small tmpfs of its
 * own, the agent (`snapshot-driver serve`, a child process) snapshots a real TCG guest on request
 * over real RabbitMQ, and the notifications are read from the broker.
 *
 * The guest's disk is a compressed qcow2 (as imported cloud images often are): its on-host size is
 * far below the raw data the export writes, so the store's free-space check passes and the export
 * then really runs out of space (ENOSPC) half-way. With less free space than even that on-host size
 * the check refuses before anything is written.
 *
 * After every failure: an instance.snapshot.error notification naming the lack of space, the guest
 * in its prior power state, `qemu-img check` clean, none of our internal snapshots left, nothing in
 * `.partial/`, the image `killed` with valid metadata (or, refused up front, no trace at all), no
 * active image incomplete, and the agent still serving: once space is freed the next snapshot
 * succeeds and verifies.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rabbitOptionsSchema, type StrategyName } from '../../src/config/schema.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { silentLogger } from '../../src/log.js';
import type { Bus } from '../../src/messaging/bus.js';
import type { OsloFailure } from '../../src/messaging/failure.js';
import { openBus } from '../../src/messaging/transport/open-bus.js';
import { SNAPSHOTS_LEFT_MAX } from '../../src/snapshot/strategies.js';
import { runProgram } from '../../src/util/exec.js';
import { novaInstance, rawHasPattern, startAgentProcess, writeAgentConfig, type AgentProcess } from '../helpers/agent.js';
import { cliJson, runCli } from '../helpers/cli.js';
import { createGuest, guestFlush, guestPid, killQemuUnder, makeQemuEnv, MiB, QEMU_IMG, QEMU_IO, type QemuEnv } from '../helpers/qemu-guest.js';
import { createRabbitVhost, deleteRabbitVhost, ensureRabbit } from '../helpers/rabbitmq.js';
import { faultOf, NotificationTap } from '../helpers/notification-tap.js';
import { TestRpcClient } from '../helpers/rpc-client.js';
import { fillUntilFree, mountSmallFs, type SmallFs } from '../helpers/small-fs.js';

const VHOST = `sd-diskfull-${process.pid}`;
const HOST = `diskfull-${process.pid}`;
const NAME_PREFIX = 'snapdrv-';
const GUEST_NAME = 'diskfull-guest';
/** The store's filesystem. */
const FS_MB = 48;
/** Non-zero (and very compressible) guest data: what the raw export must write. */
const DATA = { pattern: 0x5a, offset: 0, len: 24 * MiB };
const MARK = { pattern: 0xa7, offset: 40 * MiB, len: MiB };
/** Free space left for the mid-export case: far more than the compressed disk, far less than its data. */
const MID_EXPORT_FREE = 12 * MiB;
const STRATEGIES: StrategyName[] = ['cold', 'suspend-create-resume-extract', 'live'];
/** The step of each strategy that writes the image data into the store. */
const WRITING_STEP: Partial<Record<StrategyName, string>> = {
  cold: 'export-disk',
  'suspend-create-resume-extract': 'export-snapshot',
  live: 'wait-backup',
};
/** The RPC reply's and the notification's words for running out of space. */
const NO_SPACE = /No space left on device|ENOSPC/;

let url: string;
let env: QemuEnv | undefined;
let small: SmallFs | undefined;
let storeDir: string;
let filler: string;
let uuid: string;
let bus: Bus | undefined;
let client: TestRpcClient | undefined;
let tap: NotificationTap | undefined;
let agent: AgentProcess | undefined;
let conf: string;


function instanceArg(): Record<string, unknown> {
  return novaInstance({ uuid, display_name: GUEST_NAME, user_id: 'df-user', project_id: 'df-project' });
}

async function snapshotCall(imageId: string): Promise<{ result: unknown; failure: OsloFailure | null }> {
  return client!.callRaw('snapshot_instance', { instance: instanceArg(), image_id: imageId }, { timeoutS: 120 });
}

async function run(file: string, args: string[]): Promise<void> {
  const res = await runProgram(file, args);
  if (res.code !== 0) throw new Error(`${file} ${args.join(' ')} exited ${res.code}: ${res.stderr}${res.stdout}`);
}

/** Replaces the filler so that exactly `leaveBytes` (in whole blocks) stay free on the small fs. */
async function leaveFree(leaveBytes: number): Promise<void> {
  await fs.rm(filler, { force: true });
  await fillUntilFree(filler, small!.path, leaveBytes);
  expect(await small!.freeBytes()).toBeLessThanOrEqual(leaveBytes);
}

async function storeEntries(dir: string): Promise<string[]> {
  return fs.readdir(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [];
    throw err;
  });
}

/**
 * The invariants after any failed snapshot: guest in its prior power state, disk clean, none of our
 * internal snapshots, nothing partial, every active image complete, no temp files in the store.
 */
async function expectSafeAfterFailure(imageId: string, prior: 'running' | 'paused', strategy: StrategyName): Promise<void> {
  expect((await env!.hv.info(uuid)).state).toBe(prior);
  // Flushed first, so that the check -U (the guest holds the disk) sees QEMU's metadata as it is.
  await guestFlush(env!.hv, uuid);
  const disk = path.join(env!.instancesPath, uuid, 'disk');
  expect(await env!.qemuImg.check(disk, { forceShare: true })).toMatchObject({ clean: true, corruptions: 0, leaks: 0, checkErrors: 0 });
  const ours = (await env!.qemuImg.snapshotList(disk)).filter((s) => s.name.startsWith(NAME_PREFIX));
  expect(ours.map((s) => s.name)).not.toContain(`${NAME_PREFIX}${imageId}`);
  expect(ours.length).toBeLessThanOrEqual(SNAPSHOTS_LEFT_MAX[strategy]);
  expect(await storeEntries(path.join(storeDir, '.partial'))).toEqual([]);
  // No temp file of an interrupted metadata write (".<id>.json.tmp-…") either.
  expect((await storeEntries(storeDir)).filter((n) => n.startsWith('.') && n !== '.partial' && n !== '.locks')).toEqual([]);
  // No image lock left held or named (each is removed by its holder on release).
  expect(await storeEntries(path.join(storeDir, '.locks'))).toEqual([]);
  const store = new ImageStore({ path: storeDir, reservedSpaceMb: 0, osHashAlgo: 'sha512' });
  for (const img of await store.list()) {
    if (img.status === 'active') expect(await store.verify(img.id)).toMatchObject({ ok: true });
    else expect(await fs.stat(store.dataPath(img.id)).catch(() => undefined)).toBeUndefined();
  }
  expect(agent!.exitStatus).toBeUndefined();
}

async function readMetadata(imageId: string): Promise<Record<string, unknown>> {
  const text = await fs.readFile(path.join(storeDir, `${imageId}.json`), 'utf8');
  return JSON.parse(text) as Record<string, unknown>; // throws (fails the test) unless valid JSON
}

beforeAll(async () => {
  await ensureRabbit();
  url = await createRabbitVhost(VHOST);
  env = await makeQemuEnv({ accel: 'tcg' });
  small = await mountSmallFs(path.join(env.tmpPath, 'small'), FS_MB);
  storeDir = path.join(small.path, 'images');
  filler = path.join(small.path, 'filler');

  // The guest's disk: compressed qcow2 holding 25 MiB of data (a few hundred KiB on the host).
  uuid = await createGuest(env.hv, { name: GUEST_NAME, start: false, diskSizeBytes: 64 * MiB });
  const source = path.join(env.tmpPath, 'source.qcow2');
  await run(QEMU_IMG, ['create', '-q', '-f', 'qcow2', source, String(64 * MiB)]);
  for (const w of [DATA, MARK]) await run(QEMU_IO, ['-f', 'qcow2', '-c', `write -P 0x${w.pattern.toString(16)} ${w.offset} ${w.len}`, source]);
  const disk = path.join(env.instancesPath, uuid, 'disk');
  await run(QEMU_IMG, ['convert', '-c', '-f', 'qcow2', '-O', 'qcow2', source, disk]);
  await fs.rm(source);
  await env.hv.start(uuid);
  const { actualSize } = await env.hv.diskInfo(uuid);
  // The premise of the mid-export case: the check passes, the data does not fit.
  expect(actualSize).toBeLessThan(MID_EXPORT_FREE / 4);
  expect(DATA.len + MARK.len).toBeGreaterThan(MID_EXPORT_FREE * 2);

  bus = await openBus(url, rabbitOptionsSchema.parse({}), silentLogger());
});

afterAll(async () => {
  try {
    await tap?.close();
    await client?.close().catch(() => undefined);
    await bus?.close().catch(() => undefined);
    await agent?.kill();
    // QEMU first (a backup job may hold a file on the small fs), then the mount, then the temp dir under it.
    if (env) await killQemuUnder(env.tmpPath);
    await small?.cleanup();
    await env?.cleanup();
  } finally {
    await deleteRabbitVhost(VHOST);
  }
});

describe.each(STRATEGIES)('image store runs out of space: strategy %s (real QEMU, real RabbitMQ, small tmpfs)', (strategy) => {
  beforeAll(async () => {
    conf = await writeAgentConfig(env!.tmpPath, { host: HOST, transportUrl: url, strategy, imageStorePath: storeDir });
    agent = await startAgentProcess(conf);
    tap ??= await NotificationTap.open(VHOST, `diskfull-tap-${process.pid}`);
    client ??= await new TestRpcClient(bus!, { server: HOST }).open();
  });

  afterAll(async () => {
    await fs.rm(filler, { force: true });
    const exit = await agent?.stop(20_000);
    expect(exit).toEqual({ code: 0, signal: null });
  });

  it('a store with less free space than the disk is refused before anything is written; the guest is untouched', async () => {
    const image = randomUUID();
    const { actualSize } = await env!.hv.diskInfo(uuid);
    await leaveFree(Math.floor(actualSize / 2));
    const pidBefore = await guestPid(env!.instancesPath, uuid);

    const { failure } = await snapshotCall(image);
    expect(failure).toMatchObject({ class: 'InsufficientSpace' });
    expect(failure!.message).toMatch(/not enough free space in image store/);

    const note = await tap!.waitFor('instance.snapshot.error', image);
    expect(note.routingKey).toBe('versioned_notifications.error');
    expect(note.message).toMatchObject({ priority: 'ERROR', publisher_id: `nova-compute:${HOST}` });
    const fault = faultOf(note.message);
    expect(fault).toMatchObject({ exception: 'InsufficientSpace' });
    expect(String(fault.exception_message)).toMatch(/not enough free space/);
    expect(tap!.find('instance.snapshot.end', image)).toEqual([]);

    // Untouched: the same QEMU process, still running; and no trace of the image in the store.
    expect(await guestPid(env!.instancesPath, uuid)).toBe(pidBefore);
    await expectSafeAfterFailure(image, 'running', strategy);
    for (const p of [path.join(storeDir, image), path.join(storeDir, `${image}.json`), path.join(storeDir, '.partial', image)]) {
      await expect(fs.access(p)).rejects.toThrow(/ENOENT/);
    }
    expect(agent!.find('snapshot start', { image_id: image })).toEqual([]);
  });

  for (const prior of ['running', 'paused'] as const) {
    it(`ENOSPC half-way through the export of a ${prior} guest fails cleanly: image killed, nothing partial, guest ${prior}`, async () => {
      if (prior === 'paused') await env!.hv.pause(uuid);
      const image = randomUUID();
      await leaveFree(MID_EXPORT_FREE);

      const { failure } = await snapshotCall(image);
      expect(failure).not.toBeNull();
      expect(failure!.class).toBe('SnapshotFailed');
      expect(failure!.message).toMatch(NO_SPACE);

      const note = await tap!.waitFor('instance.snapshot.error', image);
      expect(note.routingKey).toBe('versioned_notifications.error');
      const fault = faultOf(note.message);
      expect(String(fault.exception_message)).toMatch(NO_SPACE);
      expect(tap!.find('instance.snapshot.start', image)).toHaveLength(1);
      expect(tap!.find('instance.snapshot.end', image)).toEqual([]);
      // It ran out of space in the step that writes the data (past the free-space check).
      expect(failure!.message).toMatch(new RegExp(`^step \\d \\(${WRITING_STEP[strategy]}\\) failed: `));
      expect(agent!.find(new RegExp(`^step ${WRITING_STEP[strategy]} failed: .*(${NO_SPACE.source})`), { image_id: image })).toHaveLength(1);
      expect(agent!.find('snapshot start', { image_id: image })).toHaveLength(1);
      expect(agent!.find('snapshot failed', { image_id: image })).toHaveLength(1);

      const meta = await readMetadata(image);
      expect(meta).toMatchObject({ id: image, status: 'killed', size: null, checksum: null, properties: { instance_uuid: uuid } });
      expect(String((meta.properties as Record<string, unknown>).kill_reason)).toMatch(NO_SPACE);
      await expect(fs.access(path.join(storeDir, image))).rejects.toThrow(/ENOENT/);
      await expectSafeAfterFailure(image, prior, strategy);
      if (prior === 'paused') await env!.hv.unpause(uuid);
    });
  }

  if (strategy === 'cold') {
    it('data that fits exactly, with no room left for its metadata: the commit fails, the data goes, the image is killed', async () => {
      const image = randomUUID();
      const page = (await fs.statfs(small!.path)).bsize;
      // Room for the data and the queued record only: the metadata updates before the export borrow
      // a block for a moment (temp file, then rename), the final `active` record finds none.
      await leaveFree(DATA.len + MARK.len + page);

      const { failure } = await snapshotCall(image);
      expect(failure).toMatchObject({ class: 'SnapshotFailed' });
      expect(failure!.message).toMatch(NO_SPACE);
      const note = await tap!.waitFor('instance.snapshot.error', image);
      const fault = faultOf(note.message);
      expect(String(fault.exception_message)).toMatch(NO_SPACE);
      // The export itself completed: it was the commit that ran out of space.
      expect(agent!.find(/^step .* failed/, { image_id: image })).toEqual([]);
      expect(await readMetadata(image)).toMatchObject({ id: image, status: 'killed', size: null, checksum: null });
      await expect(fs.access(path.join(storeDir, image))).rejects.toThrow(/ENOENT/);
      await expectSafeAfterFailure(image, 'running', strategy);
    });
  }

  it('keeps serving: once space is freed, the next snapshot succeeds and verifies', async () => {
    await fs.rm(filler, { force: true });
    const image = randomUUID();
    const { result, failure } = await snapshotCall(image);
    expect(failure).toBeNull();
    expect(result).toMatchObject({ image_id: image, status: 'active', strategy, size: 64 * MiB, internal_snapshots: 0 });
    await tap!.waitFor('instance.snapshot.end', image);
    expect(await cliJson(conf, ['images', 'verify', image])).toMatchObject({ ok: true });
    const data = path.join(storeDir, image);
    expect(await rawHasPattern(data, DATA.pattern, DATA.offset, DATA.len)).toBe(true);
    expect(await rawHasPattern(data, MARK.pattern, MARK.offset, MARK.len)).toBe(true);
    expect(await rawHasPattern(data, 0, 30 * MiB, MiB)).toBe(true);
    expect((await env!.hv.info(uuid)).state).toBe('running');
    expect(await storeEntries(path.join(storeDir, '.partial'))).toEqual([]);
    // The store full to the last block: deleting an image is how an operator makes room, and works.
    await leaveFree(0);
    expect(await small!.freeBytes()).toBe(0);
    const deleted = await runCli(['--config-file', conf, 'images', 'delete', image]);
    expect(deleted).toMatchObject({ code: 0 });
    for (const p of [data, `${data}.json`]) await expect(fs.access(p)).rejects.toThrow(/ENOENT/);
    expect(await small!.freeBytes()).toBeGreaterThanOrEqual(DATA.len + MARK.len);
    // Only the killed images' metadata records are left besides .partial.
    expect((await storeEntries(storeDir)).filter((n) => n !== '.partial' && n !== '.locks' && !n.endsWith('.json'))).toEqual([]);
    await fs.rm(filler);
  });
});

describe('the image store itself on a filesystem full to the last block', () => {
  it('refuses to create or kill loudly (ENOSPC) without a torn or temp file, and kills once there is room', async () => {
    const store = new ImageStore({ path: path.join(small!.path, 'direct'), reservedSpaceMb: 0, osHashAlgo: 'sha512' });
    const id = randomUUID();
    await store.create({ id, name: 'direct', instanceUuid: uuid, imageType: 'snapshot' });
    await store.markSaving(id);
    const before = await fs.readFile(store.metadataPath(id), 'utf8');
    await leaveFree(0);
    expect(await small!.freeBytes()).toBe(0);

    const other = randomUUID();
    await expect(store.create({ id: other, name: 'other', instanceUuid: uuid, imageType: 'snapshot' })).rejects.toMatchObject({ code: 'ENOSPC' });
    await expect(store.show(other)).rejects.toMatchObject({ name: 'ImageNotFound' });
    // Nothing to free of its own (no partial data): the killed record cannot be written, and says so.
    await expect(store.kill(id, 'test')).rejects.toMatchObject({ code: 'ENOSPC' });
    // The record is the old one, whole (atomic replace): valid, never active.
    expect(await fs.readFile(store.metadataPath(id), 'utf8')).toBe(before);
    expect(await store.show(id)).toMatchObject({ id, status: 'saving' });
    expect((await fs.readdir(store.path)).sort()).toEqual(['.locks', '.partial', `${id}.json`]);

    await fs.rm(filler);
    await store.kill(id, 'test');
    expect(await store.show(id)).toMatchObject({ id, status: 'killed', properties: { kill_reason: 'test' } });
    await store.delete(id);
    expect((await fs.readdir(store.path)).sort()).toEqual(['.locks', '.partial']);
    expect(await fs.readdir(path.join(store.path, '.locks'))).toEqual([]);
  });
});

describe('after every case', () => {
  it('the stopped guest has a clean disk with none of our internal snapshots', async () => {
    await env!.hv.stop(uuid, { graceful: false });
    const disk = path.join(env!.instancesPath, uuid, 'disk');
    expect(await env!.qemuImg.check(disk)).toMatchObject({ clean: true, corruptions: 0, leaks: 0 });
    expect((await env!.qemuImg.snapshotList(disk)).filter((s) => s.name.startsWith(NAME_PREFIX))).toEqual([]);
  });
});
