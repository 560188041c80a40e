import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { connect } from 'amqplib';
import { expect } from 'vitest';
import type { StrategyName } from '../../src/config/schema.js';
import { STRATEGY_STEPS, SNAPSHOTS_LEFT_MAX } from '../../src/snapshot/strategies.js';
import { novaInstance, spawnAgent, startAgentProcess, writeAgentConfig, type AgentProcess } from './agent.js';
import { buildRuntime, type Runtime } from '../../src/service/runtime.js';
import { loadConfig } from '../../src/config/load.js';
import { silentLogger } from '../../src/log.js';
import { DISK_QOM_PATH } from '../../src/hypervisor/qemu/launch.js';
import { QemuImg } from '../../src/qemu-img/qemu-img.js';
import { makeLibvirtBench, virsh } from './libvirt.js';
import { createGuest, guestWrite, makeQemuEnv, MiB, QEMU_IMG, type QemuEnv } from './qemu-guest.js';
import { faultOf, NotificationTap } from './notification-tap.js';
import { createRabbitVhost, deleteRabbitVhost, ensureRabbit } from './rabbitmq.js';

/**
 * The crash matrix of issue 5 on real parts: the agent (`snapshot-driver serve`, a child process)
 * is made to SIGKILL itself at one named point of a snapshot (SNAPSHOT_DRIVER_FAULT=kill:<point>),
 * restarted, and then everything an operator cares about is checked: the guest's power state, the
 * disk (`qemu-img check`), internal snapshots within policy, no incomplete active image, nothing
 * partial, and the request either completed or ended with an instance.snapshot.error notification.
 */

/** Every kill point of a strategy: before each step (its record written), and before the commit. */
export function killPoints(strategy: StrategyName): string[] {
  return [...STRATEGY_STEPS[strategy].map((s, i) => `step:${i}:${s.name}`), 'commit'];
}

/** Where the guests of a crash bench live: QEMU processes of the qemu backend, or libvirt domains. */
interface GuestSide {
  /** The folder of the bench (configs, state, images). */
  tmpPath: string;
  /** `[snapshot] name_prefix` of the bench's agents. */
  prefix: string;
  qemuImg: QemuImg;
  /** A small running guest with data on its disk (no OS); its uuid and its disk file. */
  make(name: string): Promise<{ uuid: string; disk: string }>;
  pause(uuid: string): Promise<void>;
  cleanup(): Promise<void>;
}

async function qemuSide(): Promise<GuestSide & { env: QemuEnv }> {
  const env = await makeQemuEnv({ accel: 'tcg' });
  return {
    env,
    tmpPath: env.tmpPath,
    prefix: 'snapdrv-',
    qemuImg: env.qemuImg,
    async make(name) {
      const uuid = await createGuest(env.hv, { name, memoryMb: 64 });
      await guestWrite(env.hv, uuid, 0x5a, 0, MiB);
      await guestWrite(env.hv, uuid, 0xa5, 9 * MiB, MiB);
      return { uuid, disk: path.join(env.instancesPath, uuid, 'disk') };
    },
    pause: (uuid) => env.hv.pause(uuid),
    cleanup: () => env.cleanup(),
  };
}

async function libvirtSide(): Promise<GuestSide> {
  const lv = await makeLibvirtBench();
  return {
    tmpPath: lv.base,
    prefix: lv.prefix,
    qemuImg: new QemuImg(QEMU_IMG),
    async make() {
      const d = await lv.domain({ guest: 'bare', memoryMb: 64 });
      // Data written as the guest would: through its own QEMU (libvirt names the device virtio-disk0).
      for (const [pattern, offset] of [[0x5a, 0], [0xa5, 9]] as const) {
        const out = await virsh('qemu-monitor-command', d.uuid, '--hmp', `qemu-io -d ${DISK_QOM_PATH} "write -P 0x${pattern.toString(16)} ${offset}M 1M"`);
        if (out.trim() !== '') throw new Error(`HMP qemu-io failed: ${out.trim()}`);
      }
      return { uuid: d.uuid, disk: d.disk };
    },
    pause: async (uuid) => void (await virsh('suspend', uuid)),
    cleanup: () => lv.cleanup(),
  };
}

export interface CrashBench {
  /** The qemu backend's guests (driver qemu only). */
  env: QemuEnv;
  driver: 'qemu' | 'libvirt';
  /** `[snapshot] name_prefix` of the bench's agents. */
  prefix: string;
  qemuImg: QemuImg;
  /** The disk file of a bench guest. */
  diskOf(uuid: string): string;
  /** The agent's parts, in this process, built from the bench's config (same instances, state, store). */
  runtime(): Promise<Runtime>;
  url: string;
  host: string;
  imagesDir: string;
  stateDir: string;
  /** One agent config per strategy (same dirs, same host). */
  confs: Map<StrategyName, string>;
  /** One guest per strategy and power state (a deferred-delete guest keeps a pending snapshot). */
  guest(strategy: StrategyName, state: 'running' | 'paused'): Promise<string>;
  /** The versioned notifications of the vhost, from before the first request. */
  tap: NotificationTap;
  agents: AgentProcess[];
  /** The last case's recovering agent, left serving with the next case's fault armed (see inSequence). */
  armed?: { agent: AgentProcess; conf: string; point: string };
  close(): Promise<void>;
}

/**
 * A vhost, guests (TCG, 64 MiB, no OS, made on first use: QEMU processes of the qemu backend or
 * libvirt domains), one config per strategy.
 */
export async function makeCrashBench(name: string, strategies: readonly StrategyName[], driver: 'qemu' | 'libvirt' = 'qemu'): Promise<CrashBench> {
  await ensureRabbit();
  const vhost = `sd-${name}-${process.pid}`;
  const host = `${name}-${process.pid}`;
  const url = await createRabbitVhost(vhost);
  const side = driver === 'qemu' ? await qemuSide() : await libvirtSide();
  const confs = new Map<StrategyName, string>();
  for (const strategy of strategies) {
    const dir = path.join(side.tmpPath, `conf-${strategy}`);
    await fs.mkdir(dir);
    const file = await writeAgentConfig(dir, { host, transportUrl: url, strategy });
    // Every config works on the same instances, state and images (relative paths resolve per file).
    const text = (await fs.readFile(file, 'utf8'))
      .replace('[snapshot]\n', `[snapshot]\nguest_agent_timeout = 1\nname_prefix = ${side.prefix}\n`)
      .replace('[hypervisor]\n', `[hypervisor]\ndriver = ${driver}\n`)
      .replace('instances_path = instances', 'instances_path = ../instances')
      .replace('state_path = state', 'state_path = ../state')
      .replace('path = images', 'path = ../images');
    await fs.writeFile(file, text);
    confs.set(strategy, file);
  }
  const guests = new Map<string, Promise<string>>();
  const disks = new Map<string, string>();
  let runtime: Runtime | undefined;
  const makeGuest = async (strategy: StrategyName, state: 'running' | 'paused'): Promise<string> => {
    const { uuid, disk } = await side.make(`crash-${strategy}-${state}`);
    disks.set(uuid, disk);
    if (state === 'paused') await side.pause(uuid);
    return uuid;
  };
  const agents: AgentProcess[] = [];
  // The control exchange exists once an agent has served: then the notifications can be tapped.
  const first = await startAgentProcess(confs.get(strategies[0]!)!);
  agents.push(first);
  const tap = await NotificationTap.open(vhost, `${name}-tap-${process.pid}`);
  await first.stop();
  const bench: CrashBench = {
    env: 'env' in side ? (side as { env: QemuEnv }).env : (undefined as never),
    driver,
    prefix: side.prefix,
    qemuImg: side.qemuImg,
    async runtime() {
      runtime ??= buildRuntime(await loadConfig([confs.get(strategies[0]!)!]), silentLogger());
      return runtime;
    },
    diskOf(uuid) {
      const disk = disks.get(uuid);
      if (disk === undefined) throw new Error(`no bench guest ${uuid}`);
      return disk;
    },
    url,
    host,
    imagesDir: path.join(side.tmpPath, 'images'),
    stateDir: path.join(side.tmpPath, 'state'),
    confs,
    guest(strategy, state) {
      const key = `${strategy}/${state}`;
      let g = guests.get(key);
      if (g === undefined) {
        g = makeGuest(strategy, state);
        guests.set(key, g);
      }
      return g;
    },
    tap,
    agents,
    async close() {
      for (const a of agents) await a.kill();
      await tap.close();
      await side.cleanup();
      await deleteRabbitVhost(vhost);
    },
  };
  return bench;
}

/** Casts snapshot_instance to the agent's `compute.<host>` queue (envelope 2.0, as nova does). */
export async function castSnapshot(bench: CrashBench, uuid: string, imageId: string): Promise<void> {
  const conn = await connect(bench.url.replace(/^rabbit:/, 'amqp:'));
  try {
    const ch = await conn.createConfirmChannel();
    const message = {
      method: 'snapshot_instance',
      args: { instance: novaInstance({ uuid, display_name: 'crash-guest', user_id: 'u-crash', project_id: 'p-crash' }), image_id: imageId },
      version: '6.0',
      _unique_id: randomUUID().replace(/-/g, ''),
      _context_request_id: `req-${randomUUID()}`,
      _context_user_id: 'u-crash',
      _context_project_id: 'p-crash',
    };
    const body = Buffer.from(JSON.stringify({ 'oslo.version': '2.0', 'oslo.message': JSON.stringify(message) }));
    ch.publish('nova', `compute.${bench.host}`, body, { contentType: 'application/json', contentEncoding: 'utf-8' });
    await ch.waitForConfirms();
    await ch.close();
  } finally {
    await conn.close();
  }
}

async function waitFor<T>(what: string, probe: () => T | undefined | Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Kill points inside a hypervisor operation, and the step they fall in. */
const INSIDE_STEP: Record<string, string> = {
  'managed-save:migrating': 'suspend',
  'resume:loading': 'resume',
  'resume:loaded': 'resume',
};

export interface CrashCase {
  strategy: StrategyName;
  /** The fault point (without `kill:`). */
  point: string;
  guest: 'running' | 'paused';
  /** The case run after this one (inSequence): its fault can be armed in this case's recovering agent. */
  next?: CrashCase;
}

/**
 * The cases in the order they run, each knowing the next. Starting an agent is most of a case's cost,
 * so a case's recovering agent is started with the next case's fault armed and goes on to be the
 * next case's crashing agent, when nothing its recovery does can reach that fault: the same config,
 * a point before a step or the commit (recovery never runs a step forward or commits; the points
 * inside a managed save or a resume it can reach), and not after a case whose recovery carries the
 * request out again.
 */
export function inSequence(cases: CrashCase[]): CrashCase[] {
  return cases.map((c, i) => ({ ...c, next: cases[i + 1] }));
}

function armable(c: CrashCase): string | undefined {
  const next = c.next;
  if (next === undefined || next.strategy !== c.strategy || c.point === 'operation-recorded') return undefined;
  return next.point.startsWith('step:') || next.point === 'commit' ? next.point : undefined;
}

/** The case's crashing agent: the previous case's recovering agent when it was armed for this point. */
async function crashingAgent(bench: CrashBench, conf: string, point: string): Promise<AgentProcess> {
  const armed = bench.armed;
  bench.armed = undefined;
  if (armed !== undefined) {
    if (armed.conf === conf && armed.point === point && armed.agent.exitStatus === undefined) return armed.agent;
    await armed.agent.stop();
  }
  const agent = spawnAgent(conf, { env: { SNAPSHOT_DRIVER_FAULT: `kill:${point}` } });
  bench.agents.push(agent);
  await agent.waitForLog('agent serving');
  return agent;
}

/**
 * One case: a snapshot request, the agent SIGKILLed at the point, a restarted agent, and every check.
 * Resolves with what the restarted agent's recovery said, for the table.
 */
export async function runCrashCase(bench: CrashBench, c: CrashCase): Promise<{ outcome: 'completed' | 'error'; recovered: unknown }> {
  const conf = bench.confs.get(c.strategy)!;
  const uuid = await bench.guest(c.strategy, c.guest);
  const imageId = randomUUID();

  const crashing = await crashingAgent(bench, conf, c.point);
  await castSnapshot(bench, uuid, imageId);
  const exit = await Promise.race([
    crashing.exited,
    new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`agent did not die at ${c.point}\n${crashing.tail()}`)), 60_000)),
  ]);
  expect(exit, `the agent must have killed itself at ${c.point}`).toEqual({ code: null, signal: 'SIGKILL' });
  // It died with the operation recorded in the operation journal, at the point named.
  const recordFile = path.join(bench.stateDir, 'operations', `${imageId}.json`);
  const record = JSON.parse(await fs.readFile(recordFile, 'utf8')) as Record<string, unknown>;
  if (c.point === 'commit') expect(record).toMatchObject({ phase: 'commit', strategy: c.strategy, prior_state: c.guest });
  else if (c.point === 'operation-recorded') expect(record).toMatchObject({ phase: 'setup', step_index: -1 });
  else if (c.point in INSIDE_STEP) {
    expect(record).toMatchObject({ phase: 'run', strategy: c.strategy, prior_state: c.guest });
    expect((record.steps as string[])[record.step_index as number]).toBe(INSIDE_STEP[c.point]);
  } else {
    const [, index, name] = /^step:(\d+):(.+)$/.exec(c.point)!;
    expect(record).toMatchObject({ phase: 'run', step_index: Number(index), strategy: c.strategy, prior_state: c.guest });
    expect((record.steps as string[])[Number(index)]).toBe(name);
  }

  const nextPoint = armable(c);
  const restarted = await startAgentProcess(conf, nextPoint === undefined ? {} : { env: { SNAPSHOT_DRIVER_FAULT: `kill:${nextPoint}` } });
  bench.agents.push(restarted);
  // Armed at once: should a check below fail, the next case still stops or uses it (never two agents on the queue).
  if (nextPoint !== undefined) bench.armed = { agent: restarted, conf, point: nextPoint };
  const recovered = restarted.find('interrupted snapshot recovered', { image_id: imageId });
  expect(recovered, `recovery of ${imageId}\n${restarted.tail()}`).toHaveLength(1);

  // The request ended: completed (carried out again: it never started) or an error notification.
  const retried = c.point === 'operation-recorded';
  const wanted = retried ? 'instance.snapshot.end' : 'instance.snapshot.error';
  const note = await bench.tap.waitFor(wanted, imageId, 60_000);
  if (!retried) {
    expect(note.routingKey).toBe('versioned_notifications.error');
    expect(faultOf(note.message)).toMatchObject({ exception: 'SnapshotInterrupted', exception_message: expect.stringContaining('interrupted') });
  }
  await waitFor('the request journal to empty', async () => ((await journalEntries(bench)).length === 0 ? true : undefined));
  if (nextPoint === undefined) await restarted.stop();

  // The guest is back in its power state, its disk clean, our snapshots within policy.
  // Read in this process, from the same config (a CLI process per check costs seconds per case).
  const rt = await bench.runtime();
  expect((await rt.hv.info(uuid)).state).toBe(c.guest);
  const disk = bench.diskOf(uuid);
  expect(await bench.qemuImg.check(disk, { forceShare: true })).toMatchObject({ clean: true, corruptions: 0 });
  const ours = (await bench.qemuImg.snapshotList(disk)).filter((s) => s.name.startsWith(bench.prefix));
  expect(ours.length).toBeLessThanOrEqual(SNAPSHOTS_LEFT_MAX[c.strategy]);
  // The image: active and verified (carried out again), or killed; never an incomplete active one.
  const image = JSON.parse(await fs.readFile(path.join(bench.imagesDir, `${imageId}.json`), 'utf8')) as Record<string, unknown>;
  expect(image.status).toBe(retried ? 'active' : 'killed');
  await expectStoreConsistent(bench);
  expect(await fs.readdir(path.join(bench.stateDir, 'operations'))).toEqual([]);
  return { outcome: retried ? 'completed' : 'error', recovered: recovered[0] };
}

/** Unfinished request-journal entries. */
export async function journalEntries(bench: CrashBench): Promise<string[]> {
  const names = await fs.readdir(path.join(bench.stateDir, 'journal')).catch(() => []);
  return names.filter((n) => /^\d{16}-[0-9a-f]{8}\.json$/.test(n));
}

/** Every active image verifies; nothing in .partial/. */
export async function expectStoreConsistent(bench: CrashBench): Promise<void> {
  const { store } = await bench.runtime();
  for (const img of (await store.list()).filter((i) => i.status === 'active')) {
    expect(await store.verify(img.id), `image ${img.id}`).toMatchObject({ ok: true });
  }
  expect(await fs.readdir(path.join(bench.imagesDir, '.partial')).catch(() => [])).toEqual([]);
}
