/**
 * Failures of the parts under the agent (issue 5, scope 5), on real TCG guests driven through the
 * agent (`snapshot-driver serve`, a child process) over real RabbitMQ:
 * - the guest's QEMU SIGKILLed while its managed save is being written (512 MiB of random guest RAM,
 *   so the save lasts long enough to be hit half-way);
 * - a failing `qemu-img` (`[hypervisor] qemu_img` points at a wrapper that fails `snapshot -c` or
 *   `convert`, the latter after writing part of its output, and runs the real qemu-img otherwise).
 *
 * After each: the snapshot fails with a reply and an instance.snapshot.error notification saying
 * what happened, the guest is in its prior power state (a guest whose QEMU died is booted again,
 * and the message says so), the image is `killed`, nothing partial is left (store and managed-save
 * files), `qemu-img check` (the real one) is clean, and none of our internal snapshots is left.
 */
import { randomFillSync, randomUUID } from 'node:crypto';
import { existsSync, statSync, watch } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rabbitOptionsSchema, type StrategyName } from '../../src/config/schema.js';
import { InstanceLayout } from '../../src/hypervisor/qemu/layout.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { silentLogger } from '../../src/log.js';
import type { Bus } from '../../src/messaging/bus.js';
import type { OsloFailure } from '../../src/messaging/failure.js';
import { openBus } from '../../src/messaging/transport/open-bus.js';
import { SNAPSHOTS_LEFT_MAX } from '../../src/snapshot/strategies.js';
import { novaInstance, rawHasPattern, startAgentProcess, writeAgentConfig, type AgentProcess } from '../helpers/agent.js';
import { cliJson } from '../helpers/cli.js';
import {
  createGuest,
  guestDiskHasPattern,
  guestFlush,
  guestPid,
  guestWrite,
  makeQemuEnv,
  MiB,
  processAlive,
  QEMU_IMG,
  type QemuEnv,
} from '../helpers/qemu-guest.js';
import { createRabbitVhost, deleteRabbitVhost, ensureRabbit } from '../helpers/rabbitmq.js';
import { faultOf, NotificationTap } from '../helpers/notification-tap.js';
import { TestRpcClient } from '../helpers/rpc-client.js';

const VHOST = `sd-guestfail-${process.pid}`;
const HOST = `guestfail-${process.pid}`;
const NAME_PREFIX = 'snapdrv-';
/** Guest RAM of the guest whose QEMU is killed mid-save: random, so the save writes all of it. */
const BIG_RAM_MB = 512;
/** Kill once this much of the save state is written (well before its end). */
const KILL_AFTER_BYTES = 16 * MiB;
const PATTERN = { value: 0x6d, offset: 8 * MiB, len: MiB };
const RESTARTED = /the guest's QEMU process had died and the guest was started again/;
const INJECTED = /injected by the test wrapper/;

let url: string;
let env: QemuEnv | undefined;
let bus: Bus | undefined;
let client: TestRpcClient | undefined;
let tap: NotificationTap | undefined;
let agent: AgentProcess | undefined;
let conf: string;
let imagesDir: string;
/** The wrapper's switch: 'snapshot-create', 'convert', or nothing (pass everything through). */
let faultFile: string;
let wrapper: string;
/** 512 MiB of random RAM: killed during its managed save. */
let bigGuest: string;
/** 128 MiB of RAM: for the qemu-img failures. */
let smallGuest: string;



async function snapshotCall(uuid: string, imageId: string): Promise<{ result: unknown; failure: OsloFailure | null }> {
  const instance = novaInstance({ uuid, display_name: `guest-${uuid.slice(0, 8)}`, user_id: 'gf-user', project_id: 'gf-project' });
  return client!.callRaw('snapshot_instance', { instance, image_id: imageId }, { timeoutS: 120 });
}

/** A failed snapshot: its reply and its error notification both say `message`. */
async function expectFailed(imageId: string, outcome: { failure: OsloFailure | null }, message: RegExp): Promise<void> {
  expect(outcome.failure).not.toBeNull();
  expect(outcome.failure!.class).toBe('SnapshotFailed');
  expect(outcome.failure!.message).toMatch(message);
  const note = await tap!.waitFor('instance.snapshot.error', imageId);
  expect(note.routingKey).toBe('versioned_notifications.error');
  expect(note.message).toMatchObject({ priority: 'ERROR', publisher_id: `nova-compute:${HOST}` });
  expect(faultOf(note.message)).toMatchObject({ exception: 'SnapshotFailed' });
  expect(String(faultOf(note.message).exception_message)).toMatch(message);
  expect(tap!.find('instance.snapshot.start', imageId)).toHaveLength(1);
  expect(tap!.find('instance.snapshot.end', imageId)).toEqual([]);
}

async function entries(dir: string): Promise<string[]> {
  return fs.readdir(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [];
    throw err;
  });
}

/**
 * The invariants after a failed snapshot: the guest in its prior power state, the image killed (valid
 * metadata, no data), nothing partial in the store or the instance's folder, the disk clean (real
 * qemu-img, after a flush of the guest's QEMU), none of our internal snapshots, every active image complete.
 */
async function expectSafeAfterFailure(uuid: string, imageId: string, prior: 'running' | 'paused', strategy: StrategyName): Promise<void> {
  expect((await env!.hv.info(uuid)).state).toBe(prior);
  const meta = JSON.parse(await fs.readFile(path.join(imagesDir, `${imageId}.json`), 'utf8')) as Record<string, unknown>;
  expect(meta).toMatchObject({ id: imageId, status: 'killed', size: null, checksum: null, properties: { instance_uuid: uuid } });
  await expect(fs.access(path.join(imagesDir, imageId))).rejects.toThrow(/ENOENT/);
  expect(await entries(path.join(imagesDir, '.partial'))).toEqual([]);
  expect((await entries(imagesDir)).filter((n) => n.startsWith('.') && n !== '.partial' && n !== '.locks')).toEqual([]);
  expect(await entries(path.join(imagesDir, '.locks'))).toEqual([]);
  const layout = new InstanceLayout(env!.instancesPath, uuid);
  for (const f of [layout.saveState, layout.saveStatePartial, layout.saveMeta, layout.saveSocket]) {
    await expect(fs.access(f), f).rejects.toThrow(/ENOENT/);
  }
  await guestFlush(env!.hv, uuid);
  expect(await env!.qemuImg.check(layout.disk, { forceShare: true })).toMatchObject({ clean: true, corruptions: 0, leaks: 0, checkErrors: 0 });
  const ours = (await env!.qemuImg.snapshotList(layout.disk)).filter((s) => s.name.startsWith(NAME_PREFIX));
  expect(ours.map((s) => s.name)).not.toContain(`${NAME_PREFIX}${imageId}`);
  expect(ours.length).toBeLessThanOrEqual(SNAPSHOTS_LEFT_MAX[strategy]);
  const store = new ImageStore({ path: imagesDir, reservedSpaceMb: 0, osHashAlgo: 'sha512' });
  for (const img of await store.list()) {
    if (img.status === 'active') expect(await store.verify(img.id)).toMatchObject({ ok: true });
  }
  expect(agent!.exitStatus).toBeUndefined();
}

async function setFault(mode: 'snapshot-create' | 'convert' | undefined): Promise<void> {
  if (mode === undefined) await fs.rm(faultFile, { force: true });
  else await fs.writeFile(faultFile, `${mode}\n`);
}

async function startAgent(strategy: StrategyName): Promise<void> {
  await agent?.stop(20_000);
  conf = await writeAgentConfig(env!.tmpPath, { host: HOST, transportUrl: url, strategy });
  // The agent's qemu-img is the wrapper (the tests' own checks use the real one).
  const text = await fs.readFile(conf, 'utf8');
  expect(text).toContain('[hypervisor]\n');
  await fs.writeFile(conf, text.replace('[hypervisor]\n', `[hypervisor]\nqemu_img = ${wrapper}\n`));
  agent = await startAgentProcess(conf, { env: { SNAPSHOT_DRIVER_LOG_LEVEL: 'debug' } });
  tap ??= await NotificationTap.open(VHOST, `guestfail-tap-${process.pid}`);
  client ??= await new TestRpcClient(bus!, { server: HOST }).open();
}

async function setPowerState(uuid: string, state: 'running' | 'paused'): Promise<void> {
  const now = (await env!.hv.info(uuid)).state;
  if (now === state) return;
  if (state === 'paused') await env!.hv.pause(uuid);
  else await env!.hv.unpause(uuid);
}

/**
 * Sends a snapshot of `uuid` and SIGKILLs the guest's QEMU once its managed save has written
 * KILL_AFTER_BYTES of state (and is far from done). Resolves with the outcome and the killed pid.
 * Woken by the save's own writes (inotify on the instance's folder), not by a clock; the look and
 * the kill are one synchronous step.
 */
async function snapshotKillingQemuMidSave(uuid: string, imageId: string): Promise<{ outcome: { failure: OsloFailure | null }; killedPid: number }> {
  const layout = new InstanceLayout(env!.instancesPath, uuid);
  const pid = await guestPid(env!.instancesPath, uuid);
  expect(pid).toBeDefined();
  expect(await processAlive(pid!)).toBe(true);
  const partialName = path.basename(layout.saveStatePartial);
  const stateName = path.basename(layout.saveState);
  const sizeOf = (file: string): number => {
    try {
      return statSync(file).size;
    } catch {
      return 0;
    }
  };
  let written = 0;
  let missed: string | undefined;
  let looked = false;
  const watcher = watch(layout.dir, (_event, name) => {
    if (looked || (name !== partialName && name !== stateName)) return;
    // The save must not have finished (or failed) before it got this far.
    if (existsSync(layout.saveState)) {
      missed = 'the save finished before the kill';
    } else {
      written = sizeOf(layout.saveStatePartial);
      if (written < KILL_AFTER_BYTES) return;
      try {
        process.kill(pid!, 'SIGKILL');
      } catch (err) {
        missed = `the guest's QEMU was gone before the kill: ${(err as Error).message}`;
      }
    }
    looked = true;
  });
  let outcome: { failure: OsloFailure | null };
  try {
    outcome = await snapshotCall(uuid, imageId);
  } finally {
    watcher.close();
  }
  expect(missed).toBeUndefined();
  expect(looked).toBe(true); // else the call ended with the save short of KILL_AFTER_BYTES: never killed
  expect(written).toBeGreaterThanOrEqual(KILL_AFTER_BYTES);
  expect(written).toBeLessThan(BIG_RAM_MB * MiB);
  return { outcome, killedPid: pid! };
}

beforeAll(async () => {
  await ensureRabbit();
  url = await createRabbitVhost(VHOST);
  env = await makeQemuEnv({ accel: 'tcg' });
  imagesDir = path.join(env.tmpPath, 'images');
  faultFile = path.join(env.tmpPath, 'qemu-img-fault');
  wrapper = path.join(env.tmpPath, 'qemu-img-wrapper');
  await fs.writeFile(
    wrapper,
    [
      '#!/bin/sh',
      '# Test double of qemu-img: fails the operation named in the fault file, runs the real one otherwise.',
      `mode=$(cat '${faultFile}' 2>/dev/null)`,
      'if [ "$mode" = snapshot-create ] && [ "$1" = snapshot ]; then',
      '  for a in "$@"; do',
      '    if [ "$a" = -c ]; then',
      '      echo "qemu-img: Could not create snapshot: Input/output error (injected by the test wrapper)" >&2',
      '      exit 1',
      '    fi',
      '  done',
      'fi',
      'if [ "$mode" = convert ] && [ "$1" = convert ]; then',
      '  for a in "$@"; do dest=$a; done',
      '  # What a convert that dies part-way leaves: some of the output written (into the image',
      "  # store's NBD receiver, or into a file).",
      '  case "$dest" in',
      "    nbd*) qemu-io -f raw -c 'write -P 0x5a 0 1M' \"$dest\" >/dev/null || exit 3 ;;",
      '    *) head -c 1048576 /dev/urandom > "$dest" ;;',
      '  esac',
      '  echo "qemu-img: error while writing at byte 1048576: Input/output error (injected by the test wrapper)" >&2',
      '  exit 1',
      'fi',
      `exec '${QEMU_IMG}' "$@"`,
      '',
    ].join('\n'),
    { mode: 0o755 },
  );

  // Random RAM: the managed save writes all of it (nothing compresses or is skipped as zero).
  const ramFile = path.join(env.tmpPath, 'ram.bin');
  const fh = await fs.open(ramFile, 'w', 0o600);
  try {
    const chunk = Buffer.allocUnsafe(16 * MiB);
    for (let off = 0; off < BIG_RAM_MB * MiB; off += chunk.length) await fh.write(randomFillSync(chunk), 0, chunk.length, off);
  } finally {
    await fh.close();
  }
  bigGuest = randomUUID();
  await env.hv.createInstance({ uuid: bigGuest, name: 'big-ram', memoryMb: BIG_RAM_MB, vcpus: 1, machine: 'pc', diskSizeBytes: 64 * MiB, memoryFile: ramFile });
  await env.hv.start(bigGuest);
  smallGuest = await createGuest(env.hv, { name: 'small-ram' });
  for (const uuid of [bigGuest, smallGuest]) await guestWrite(env.hv, uuid, PATTERN.value, PATTERN.offset, PATTERN.len);
  bus = await openBus(url, rabbitOptionsSchema.parse({}), silentLogger());
});

afterAll(async () => {
  try {
    await tap?.close();
    await client?.close().catch(() => undefined);
    await bus?.close().catch(() => undefined);
    await agent?.kill();
    await env?.cleanup();
  } finally {
    await deleteRabbitVhost(VHOST);
  }
});

const CASES: { strategy: StrategyName; qemuImgFaults: ('snapshot-create' | 'convert')[] }[] = [
  { strategy: 'cold', qemuImgFaults: ['convert'] },
  { strategy: 'suspend-create-resume-extract', qemuImgFaults: ['snapshot-create', 'convert'] },
];

describe.each(CASES)('failures under the agent: strategy $strategy (real QEMU, real RabbitMQ)', ({ strategy, qemuImgFaults }) => {
  beforeAll(async () => {
    await setFault(undefined);
    await startAgent(strategy);
  });

  for (const prior of ['running', 'paused'] as const) {
    it(`the guest's QEMU SIGKILLed during the managed save of a ${prior} guest: started again, ${prior}, image killed, nothing partial`, async () => {
      await setPowerState(bigGuest, prior);
      const image = randomUUID();
      const { outcome, killedPid } = await snapshotKillingQemuMidSave(bigGuest, image);

      await expectFailed(image, outcome, RESTARTED);
      expect(outcome.failure!.message).toMatch(/^step 2 \(suspend\) failed/);
      // The save failed (its QEMU died under it), and the guest was booted again in a new process.
      expect(agent!.find(/^step suspend failed/, { image_id: image })).toHaveLength(1);
      expect(agent!.find("the guest's QEMU process died during the snapshot: starting it again (its memory state is lost)", { image_id: image })).toHaveLength(1);
      expect(await processAlive(killedPid)).toBe(false);
      const newPid = await guestPid(env!.instancesPath, bigGuest);
      expect(newPid).toBeDefined();
      expect(newPid).not.toBe(killedPid);
      await expectSafeAfterFailure(bigGuest, image, prior, strategy);
      // Its disk lost nothing.
      expect(await guestDiskHasPattern(env!.hv, bigGuest, PATTERN.value, PATTERN.offset, PATTERN.len)).toBe(true);
    });
  }

  for (const fault of qemuImgFaults) {
    for (const prior of ['running', 'paused'] as const) {
      it(`qemu-img ${fault === 'convert' ? 'convert' : 'snapshot -c'} fails on a ${prior} guest: a clean failure naming qemu-img's error, guest ${prior}`, async () => {
        await setPowerState(smallGuest, prior);
        const pidBefore = await guestPid(env!.instancesPath, smallGuest);
        const image = randomUUID();
        await setFault(fault);
        let outcome;
        try {
          outcome = await snapshotCall(smallGuest, image);
        } finally {
          await setFault(undefined);
        }
        const step = fault === 'convert' ? (strategy === 'cold' ? 'export-disk' : 'export-snapshot') : 'create-snapshot';
        await expectFailed(image, outcome, new RegExp(`\\(${step}\\) failed: qemu-img ${fault === 'convert' ? 'convert' : 'snapshot'} failed: .*${INJECTED.source}`));
        expect(outcome.failure!.message).not.toMatch(RESTARTED);
        expect(agent!.find(new RegExp(`^step ${step} failed`), { image_id: image })).toHaveLength(1);
        // The guest went through a managed save and came back (a new process), never a fresh boot.
        expect(agent!.find('guest started again after its QEMU process died', { image_id: image })).toEqual([]);
        expect(await guestPid(env!.instancesPath, smallGuest)).not.toBe(pidBefore);
        await expectSafeAfterFailure(smallGuest, image, prior, strategy);
        expect(await guestDiskHasPattern(env!.hv, smallGuest, PATTERN.value, PATTERN.offset, PATTERN.len)).toBe(true);
      });
    }
  }

  it('keeps serving: with qemu-img and QEMU well again, the next snapshot succeeds and verifies', async () => {
    await setPowerState(smallGuest, 'running');
    const image = randomUUID();
    const { result, failure } = await snapshotCall(smallGuest, image);
    expect(failure).toBeNull();
    expect(result).toMatchObject({ image_id: image, status: 'active', strategy, internal_snapshots: 0 });
    await tap!.waitFor('instance.snapshot.end', image);
    expect(await cliJson(conf, ['images', 'verify', image])).toMatchObject({ ok: true });
    expect(await rawHasPattern(path.join(imagesDir, image), PATTERN.value, PATTERN.offset, PATTERN.len)).toBe(true);
    expect((await env!.hv.info(smallGuest)).state).toBe('running');
  });
});

describe('after every case', () => {
  it('the stopped guests have clean disks with none of our internal snapshots', async () => {
    await agent!.stop(20_000);
    for (const uuid of [bigGuest, smallGuest]) {
      await env!.hv.stop(uuid, { graceful: false });
      const disk = path.join(env!.instancesPath, uuid, 'disk');
      expect(await env!.qemuImg.check(disk)).toMatchObject({ clean: true, corruptions: 0, leaks: 0 });
      expect((await env!.qemuImg.snapshotList(disk)).filter((s) => s.name.startsWith(NAME_PREFIX))).toEqual([]);
    }
  });
});
