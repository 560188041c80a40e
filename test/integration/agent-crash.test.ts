/**
 * The agent (`snapshot-driver serve`, a child process) crashing and losing its broker, on real
 * RabbitMQ with a real QEMU guest: a request it acknowledged survives a SIGKILL through its
 * journal, and RabbitMQ stopped and started while the agent runs is reconnected to.
 *
 * The broker is restarted for real (restartRabbit): vitest.config.ts runs this file alone, after
 * every other file, so that no other file loses its connections.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { connect, type ChannelModel } from 'amqplib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { novaInstance, rawHasPattern, spawnAgent, startAgentProcess, waitForImageStatus, writeAgentConfig, type AgentProcess } from '../helpers/agent.js';
import { cliJson } from '../helpers/cli.js';
import { assertOsloMessaging, osloRpc } from '../helpers/oslo-python.js';
import { createGuest, guestWrite, makeQemuEnv, MiB, type QemuEnv } from '../helpers/qemu-guest.js';
import { createRabbitVhost, restartRabbit, deleteRabbitVhost, ensureRabbit, RABBIT_HOST, RABBIT_PORT } from '../helpers/rabbitmq.js';

const VHOST = `sd-crash-${process.pid}`;
const HOST = `crash-${process.pid}`;
const STRATEGY = 'suspend-create-resume-extract';
const GUEST_NAME = 'crash-guest';

let url: string;
let env: QemuEnv | undefined;
let conf: string;
let imagesDir: string;
let uuid: string;
/** Every agent process started, killed in afterAll whatever happened. */
const agents: AgentProcess[] = [];
let amqp: ChannelModel | undefined;

/**
 * What the broker holds in a queue once no consumer is left on it: RabbitMQ removes a dead
 * connection's consumers in the same step as it requeues their unacknowledged messages, so once
 * consumerCount is 0 messageCount counts every message not acknowledged.
 */
async function queueOnceUnconsumed(queue: string): Promise<{ messageCount: number; consumerCount: number }> {
  amqp ??= await connect(`amqp://guest:guest@${RABBIT_HOST}:${RABBIT_PORT}/${encodeURIComponent(VHOST)}`);
  const ch = await amqp.createChannel();
  try {
    const deadline = Date.now() + 30_000;
    for (;;) {
      const q = await ch.checkQueue(queue);
      if (q.consumerCount === 0) return q;
      if (Date.now() > deadline) throw new Error(`queue ${queue} still has ${q.consumerCount} consumer(s)`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  } finally {
    await ch.close();
  }
}

beforeAll(async () => {
  await assertOsloMessaging();
  await ensureRabbit();
  url = await createRabbitVhost(VHOST);
  env = await makeQemuEnv({ accel: 'tcg' });
  conf = await writeAgentConfig(env.tmpPath, { host: HOST, transportUrl: url, strategy: STRATEGY });
  imagesDir = path.join(env.tmpPath, 'images');
  uuid = await createGuest(env.hv, { name: GUEST_NAME });
  await guestWrite(env.hv, uuid, 0x3c, 0, MiB);
  await guestWrite(env.hv, uuid, 0x96, 50 * MiB, 2 * MiB);
});

afterAll(async () => {
  try {
    await amqp?.close().catch(() => undefined);
    for (const agent of agents) await agent.kill();
    await env?.cleanup();
  } finally {
    await deleteRabbitVhost(VHOST);
  }
});

describe('agent crash and broker loss (real RabbitMQ, real QEMU)', () => {
  it('an agent killed right after acknowledging a cast finishes the request from its journal when restarted', async () => {
    const image = randomUUID();
    const crashing = spawnAgent(conf, { env: { SNAPSHOT_DRIVER_FAULT: 'kill:rpc-accepted' } });
    agents.push(crashing);
    await crashing.waitForLog('agent serving');

    const sent = await osloRpc(url, HOST, [
      { name: 'cast-snapshot', kind: 'cast', method: 'snapshot_instance', args: { instance: novaInstance({ uuid, display_name: GUEST_NAME, user_id: 'crash-user', project_id: 'crash-project' }), image_id: image } },
    ]);
    expect(sent.get('cast-snapshot')).toMatchObject({ ok: true });
    expect(await crashing.exited).toEqual({ code: null, signal: 'SIGKILL' });
    // It died after journaling and acknowledging the request, before running any of it.
    expect(crashing.find('RPC request accepted', { method: 'snapshot_instance' })).toHaveLength(1);
    expect(crashing.find('operation start')).toEqual([]);
    await expect(fs.access(path.join(imagesDir, `${image}.json`))).rejects.toThrow();

    // The broker holds nothing: the message was acknowledged, not handed back for redelivery.
    expect(await queueOnceUnconsumed(`compute.${HOST}`)).toMatchObject({ messageCount: 0 });
    expect(await queueOnceUnconsumed('compute')).toMatchObject({ messageCount: 0 });

    // Restarted without the fault, it carries out the journaled request before it serves.
    const restarted = await startAgentProcess(conf);
    agents.push(restarted);
    expect(restarted.find('carrying out unfinished requests from the journal')).toMatchObject([{ count: 1 }]);
    expect(restarted.find('resuming an unfinished RPC request', { method: 'snapshot_instance', instance_uuid: uuid })).toHaveLength(1);
    expect(restarted.find('snapshot end', { image_id: image })).toMatchObject([{ status: 'active', strategy: STRATEGY, internal_snapshots: 0 }]);
    expect(restarted.find(/^duplicate RPC request dropped/)).toEqual([]);

    const meta = await waitForImageStatus(imagesDir, image);
    expect(meta).toMatchObject({ id: image, status: 'active', size: 64 * MiB, properties: { instance_uuid: uuid, image_type: 'snapshot' } });
    expect(await cliJson(conf, ['images', 'verify', image])).toMatchObject({ ok: true });
    expect(await rawHasPattern(path.join(imagesDir, image), 0x3c, 0, MiB)).toBe(true);
    expect(await rawHasPattern(path.join(imagesDir, image), 0x96, 50 * MiB, 2 * MiB)).toBe(true);
    expect(await cliJson(conf, ['instances', 'list'])).toEqual([{ uuid, name: GUEST_NAME, state: 'running' }]);
    expect(await fs.readdir(path.join(imagesDir, '.partial'))).toEqual([]);

    // Stopped (through the running agent, as nova would), the disk is clean and holds no snapshot.
    const stopped = await osloRpc(url, HOST, [{ name: 'stop', kind: 'call', method: 'stop_instance', args: { instance: novaInstance({ uuid, display_name: GUEST_NAME, user_id: 'crash-user', project_id: 'crash-project' }) } }]);
    expect(stopped.get('stop')).toMatchObject({ ok: true, result: null });
    expect(await cliJson(conf, ['instances', 'list'])).toEqual([{ uuid, name: GUEST_NAME, state: 'shutoff' }]);
    const disk = path.join(env!.instancesPath, uuid, 'disk');
    expect(await env!.qemuImg.check(disk)).toMatchObject({ clean: true, corruptions: 0, leaks: 0 });
    expect(await env!.qemuImg.snapshotList(disk)).toEqual([]);
  });

  it('reconnects when RabbitMQ is stopped and started, and serves the next call', async () => {
    const agent = agents.at(-1)!;
    expect(agent.exitStatus).toBeUndefined();
    const lostBefore = agent.find('lost the connection to the message broker').length;
    const reconnectedBefore = agent.find('reconnected to the message broker').length;

    await restartRabbit();
    await agent.waitForLog('lost the connection to the message broker', {}, { count: lostBefore + 1 });
    await agent.waitForLog('reconnected to the message broker', {}, { count: reconnectedBefore + 1 });

    // A fresh oslo.messaging client: its calls reach the re-established consumers and get answers.
    const image = randomUUID();
    const results = await osloRpc(url, HOST, [
      { name: 'start', kind: 'call', method: 'start_instance', args: { instance: novaInstance({ uuid, display_name: GUEST_NAME, user_id: 'crash-user', project_id: 'crash-project' }) } },
      { name: 'snapshot', kind: 'call', method: 'snapshot_instance', args: { instance: novaInstance({ uuid, display_name: GUEST_NAME, user_id: 'crash-user', project_id: 'crash-project' }), image_id: image }, timeout: 120 },
    ]);
    expect(results.get('start')).toMatchObject({ ok: true, result: null });
    expect(results.get('snapshot')).toMatchObject({ ok: true, result: { image_id: image, status: 'active', internal_snapshots: 0 } });
    expect(await cliJson(conf, ['images', 'verify', image])).toMatchObject({ ok: true });
    expect(await cliJson(conf, ['instances', 'list'])).toEqual([{ uuid, name: GUEST_NAME, state: 'running' }]);
    expect(agent.exitStatus).toBeUndefined();
  });
});
