/**
 * The metrics endpoint (SPEC §9) in-process: its three paths and nothing else, its limits against
 * hostile input, readiness, and the agent's wiring of it on the in-memory broker (`memory://`),
 * through real HTTP on loopback.
 */
import { dir } from 'tmp-promise';
import { afterEach, describe, expect, it } from 'vitest';
import { MetricsListenError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import type { MemoryBus } from '../../src/messaging/transport/memory-bus.js';
import { AgentMetrics, METRIC_NAMES } from '../../src/metrics/agent-metrics.js';
import { startAgent } from '../../src/service/agent.js';
import { MAX_HEADER_BYTES, startMetricsServer, type MetricsServer } from '../../src/service/metrics-server.js';
import { NOT_READY, Readiness, type ReadyState } from '../../src/service/readiness.js';
import { buildRuntime } from '../../src/service/runtime.js';
import { get, rawRequest } from '../helpers/http-raw.js';
import { parseExposition, seriesKey } from '../helpers/prom-text.js';
import { tempDirsConfig } from '../helpers/temp-config.js';

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});

async function serve(readiness: () => ReadyState = () => ({ ready: true }), metrics = new AgentMetrics({ strategies: ['cold'], rpcMethods: ['snapshot_instance'] })) {
  const server = await startMetricsServer({ listen: { host: '127.0.0.1', port: 0 }, metrics, readiness, log: silentLogger() });
  cleanups.push(() => server.close());
  return { server, port: server.address.port, metrics };
}

describe('readiness', () => {
  it('is not ready until recovery is done and the broker is up, nor while the broker is down, nor when stopping', () => {
    const r = new Readiness();
    expect(r.state()).toEqual({ ready: false, reason: NOT_READY.recovering });
    r.broker(true);
    expect(r.state()).toEqual({ ready: false, reason: NOT_READY.recovering });
    r.broker(false);
    r.recovered();
    expect(r.state()).toEqual({ ready: false, reason: NOT_READY.brokerDown });
    r.broker(true);
    // Connected, the journal's requests still being carried out.
    expect(r.state()).toEqual({ ready: false, reason: NOT_READY.recovering });
    r.serving();
    expect(r.state()).toEqual({ ready: true });
    r.broker(false);
    expect(r.state()).toEqual({ ready: false, reason: 'broker disconnected' });
    r.broker(true);
    expect(r.state()).toEqual({ ready: true });
    r.stopping();
    expect(r.state()).toEqual({ ready: false, reason: 'stopping' });
    r.serving();
    expect(r.state()).toEqual({ ready: false, reason: 'stopping' });
  });
});

describe('the metrics endpoint', () => {
  it('serves /metrics in the Prometheus text format, /healthz, and /readyz with its reason', async () => {
    let state: ReadyState = { ready: false, reason: NOT_READY.recovering };
    const { port } = await serve(() => state);
    const metrics = await rawRequest(port, get('/metrics', 'Connection: close\r\n'));
    expect(metrics.status).toBe(200);
    expect(metrics.headers['content-type']).toBe('text/plain; version=0.0.4; charset=utf-8');
    const { samples, types } = parseExposition(metrics.body);
    expect(types.get(METRIC_NAMES.snapshots)).toBe('counter');
    expect(samples.get(seriesKey(METRIC_NAMES.snapshots, { strategy: 'cold', result: 'success' }))).toBe(0);
    expect(samples.get(seriesKey(METRIC_NAMES.rpcRequests, { method: 'unknown', result: 'refused' }))).toBe(0);

    expect(await rawRequest(port, get('/healthz', 'Connection: close\r\n'))).toMatchObject({ status: 200, body: '{"healthy":true}\n' });
    expect(await rawRequest(port, get('/readyz', 'Connection: close\r\n'))).toMatchObject({
      status: 503,
      headers: { 'content-type': 'application/json' },
      body: '{"ready":false,"reason":"start-up recovery not finished"}\n',
    });
    state = { ready: true };
    expect(await rawRequest(port, get('/readyz?verbose=1', 'Connection: close\r\n'))).toMatchObject({ status: 200, body: '{"ready":true}\n' });
  });

  it('answers HEAD with the headers only', async () => {
    const { port } = await serve();
    const head = await rawRequest(port, `HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    expect(head.status).toBe(200);
    expect(head.body).toBe('');
    expect(Number(head.headers['content-length'])).toBeGreaterThan(1000);
  });

  it('answers any other path 404 without echoing it, and closes the connection', async () => {
    const { port } = await serve();
    for (const path of ['/', '/metrics/', '/../metrics', '/metrics/../x', '/./metrics', '//metrics', '/METRICS', '/metrics%2F', '/healthz/x', 'http://localhost/metrics', '*', '/<script>alert(1)</script>']) {
      const res = await rawRequest(port, get(path));
      expect({ path, status: res.status, body: res.body, closed: res.closed }).toEqual({ path, status: 404, body: 'not found\n', closed: true });
    }
  });

  it('answers another method 405 with Allow: GET, HEAD, and closes the connection', async () => {
    const { port } = await serve();
    for (const method of ['POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'TRACE', 'PROPFIND']) {
      const res = await rawRequest(port, `${method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n`);
      expect({ method, status: res.status, allow: res.headers.allow, closed: res.closed }).toEqual({ method, status: 405, allow: 'GET, HEAD', closed: true });
    }
  });

  it('refuses headers over the limit (431) and malformed requests (400), closing the connection', async () => {
    const { port } = await serve();
    const huge = await rawRequest(port, get('/metrics', `X-Filler: ${'a'.repeat(MAX_HEADER_BYTES + 1024)}\r\n`));
    expect(huge).toMatchObject({ status: 431, closed: true });
    // Many small headers within the size limit: those past MAX_HEADERS_COUNT are dropped, the request answered.
    const many = Array.from({ length: 500 }, (_, i) => `X-${i}: y\r\n`).join('');
    expect(Buffer.byteLength(many)).toBeLessThan(MAX_HEADER_BYTES);
    expect(await rawRequest(port, get('/healthz', `${many}Connection: close\r\n`))).toMatchObject({ status: 200 });
    expect(await rawRequest(port, 'GARBAGE\r\n\r\n')).toMatchObject({ status: 400, closed: true });
  });

  it('keeps no connection open for a request with a body', async () => {
    const { port } = await serve();
    const res = await rawRequest(port, `GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello`);
    expect(res).toMatchObject({ status: 200, closed: true, headers: { connection: 'close' } });
  });

  it('changes nothing, whatever it is sent', async () => {
    const { port, metrics } = await serve();
    const before = await metrics.text();
    for (const req of [get('/metrics'), `POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}`, `DELETE /readyz HTTP/1.1\r\nHost: x\r\n\r\n`, get('/../../etc/passwd')]) {
      await rawRequest(port, req);
    }
    expect(await metrics.text()).toBe(before);
  });

  it('listens on IPv6 loopback', async () => {
    const server = await startMetricsServer({ listen: { host: '::1', port: 0 }, metrics: new AgentMetrics(), readiness: () => ({ ready: true }), log: silentLogger() });
    cleanups.push(() => server.close());
    expect(await rawRequest(server.address.port, get('/healthz', 'Connection: close\r\n'), '::1')).toMatchObject({ status: 200 });
  });

  it('refuses a port in use with an error naming [metrics] listen', async () => {
    const { port } = await serve();
    const err = await startMetricsServer({ listen: { host: '127.0.0.1', port }, metrics: new AgentMetrics(), readiness: () => ({ ready: true }), log: silentLogger() }).then(
      (s: MetricsServer) => {
        cleanups.push(() => s.close());
        return undefined;
      },
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(MetricsListenError);
    expect((err as Error).message).toBe(`[metrics] listen = 127.0.0.1:${port}: cannot listen: the address is in use by another process (EADDRINUSE)`);
  });
});

describe('the agent on memory://', () => {
  async function agentConfig(listen: { host: string; port: number } | null) {
    const tmp = await dir({ unsafeCleanup: true });
    cleanups.push(() => tmp.cleanup());
    const config = tempDirsConfig(tmp.path, { shutdownTimeoutS: 1 });
    config.DEFAULT.transport_url = `memory:///metrics-agent-${process.pid}-${Math.random()}`;
    config.metrics.listen = listen;
    return config;
  }

  it('serves its metrics; /readyz follows the broker connection; the broker metrics count the reconnect', async () => {
    const config = await agentConfig({ host: '127.0.0.1', port: 0 });
    const rt = buildRuntime(config, silentLogger());
    const agent = await startAgent(rt);
    let stopped = false;
    cleanups.push(async () => (stopped ? undefined : agent.stop()));
    const port = agent.metricsServer!.address.port;
    expect(await rawRequest(port, get('/readyz', 'Connection: close\r\n'))).toMatchObject({ status: 200, body: '{"ready":true}\n' });
    const scrape = async () => parseExposition((await rawRequest(port, get('/metrics', 'Connection: close\r\n'))).body).samples;
    const before = await scrape();
    expect(before.get(METRIC_NAMES.brokerConnected)).toBe(1);
    // The process metrics are there too.
    expect([...before.keys()].some((k) => k.startsWith('process_cpu_seconds_total'))).toBe(true);

    const seen: ReadyState[] = [];
    const bus = agent.bus as MemoryBus;
    bus.on('disconnected', () => seen.push(agent.readiness.state()));
    bus.on('reconnected', () => seen.push(agent.readiness.state()));
    await bus.simulateConnectionLoss();
    expect(seen).toEqual([{ ready: false, reason: 'broker disconnected' }, { ready: true }]);
    const after = await scrape();
    expect(after.get(METRIC_NAMES.brokerReconnects)).toBe((before.get(METRIC_NAMES.brokerReconnects) ?? 0) + 1);
    expect(after.get(METRIC_NAMES.brokerConnected)).toBe(1);

    // Stopping: not ready at once, and the port closed once stopped.
    const stopping = agent.stop();
    stopped = true;
    expect(agent.readiness.state()).toEqual({ ready: false, reason: 'stopping' });
    await stopping;
    await expect(rawRequest(port, get('/healthz'))).resolves.toMatchObject({ status: 0, closed: true });
  });

  it('does not start when its port is in use (the error names [metrics] listen), and serves nothing when listen is empty', async () => {
    const { port } = await serve();
    const busy = await agentConfig({ host: '127.0.0.1', port });
    await expect(startAgent(buildRuntime(busy, silentLogger()))).rejects.toThrow(/^\[metrics\] listen = 127\.0\.0\.1:\d+: cannot listen: the address is in use/);
    // It let go of its state_path: with the option empty, the same folders serve (and nothing listens).
    busy.metrics.listen = null;
    const agent = await startAgent(buildRuntime(busy, silentLogger()));
    cleanups.push(() => agent.stop());
    expect(agent.metricsServer).toBeUndefined();
    expect(agent.readiness.state()).toEqual({ ready: true });
  });
});
