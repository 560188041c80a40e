/**
 * SPEC §9 on the agent as operators run it: `snapshot-driver serve` (a child process) on real
 * RabbitMQ with a real QEMU guest (TCG, no OS), its metrics endpoint read with real HTTP on
 * loopback. /metrics parses strictly as the Prometheus text format, and after a successful
 * snapshot, a failed one (guest missing) and malformed or refused requests its series moved by
 * exactly that; hostile HTTP (huge headers, other methods, traversal, a slow client, 1000
 * connections at once) gets a clean answer or a closed connection, and the agent goes on serving.
 * One agent for the file. (RabbitMQ stopped under it: agent-crash.test.ts.)
 */
import net from 'node:net';
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rabbitOptionsSchema } from '../../src/config/schema.js';
import { silentLogger } from '../../src/log.js';
import type { Bus } from '../../src/messaging/bus.js';
import { openBus } from '../../src/messaging/transport/open-bus.js';
import { METRIC_NAMES, SECONDS_BUCKETS } from '../../src/metrics/agent-metrics.js';
import { MAX_CONNECTIONS, MAX_HEADER_BYTES } from '../../src/service/metrics-server.js';
import { metricsBaseUrl, novaInstance, startAgentProcess, writeAgentConfig, type AgentProcess } from '../helpers/agent.js';
import { get, rawRequest, trickle } from '../helpers/http-raw.js';
import { diffSamples, parseExposition, seriesKey } from '../helpers/prom-text.js';
import { createGuest, makeQemuEnv, MiB, type QemuEnv } from '../helpers/qemu-guest.js';
import { createRabbitVhost, deleteRabbitVhost, ensureRabbit } from '../helpers/rabbitmq.js';
import { RemoteFailure, TestRpcClient } from '../helpers/rpc-client.js';

const VHOST = `sd-metrics-${process.pid}`;
const HOST = `metrics-${process.pid}`;
const STRATEGY = 'monitor-snapshot';
const GUEST_NAME = 'metrics-guest';
const n = METRIC_NAMES;
const key = seriesKey;

let env: QemuEnv | undefined;
let agent: AgentProcess | undefined;
let bus: Bus | undefined;
let client: TestRpcClient | undefined;
let port: number;
let uuid: string;

beforeAll(async () => {
  await ensureRabbit();
  const url = await createRabbitVhost(VHOST);
  env = await makeQemuEnv({ accel: 'tcg' });
  const conf = await writeAgentConfig(env.tmpPath, { host: HOST, transportUrl: url, strategy: STRATEGY, metricsListen: '127.0.0.1:0' });
  uuid = await createGuest(env.hv, { name: GUEST_NAME });
  agent = await startAgentProcess(conf);
  port = Number(new URL(await metricsBaseUrl(agent)).port);
  bus = await openBus(url, rabbitOptionsSchema.parse({}), silentLogger());
  client = await new TestRpcClient(bus, { server: HOST }).open();
});

afterAll(async () => {
  try {
    await client?.close().catch(() => undefined);
    await bus?.close().catch(() => undefined);
    await agent?.stop(20_000);
    await env?.cleanup();
  } finally {
    await deleteRabbitVhost(VHOST);
  }
});

async function scrape(): Promise<Map<string, number>> {
  const res = await rawRequest(port, get('/metrics', 'Connection: close\r\n'));
  expect(res.status).toBe(200);
  return parseExposition(res.body).samples;
}

/** The agent's own series, but for what depends on the machine: the duration's buckets and sum, the store's free bytes. */
const exact = (k: string) =>
  k.startsWith('snapshot_driver_') && !k.startsWith(`${n.duration}_bucket`) && !k.startsWith(`${n.duration}_sum`) && k !== n.storeFreeBytes;

/** Cumulative histogram series after one observation of `seconds`. */
function oneObservation(name: string, strategy: string, seconds: number): Record<string, number> {
  const out: Record<string, number> = {};
  for (const le of [...SECONDS_BUCKETS.map(String), '+Inf']) if (le === '+Inf' || Number(le) >= seconds) out[key(`${name}_bucket`, { le, strategy })] = 1;
  if (seconds !== 0) out[key(`${name}_sum`, { strategy })] = seconds;
  out[key(`${name}_count`, { strategy })] = 1;
  return out;
}

const instance = () => novaInstance({ uuid, display_name: GUEST_NAME, user_id: 'metrics-user', project_id: 'metrics-project' });

describe('metrics of a serving agent (real RabbitMQ, real QEMU)', () => {
  it('serves /metrics in the Prometheus text format, /healthz and /readyz', async () => {
    const res = await rawRequest(port, get('/metrics', 'Connection: close\r\n'));
    expect(res).toMatchObject({ status: 200, headers: { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' } });
    const { samples, types } = parseExposition(res.body);
    const families: Record<string, string> = {
      [n.snapshots]: 'counter',
      [n.downtime]: 'histogram',
      [n.duration]: 'histogram',
      [n.exportedBytes]: 'counter',
      [n.inProgress]: 'gauge',
      [n.waiting]: 'gauge',
      [n.rpcRequests]: 'counter',
      [n.brokerConnected]: 'gauge',
      [n.brokerReconnects]: 'counter',
      [n.recovered]: 'counter',
      [n.pending]: 'gauge',
      [n.storeFreeBytes]: 'gauge',
    };
    for (const [name, type] of Object.entries(families)) expect({ name, type: types.get(name) }).toEqual({ name, type });
    // prom-client's default process metrics.
    expect(types.get('process_cpu_seconds_total')).toBe('counter');
    expect(types.get('nodejs_eventloop_lag_seconds')).toBe('gauge');
    expect(samples.get(n.brokerConnected)).toBe(1);
    expect(samples.get(n.storeFreeBytes)).toBeGreaterThan(0);
    expect(await rawRequest(port, get('/healthz', 'Connection: close\r\n'))).toMatchObject({ status: 200, body: '{"healthy":true}\n' });
    expect(await rawRequest(port, get('/readyz', 'Connection: close\r\n'))).toMatchObject({ status: 200, body: '{"ready":true}\n' });
  });

  it('a successful snapshot, a failed one (guest missing) and refused requests move the series by exactly that', async () => {
    const before = await scrape();
    const image = randomUUID();
    const result = (await client!.call('snapshot_instance', { instance: instance(), image_id: image }, { timeoutS: 120 })) as { downtime_ms: number; duration_ms: number; size: number };
    expect(result).toMatchObject({ image_id: image, status: 'active', strategy: STRATEGY, size: 64 * MiB });
    const afterSuccess = await scrape();
    expect(diffSamples(before, afterSuccess, exact)).toEqual({
      [key(n.snapshots, { strategy: STRATEGY, result: 'success' })]: 1,
      ...oneObservation(n.downtime, STRATEGY, result.downtime_ms / 1000),
      [key(`${n.duration}_count`, { strategy: STRATEGY })]: 1,
      [key(n.exportedBytes)]: 64 * MiB,
      [key(n.rpcRequests, { method: 'snapshot_instance', result: 'success' })]: 1,
    });
    expect(diffSamples(before, afterSuccess, (k) => k.startsWith(`${n.duration}_`))).toEqual(oneObservation(n.duration, STRATEGY, result.duration_ms / 1000));

    // A guest that does not exist.
    const missing = novaInstance({ uuid: randomUUID(), display_name: 'gone', user_id: 'u', project_id: 'p' });
    await expect(client!.call('snapshot_instance', { instance: missing, image_id: randomUUID() })).rejects.toMatchObject({ failure: { class: 'InstanceNotFound' } });
    // Malformed (not JSON), an unknown method, bad arguments: refused.
    await client!.sendRaw(Buffer.from('{"oslo.version": "2.0", "oslo.message": '));
    await expect(client!.call('resize_instance', { instance: instance() })).rejects.toMatchObject({ failure: { class: 'NoSuchMethod' } });
    await expect(client!.call('snapshot_instance', { instance: instance(), image_id: 'not-a-uuid' })).rejects.toBeInstanceOf(RemoteFailure);
    const afterFailures = await scrape();
    expect(diffSamples(afterSuccess, afterFailures, exact)).toEqual({
      [key(n.snapshots, { strategy: STRATEGY, result: 'failure' })]: 1,
      [key(n.rpcRequests, { method: 'snapshot_instance', result: 'failure' })]: 1,
      [key(n.rpcRequests, { method: 'unknown', result: 'refused' })]: 2,
      [key(n.rpcRequests, { method: 'snapshot_instance', result: 'refused' })]: 1,
    });
    // Idle again.
    expect(afterFailures.get(n.inProgress)).toBe(0);
    expect(afterFailures.get(n.waiting)).toBe(0);
    expect(afterFailures.get(n.pending)).toBe(0);
  });

  it('answers hostile HTTP cleanly or closes the connection, and changes nothing', async () => {
    const before = await scrape();
    expect(await rawRequest(port, get('/metrics', `X-Big: ${'b'.repeat(4 * MAX_HEADER_BYTES)}\r\n`))).toMatchObject({ status: 431, closed: true });
    for (const method of ['POST', 'PUT', 'DELETE', 'PATCH', 'CONNECT']) {
      const res = await rawRequest(port, `${method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n`);
      // CONNECT is the server's own business (no handler: the connection is closed); the others 405.
      if (method === 'CONNECT') expect(res.closed).toBe(true);
      else expect({ method, status: res.status, allow: res.headers.allow }).toEqual({ method, status: 405, allow: 'GET, HEAD' });
    }
    for (const path of ['/../metrics', '/metrics/../x', '/%2e%2e/metrics', '/healthz/../readyz', '/metrics;x', `/${'a'.repeat(4000)}`]) {
      expect({ path: path.slice(0, 40), ...(await rawRequest(port, get(path))) }).toMatchObject({ path: path.slice(0, 40), status: 404, body: 'not found\n', closed: true });
    }
    const after = await scrape();
    expect(diffSamples(before, after, exact)).toEqual({});
  });

  it('cuts off a client that sends its headers byte by byte', async () => {
    const request = get('/metrics', `User-Agent: ${'s'.repeat(200)}\r\n`);
    // 100 ms a byte: the whole request would take about 25 s, past the headers timeout.
    const slow = await trickle(port, request, 100);
    expect(slow.closed).toBe(true);
    expect(slow.sent).toBeLessThan(request.length);
    expect(slow.answer === '' || slow.answer.startsWith('HTTP/1.1 408 ')).toBe(true);
  });

  it('after 1000 connections at once, at most MAX_CONNECTIONS stay open, and the agent still answers an RPC and /healthz', async () => {
    const sockets: net.Socket[] = [];
    let closedByServer = 0;
    try {
      await Promise.all(
        Array.from({ length: 1000 }, () =>
          new Promise<void>((resolve) => {
            const s = net.connect({ host: '127.0.0.1', port });
            sockets.push(s);
            s.on('connect', () => resolve());
            s.on('error', () => resolve());
            s.on('close', () => {
              closedByServer += 1;
              resolve();
            });
          }),
        ),
      );
      // While they are held (idle, sending nothing), an RPC is carried out.
      await client!.call('stop_instance', { instance: instance() }, { timeoutS: 60 });
      await client!.call('start_instance', { instance: instance() }, { timeoutS: 60 });
      expect(sockets.length - closedByServer).toBeLessThanOrEqual(MAX_CONNECTIONS);
    } finally {
      for (const s of sockets) s.destroy();
    }
    await new Promise((r) => setTimeout(r, 200));
    expect(await rawRequest(port, get('/healthz', 'Connection: close\r\n'))).toMatchObject({ status: 200 });
    expect(await rawRequest(port, get('/readyz', 'Connection: close\r\n'))).toMatchObject({ status: 200 });
    expect(agent!.exitStatus).toBeUndefined();
  });
});
