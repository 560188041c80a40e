/**
 * SPEC §9's readiness and broker metrics on a real `serve` whose RabbitMQ is stopped and started
 * again: /readyz answers 503 "broker disconnected" (and /healthz still 200) while RabbitMQ is down,
 * 200 once the agent has reconnected; snapshot_driver_broker_connected follows, and
 * snapshot_driver_broker_reconnects_total counts exactly the one reconnect. No guest is needed
 * (the qemu backend with no instance): an RPC answered afterwards shows the agent serves again.
 *
 * RabbitMQ is stopped for real: vitest.config.ts runs this file in BROKER_RESTARTS, after the main
 * group, alone.
 */
import { randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rabbitOptionsSchema } from '../../src/config/schema.js';
import { silentLogger } from '../../src/log.js';
import type { Bus } from '../../src/messaging/bus.js';
import { openBus } from '../../src/messaging/transport/open-bus.js';
import { METRIC_NAMES } from '../../src/metrics/agent-metrics.js';
import { metricsBaseUrl, startAgentProcess, writeAgentConfig, type AgentProcess } from '../helpers/agent.js';
import { get, rawRequest, type RawResponse } from '../helpers/http-raw.js';
import { diffSamples, parseExposition, seriesKey } from '../helpers/prom-text.js';
import { createRabbitVhost, deleteRabbitVhost, ensureRabbit, stopRabbit } from '../helpers/rabbitmq.js';
import { TestRpcClient } from '../helpers/rpc-client.js';

const VHOST = `sd-metrics-restart-${process.pid}`;
const HOST = `metrics-restart-${process.pid}`;
const n = METRIC_NAMES;

let tmp: DirectoryResult | undefined;
let url: string;
let agent: AgentProcess | undefined;
let port: number;

beforeAll(async () => {
  await ensureRabbit();
  url = await createRabbitVhost(VHOST);
  tmp = await dir({ unsafeCleanup: true, prefix: 'sdm-' });
  const conf = await writeAgentConfig(tmp.path, { host: HOST, transportUrl: url, metricsListen: '127.0.0.1:0' });
  agent = await startAgentProcess(conf);
  port = Number(new URL(await metricsBaseUrl(agent)).port);
});

afterAll(async () => {
  try {
    await ensureRabbit();
    await agent?.stop(20_000);
    await deleteRabbitVhost(VHOST);
  } finally {
    await tmp?.cleanup();
  }
});

const ask = (path: string) => rawRequest(port, get(path, 'Connection: close\r\n'));

async function scrape(): Promise<Map<string, number>> {
  const res = await ask('/metrics');
  expect(res.status).toBe(200);
  return parseExposition(res.body).samples;
}

/** Polls /readyz until it answers `status` (no timed assertion: a bound against a hang). */
async function readyzUntil(status: number): Promise<RawResponse> {
  const deadline = Date.now() + 90_000;
  for (;;) {
    const res = await ask('/readyz');
    if (res.status === status) return res;
    if (Date.now() > deadline) throw new Error(`/readyz did not answer ${status} within 90 s (last: ${res.status} ${res.body})\n${agent!.tail()}`);
    await sleep(100);
  }
}

describe('readiness and broker metrics across a RabbitMQ stop and start', () => {
  it('/readyz is 503 while RabbitMQ is stopped and 200 after; the broker metrics follow', async () => {
    expect(await ask('/readyz')).toMatchObject({ status: 200, body: '{"ready":true}\n' });
    const before = await scrape();
    expect(before.get(n.brokerConnected)).toBe(1);

    await stopRabbit();
    const down = await readyzUntil(503);
    expect(JSON.parse(down.body)).toEqual({ ready: false, reason: 'broker disconnected' });
    expect(await ask('/healthz')).toMatchObject({ status: 200, body: '{"healthy":true}\n' });
    const whileDown = await scrape();
    expect(whileDown.get(n.brokerConnected)).toBe(0);
    expect(whileDown.get(n.brokerReconnects)).toBe(before.get(n.brokerReconnects));

    await ensureRabbit();
    expect(JSON.parse((await readyzUntil(200)).body)).toEqual({ ready: true });

    // It serves RPCs again: a call for an instance it does not have is answered with the failure.
    const bus: Bus = await openBus(url, rabbitOptionsSchema.parse({}), silentLogger());
    try {
      const client = await new TestRpcClient(bus, { server: HOST }).open();
      await expect(client.call('start_instance', { instance: { uuid: randomUUID() } }, { timeoutS: 60 })).rejects.toMatchObject({ failure: { class: 'InstanceNotFound' } });
      await client.close();
    } finally {
      await bus.close();
    }
    const after = await scrape();
    expect(after.get(n.brokerConnected)).toBe(1);
    expect(diffSamples(before, after, (k) => k.startsWith('snapshot_driver_') && k !== n.storeFreeBytes)).toEqual({
      [n.brokerReconnects]: 1,
      [seriesKey(n.rpcRequests, { method: 'start_instance', result: 'failure' })]: 1,
    });
    expect(agent!.exitStatus).toBeUndefined();
  });
});
