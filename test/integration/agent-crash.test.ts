/**
 * The agent (`snapshot-driver serve`, a child process) crashing and losing its broker, on real
 * RabbitMQ with a real QEMU guest: a request it acknowledged survives a SIGKILL through its
 * journal, and RabbitMQ stopped and started while the agent runs is reconnected to. Meanwhile SPEC
 * §9's readiness and broker metrics follow: /readyz 503 "broker disconnected" (/healthz still 200)
 * while RabbitMQ is down and 200 once reconnected; snapshot_driver_broker_connected follows, and the
 * series move by exactly the one reconnect and the calls served after it.
 *
 * The broker is stopped for real: vitest.config.ts runs this file alone, after every other file
 * (beside bus-contract, one at a time), so that no other file loses its connections.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { connect, type ChannelModel } from 'amqplib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { metricsBaseUrl, novaInstance, rawHasPattern, spawnAgent, startAgentProcess, waitForImageStatus, writeAgentConfig, type AgentProcess } from '../helpers/agent.js';
import { cliJson } from '../helpers/cli.js';
import { assertOsloMessaging, osloRpc } from '../helpers/oslo-python.js';
import { createGuest, guestWrite, makeQemuEnv, MiB, type QemuEnv } from '../helpers/qemu-guest.js';
import { createRabbitVhost, deleteRabbitVhost, ensureRabbit, RABBIT_HOST, RABBIT_PORT, stopRabbit } from '../helpers/rabbitmq.js';
import { METRIC_NAMES as n } from '../../src/metrics/agent-metrics.js';
import { get, rawRequest, type RawResponse } from '../helpers/http-raw.js';
import { diffSamples, parseExposition, seriesKey } from '../helpers/prom-text.js';

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

/** The agent's HTTP endpoint (SPEC §9), one request per connection. */
function endpoint(port: number) {
  const ask = (p: string) => rawRequest(port, get(p, 'Connection: close\r\n'));
  return {
    ask,
    async scrape(): Promise<Map<string, number>> {
      const res = await ask('/metrics');
      expect(res.status).toBe(200);
      return parseExposition(res.body).samples;
    },
    /** Polls /readyz until it answers `status` (a bound against a hang, not a timed assertion). */
    async readyzUntil(status: number, agent: AgentProcess): Promise<RawResponse> {
      const deadline = Date.now() + 90_000;
      for (;;) {
        const res = await ask('/readyz');
        if (res.status === status) return res;
        if (Date.now() > deadline) throw new Error(`/readyz did not answer ${status} within 90 s (last: ${res.status} ${res.body})\n${agent.tail()}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    },
  };
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

  it('reconnects when RabbitMQ is stopped and started, and serves the next call; /readyz and the broker metrics follow', async () => {
    const agent = agents.at(-1)!;
    expect(agent.exitStatus).toBeUndefined();
    const lostBefore = agent.find('lost the connection to the message broker').length;
    const reconnectedBefore = agent.find('reconnected to the message broker').length;
    const http = endpoint(Number(new URL(await metricsBaseUrl(agent)).port));
    expect(await http.ask('/readyz')).toMatchObject({ status: 200, body: '{"ready":true}\n' });
    const before = await http.scrape();
    expect(before.get(n.brokerConnected)).toBe(1);

    await stopRabbit();
    await agent.waitForLog('lost the connection to the message broker', {}, { count: lostBefore + 1 });
    expect(JSON.parse((await http.readyzUntil(503, agent)).body)).toEqual({ ready: false, reason: 'broker disconnected' });
    expect(await http.ask('/healthz')).toMatchObject({ status: 200, body: '{"healthy":true}\n' });
    const whileDown = await http.scrape();
    expect(whileDown.get(n.brokerConnected)).toBe(0);
    expect(whileDown.get(n.brokerReconnects)).toBe(before.get(n.brokerReconnects));

    await ensureRabbit();
    await agent.waitForLog('reconnected to the message broker', {}, { count: reconnectedBefore + 1 });
    expect(JSON.parse((await http.readyzUntil(200, agent)).body)).toEqual({ ready: true });

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
    const after = await http.scrape();
    expect(after.get(n.brokerConnected)).toBe(1);
    const moved = diffSamples(before, after, (k) => k.startsWith('snapshot_driver_') && k !== n.storeFreeBytes && !k.includes('_bucket'));
    expect(moved).toMatchObject({
      [n.brokerReconnects]: 1,
      [seriesKey(n.rpcRequests, { method: 'start_instance', result: 'success' })]: 1,
      [seriesKey(n.rpcRequests, { method: 'snapshot_instance', result: 'success' })]: 1,
      [seriesKey(n.snapshots, { strategy: STRATEGY, result: 'success' })]: 1,
    });
    expect(Object.keys(moved).filter((k) => /rpc_requests_total|snapshots_total|reconnects/.test(k)).sort()).toEqual(
      [
        n.brokerReconnects,
        seriesKey(n.rpcRequests, { method: 'snapshot_instance', result: 'success' }),
        seriesKey(n.rpcRequests, { method: 'start_instance', result: 'success' }),
        seriesKey(n.snapshots, { strategy: STRATEGY, result: 'success' }),
      ].sort(),
    );
    expect(agent.exitStatus).toBeUndefined();
  });
});
