/**
 * The agent (`serve`, a child process) uploading into a real Glance (Debian's python3-glance 25,
 * sqlite, file store, no keystone: Glance's own ContextMiddleware trusting the identity headers),
 * driven by oslo.messaging's Python client as nova-api drives it: the image record created first
 * (POST /v2/images, queued, no formats), then snapshot_instance / backup_instance cast with the
 * request's token and project in its context.
 */
import { createHash, randomUUID } from 'node:crypto';
import { createReadStream, watch } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runProgram } from '../../src/util/exec.js';
import { novaInstance, startAgentProcess, writeAgentConfig, type AgentProcess } from '../helpers/agent.js';
import { GlanceServer } from '../helpers/glance.js';
import { rabbitOptionsSchema } from '../../src/config/schema.js';
import { silentLogger } from '../../src/log.js';
import type { Bus } from '../../src/messaging/bus.js';
import { openBus } from '../../src/messaging/transport/open-bus.js';
import { faultOf, NotificationTap } from '../helpers/notification-tap.js';
import { assertOsloMessaging, osloRpc } from '../helpers/oslo-python.js';
import { TestRpcClient, type CallOutcome } from '../helpers/rpc-client.js';
import { createGuest, guestWrite, makeQemuEnv, MiB, QEMU_IMG, type QemuEnv } from '../helpers/qemu-guest.js';
import { createRabbitVhost, deleteRabbitVhost, ensureRabbit } from '../helpers/rabbitmq.js';

const VHOST = `sd-glance-${process.pid}`;
const HOST_A = `glance-a-${process.pid}`;
const HOST_B = `glance-b-${process.pid}`;
const STRATEGY = 'monitor-snapshot';
const STAGED_STRATEGY = 'live';
const TOKEN = `gAAAAABtest-token-${randomUUID()}`;
const PROJECT = 'py-project';
const USER = 'py-user';
/** Glance's identity headers as keystonemiddleware would set them for nova-api's user. */
const NOVA_API = { 'x-identity-status': 'Confirmed', 'x-project-id': PROJECT, 'x-user-id': USER, 'x-roles': 'member,reader', 'x-auth-token': 'nova-api-token' };
/** Below the big guest's 96 MiB raw image, above the small ones' 32 MiB. */
const SIZE_CAP = 64 * MiB;

let url: string;
let envA: QemuEnv | undefined;
let envB: QemuEnv | undefined;
let glance: GlanceServer | undefined;
let agentA: AgentProcess | undefined;
let agentB: AgentProcess | undefined;
let confB: string;
let bus: Bus | undefined;
let tap: NotificationTap | undefined;
let small: string;
let big: string;
let other: string;

async function glanceLines(g: GlanceServer, retries: number): Promise<string> {
  return ['[image_store]', 'backend = glance', '[glance]', `api_servers = ${g.url}`, 'auth_strategy = keystone', 'timeout = 20', `retries = ${retries}`, ''].join('\n');
}

async function agentConfig(env: QemuEnv, host: string, g: GlanceServer, strategy: string = STRATEGY): Promise<string> {
  const conf = await writeAgentConfig(env.tmpPath, { host, transportUrl: url, strategy });
  // A repeated section is merged, later options win (SPEC §7).
  await fs.appendFile(conf, await glanceLines(g, 12));
  return conf;
}

function ctx(name: string): Record<string, unknown> {
  return { request_id: `req-${randomUUID()}`, user_id: USER, project_id: PROJECT, roles: ['member', 'reader'], auth_token: TOKEN, name };
}

/**
 * A call as nova-api's compute RPC API makes it (the fast in-process oslo-wire client; the Python
 * oslo.messaging client drives the happy path and the backups).
 */
async function call(host: string, method: string, args: Record<string, unknown>, context: Record<string, unknown>): Promise<CallOutcome> {
  const client = await new TestRpcClient(bus!, { server: host }).open();
  try {
    return await client.callRaw(method, args, { context, timeoutS: 150 });
  } finally {
    await client.close();
  }
}

async function sha512File(file: string): Promise<string> {
  const h = createHash('sha512');
  for await (const c of createReadStream(file) as AsyncIterable<Buffer>) h.update(c);
  return h.digest('hex');
}

/** The guest disk's raw bytes now (read beside the running QEMU, -U), hashed. */
async function diskSha512(env: QemuEnv, uuid: string): Promise<string> {
  const out = path.join(env.tmpPath, `disk-${uuid}.raw`);
  const res = await runProgram(QEMU_IMG, ['convert', '-U', '-f', 'qcow2', '-O', 'raw', path.join(env.instancesPath, uuid, 'disk'), out], { timeoutMs: 120_000 });
  if (res.code !== 0) throw new Error(`qemu-img convert: ${res.stderr}`);
  try {
    return await sha512File(out);
  } finally {
    await fs.rm(out, { force: true });
  }
}

async function state(env: QemuEnv, uuid: string): Promise<string> {
  return (await env.hv.info(uuid)).state;
}

async function staged(env: QemuEnv): Promise<string[]> {
  return fs.readdir(path.join(env.tmpPath, 'images', '.partial')).catch(() => []);
}

/** Polls `cond` (bounded) until it holds. */
async function waitFor(cond: () => Promise<boolean>, what: string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** A process's state letter from /proc (T: stopped). */
async function procState(pid: number): Promise<string> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
}

/** Bytes received and not read on the established connections of a local port (ss's Recv-Q). */
async function unreadBytes(port: number): Promise<number> {
  const res = await runProgram('ss', ['-Htn', 'state', 'established', `( sport = :${port} )`], { timeoutMs: 10_000 });
  return res.stdout
    .split('\n')
    .map((l) => Number(l.trim().split(/\s+/)[0]))
    .filter((n) => Number.isFinite(n))
    .reduce((a, b) => a + b, 0);
}

beforeAll(async () => {
  await assertOsloMessaging();
  await ensureRabbit();
  url = await createRabbitVhost(VHOST);
  envA = await makeQemuEnv({ accel: 'tcg' });
  envB = await makeQemuEnv({ accel: 'tcg' });
  const started = GlanceServer.start(path.join(envA.tmpPath, 'glance'), { pipeline: 'trusted', imageSizeCap: SIZE_CAP });
  [small, big, other] = await Promise.all([
    createGuest(envA.hv, { name: 'glance-small', diskSizeBytes: 32 * MiB }),
    createGuest(envA.hv, { name: 'glance-big', diskSizeBytes: 96 * MiB }),
    createGuest(envB.hv, { name: 'glance-other', diskSizeBytes: 32 * MiB }),
  ]);
  await guestWrite(envA.hv, small, 0x5a, 0, MiB);
  await guestWrite(envA.hv, small, 0xc3, 20 * MiB, MiB);
  await guestWrite(envB.hv, other, 0x3c, MiB, MiB);
  await guestWrite(envA.hv, big, 0x77, 0, MiB);
  glance = await started;
  // B takes `live` snapshots: its copy (a backup job, which cannot be run again) is staged, then
  // uploaded; A's monitor-snapshot exports are streamed.
  confB = await agentConfig(envB, HOST_B, glance, STAGED_STRATEGY);
  [agentA, agentB] = await Promise.all([startAgentProcess(await agentConfig(envA, HOST_A, glance)), startAgentProcess(confB)]);
  bus = await openBus(url, rabbitOptionsSchema.parse({}), silentLogger());
  tap = await NotificationTap.open(VHOST, `glance-tap-${process.pid}`);
}, 180_000);

afterAll(async () => {
  try {
    await tap?.close().catch(() => undefined);
    await bus?.close().catch(() => undefined);
    await Promise.all([agentA?.stop(20_000), agentB?.stop(20_000)]);
    await glance?.stop();
    await Promise.all([envA?.cleanup(), envB?.cleanup()]);
  } finally {
    await deleteRabbitVhost(VHOST);
  }
});

describe('Glance image store on a real Glance, driven as nova drives it', () => {
  it("uploads into nova-api's queued record: active, sha512 of the disk, nova's properties, the requester's project; token only in memory", async () => {
    const g = glance!;
    const imageId = randomUUID();
    await g.createQueued(imageId, 'snapshot of glance-small', NOVA_API);
    const context = ctx('snap');
    // monitor-snapshot's export is streamed into the PUT: nothing may appear under the staging folder.
    const imagesDir = path.join(envA!.tmpPath, 'images');
    await fs.mkdir(imagesDir, { recursive: true });
    const appeared: string[] = [];
    const watcher = watch(imagesDir, { recursive: true }, (_event, name) => appeared.push(String(name)));
    let results: Awaited<ReturnType<typeof osloRpc>>;
    try {
      results = await osloRpc(url, HOST_A, [
        { name: 'snap', kind: 'call', method: 'snapshot_instance', args: { instance: novaInstance({ uuid: small, display_name: 'glance-small', user_id: USER, project_id: PROJECT }), image_id: imageId }, context, timeout: 120 },
      ]);
    } finally {
      watcher.close();
    }
    expect(results.get('snap')).toMatchObject({ ok: true });
    expect(appeared).toEqual([]);
    expect(agentA!.find(/streaming the export into Glance \(nothing staged\)/).length).toBe(1);
    expect(agentA!.find(/streamed image verified in Glance/).length).toBe(1);
    const image = (await g.image(imageId, NOVA_API))!;
    expect(image).toMatchObject({
      status: 'active',
      disk_format: 'raw',
      container_format: 'bare',
      size: 32 * MiB,
      os_hash_algo: 'sha512',
      owner: PROJECT,
      image_type: 'snapshot',
      instance_uuid: small,
      image_location: 'snapshot',
      image_state: 'available',
      owner_id: PROJECT,
      user_id: USER,
    });
    expect(image.os_hash_value).toBe(await diskSha512(envA!, small));
    expect(await sha512File(path.join(g.dataDir, imageId))).toBe(image.os_hash_value);
    expect(await state(envA!, small)).toBe('running');
    expect(await staged(envA!)).toEqual([]);
    // The request id went to Glance with every request (its log lines carry it).
    expect(g.log).toContain(String(context.request_id));
    // The token: never in the agent's log, nor in anything it keeps on disk.
    expect(JSON.stringify(agentA!.lines)).not.toContain(TOKEN);
    const grep = await runProgram('grep', ['-r', '-l', '-F', TOKEN, path.join(envA!.tmpPath, 'state'), path.join(envA!.tmpPath, 'images')], { timeoutMs: 30_000 });
    expect(grep.code).toBe(1); // grep: 1 = no file holds it
    expect(grep.stdout).toBe('');
  });

  it('a request without a token fails with GlanceAuthMissing, the guest untouched', async () => {
    const imageId = randomUUID();
    await glance!.createQueued(imageId, 'no token', NOVA_API);
    const { auth_token: _none, ...noToken } = ctx('notoken');
    const r = await call(HOST_A, 'snapshot_instance', { instance: { uuid: small }, image_id: imageId }, noToken);
    expect(r.failure).toMatchObject({ class: 'GlanceAuthMissing' });
    expect(r.failure?.message).toMatch(/auth_strategy = keystone and this operation has no token/);
    expect((await glance!.image(imageId, NOVA_API))?.status).toBe('queued');
    expect(await state(envA!, small)).toBe('running');
  });

  it("Glance's image_size_cap (413): the snapshot fails naming Glance's answer, the image is deleted, the guest runs on, nothing staged", async () => {
    const imageId = randomUUID();
    await glance!.createQueued(imageId, 'too big', NOVA_API);
    const r = await call(HOST_A, 'snapshot_instance', { instance: { uuid: big }, image_id: imageId }, ctx('big'));
    expect(r.failure).toMatchObject({ class: 'SnapshotFailed' });
    expect(r.failure?.message).toMatch(/cannot upload image .* to Glance: Glance answered HTTP 413: .*/);
    const note = await tap!.waitFor('instance.snapshot.error', imageId);
    expect(String(faultOf(note.message).exception_message)).toMatch(/Glance answered HTTP 413/);
    expect(await glance!.image(imageId, NOVA_API)).toBeUndefined();
    expect(await state(envA!, big)).toBe('running');
    expect(await staged(envA!)).toEqual([]);
  });

  it('two agents racing on one image id: one wins, the other fails cleanly, the image is the winner\'s data', async () => {
    const imageId = randomUUID();
    await glance!.createQueued(imageId, 'raced', NOVA_API);
    const [ra, rb] = await Promise.all([
      call(HOST_A, 'snapshot_instance', { instance: { uuid: small }, image_id: imageId }, ctx('a')),
      call(HOST_B, 'snapshot_instance', { instance: { uuid: other }, image_id: imageId }, ctx('b')),
    ]);
    const a = { ok: ra.failure === null, ...ra };
    const b = { ok: rb.failure === null, ...rb };
    expect([a.ok, b.ok].filter(Boolean)).toHaveLength(1);
    const loser = a.ok ? b : a;
    expect(loser.failure?.message).toMatch(/already exists|is (saving|active) in Glance \(expected queued\)|HTTP 4(09|10): .*another upload has the image/);
    const image = (await glance!.image(imageId, NOVA_API))!;
    expect(image.status).toBe('active');
    expect(image.os_hash_value).toBe(a.ok ? await diskSha512(envA!, small) : await diskSha512(envB!, other));
    expect(await sha512File(path.join(glance!.dataDir, imageId))).toBe(image.os_hash_value);
    expect(await state(envA!, small)).toBe('running');
    expect(await state(envB!, other)).toBe('running');
    expect([...(await staged(envA!)), ...(await staged(envB!))]).toEqual([]);
  });

  it('backup_instance rotation lists and deletes the instance\'s backups in Glance', async () => {
    const ids = [randomUUID(), randomUUID(), randomUUID()];
    // Glance's created_at and updated_at have one-second precision, and these backups of a small disk
    // take less: each image is created in a second of its own, so that the oldest is known (with
    // equal times the order falls to the ids, as in nova, and the test would hold by chance).
    for (const [i, id] of ids.entries()) {
      if (i > 0) await new Promise((r) => setTimeout(r, 1000 - (Date.now() % 1000) + 20));
      await glance!.createQueued(id, `daily backup ${i}`, NOVA_API);
    }
    const results = await osloRpc(
      url,
      HOST_B,
      ids.map((id, i) => ({
        name: `b${i}`,
        kind: 'call' as const,
        method: 'backup_instance',
        args: { instance: { uuid: other }, image_id: id, backup_type: 'daily', rotation: 2 },
        context: ctx(`b${i}`),
        timeout: 120,
      })),
    );
    for (const i of [0, 1, 2]) expect(results.get(`b${i}`)).toMatchObject({ ok: true });
    const list = await glance!.api('GET', `/v2/images?instance_uuid=${other}&image_type=backup&backup_type=daily`, undefined, NOVA_API);
    const kept = ((list.json as { images: { id: string; status: string }[] }).images ?? []).map((i) => i.id).sort();
    expect(kept).toEqual([ids[1], ids[2]].sort());
    expect(await glance!.image(ids[0]!, NOVA_API)).toBeUndefined();
    // live's copies were staged, then uploaded, and never streamed.
    for (const id of [ids[1]!, ids[2]!]) {
      expect((await glance!.image(id, NOVA_API))?.os_hash_value).toMatch(/^[0-9a-f]{128}$/);
      expect(agentB!.find('image uploaded to Glance and verified', { image_id: id }).length).toBe(1);
    }
    expect(agentB!.find(/streaming the export into Glance/)).toEqual([]);
    expect(await staged(envB!)).toEqual([]);
  });

  it('Glance killed mid-stream: the export is run again into a new upload once Glance is back with the image queued, and ends active; the guest runs on, nothing staged', async () => {
    const g = glance!;
    // Agent B again, with monitor-snapshot, stopping itself (SIGSTOP) right before its streamed PUT:
    // the export not begun.
    await agentB!.stop(20_000);
    agentB = await startAgentProcess(await agentConfig(envB!, HOST_B, g), { env: { SNAPSHOT_DRIVER_FAULT: 'stop:streamed-upload' } });
    const imageId = randomUUID();
    await g.createQueued(imageId, 'killed glance', NOVA_API);
    const pending = call(HOST_B, 'snapshot_instance', { instance: { uuid: other }, image_id: imageId }, ctx('cut'));
    await waitFor(async () => (await procState(agentB!.pid)) === 'T', 'agent B stopped before its streamed upload');
    // Glance stops too; the agent goes on: its PUT connects and the export fills the socket, nothing read.
    g.signal('SIGSTOP');
    process.kill(agentB!.pid, 'SIGCONT');
    await waitFor(async () => (await unreadBytes(g.port)) > 0, 'streamed data waiting in a stopped Glance');
    await g.kill();
    await g.run();
    const r = await pending;
    // Glance had run none of that PUT (stopped before it came): after its restart the image is still
    // queued, so the export is run again, whole, into a new PUT, and the image is the disk's.
    expect(r.failure).toBeNull();
    expect(await g.image(imageId, NOVA_API)).toMatchObject({ status: 'active', size: 32 * MiB, os_hash_value: await diskSha512(envB!, other) });
    expect(agentB!.find(/streamed upload failed .*the image is back in queued: the export is run again/).length).toBe(1);
    expect(agentB!.find(/streamed upload cut: running the export again into a new upload/).length).toBe(1);
    expect(await state(envB!, other)).toBe('running');
    expect(await staged(envB!)).toEqual([]);
  });
});
