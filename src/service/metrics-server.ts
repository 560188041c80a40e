import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { formatListenAddress, type ListenAddress } from '../config/listen-address.js';
import { errorMessage, MetricsListenError } from '../errors.js';
import type { Logger } from '../log.js';
import type { AgentMetrics } from '../metrics/agent-metrics.js';
import type { ReadyState } from './readiness.js';

/**
 * The agent's HTTP endpoint (SPEC §9), at `[metrics] listen`: `GET /metrics` (the Prometheus text
 * exposition), `GET /healthz` (200 while the process serves), `GET /readyz` (200, or 503 with the
 * reason). HEAD too. Nothing else: another path is 404, another method 405; no request changes
 * anything. The path is compared as sent (no normalisation: `/../metrics` is 404) and never echoed.
 *
 * Limits, so that a hostile or broken client costs little: headers at most MAX_HEADER_BYTES (431),
 * within HEADERS_TIMEOUT_MS, the whole request within REQUEST_TIMEOUT_MS (a client that sends its
 * headers byte by byte is cut off: 408 and closed), an idle keep-alive connection closed after
 * KEEP_ALIVE_TIMEOUT_MS, at most MAX_CONNECTIONS connections at once (those past it are closed at
 * once), and a request with a body, or any answer but 200 and 503, ends its connection.
 */

export const MAX_HEADER_BYTES = 8 * 1024;
export const MAX_HEADERS_COUNT = 64;
export const HEADERS_TIMEOUT_MS = 5_000;
export const REQUEST_TIMEOUT_MS = 10_000;
export const KEEP_ALIVE_TIMEOUT_MS = 5_000;
/** A connection with nothing going on (no request, no answer being written) is closed after this. */
export const IDLE_SOCKET_TIMEOUT_MS = 30_000;
export const MAX_CONNECTIONS = 64;
/** How often Node checks the header and request timeouts (its default, 30 s, would let them run long). */
const TIMEOUT_CHECK_MS = 1_000;

const ALLOW = 'GET, HEAD';

export interface MetricsServerOptions {
  listen: ListenAddress;
  metrics: AgentMetrics;
  readiness: () => ReadyState;
  log: Logger;
}

export interface MetricsServer {
  /** Where it listens (the port the kernel chose, when the option said 0). */
  readonly address: ListenAddress;
  /** Stops listening and closes every connection. */
  close(): Promise<void>;
}

interface Answer {
  status: number;
  type: string;
  body: string;
  headers?: Record<string, string>;
}

const text = (status: number, body: string, headers?: Record<string, string>): Answer => ({ status, type: 'text/plain; charset=utf-8', body, headers });
const json = (status: number, value: unknown): Answer => ({ status, type: 'application/json', body: `${JSON.stringify(value)}\n` });

/** Starts listening; rejects with MetricsListenError (naming `[metrics] listen`) when it cannot. */
export async function startMetricsServer(o: MetricsServerOptions): Promise<MetricsServer> {
  const log = o.log.child({ component: 'metrics-server' });
  const routes = new Map<string, () => Promise<Answer> | Answer>([
    ['/metrics', async () => ({ status: 200, type: o.metrics.contentType, body: await o.metrics.text() })],
    ['/healthz', () => json(200, { healthy: true })],
    [
      '/readyz',
      () => {
        const state = o.readiness();
        return json(state.ready ? 200 : 503, state);
      },
    ],
  ]);

  const server = http.createServer(
    {
      maxHeaderSize: MAX_HEADER_BYTES,
      headersTimeout: HEADERS_TIMEOUT_MS,
      requestTimeout: REQUEST_TIMEOUT_MS,
      keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS,
      connectionsCheckingInterval: TIMEOUT_CHECK_MS,
      noDelay: true,
    },
    (req, res) => {
      void answer(req, routes).then(
        (a) => send(req, res, a),
        (err: unknown) => {
          log.warn({ err: errorMessage(err) }, 'cannot answer a metrics request');
          send(req, res, text(500, 'internal error\n'));
        },
      );
    },
  );
  server.maxConnections = MAX_CONNECTIONS;
  server.maxHeadersCount = MAX_HEADERS_COUNT;
  server.timeout = IDLE_SOCKET_TIMEOUT_MS;

  const where = formatListenAddress(o.listen);
  await new Promise<void>((resolve, reject) => {
    const failed = (err: NodeJS.ErrnoException) => reject(new MetricsListenError(`[metrics] listen = ${where}: cannot listen: ${listenFailure(err)}`));
    server.once('error', failed);
    server.listen({ host: o.listen.host, port: o.listen.port, exclusive: true }, () => {
      server.off('error', failed);
      resolve();
    });
  });
  // Later errors (none are expected once listening) are logged, never thrown at the process.
  server.on('error', (err) => log.error({ err: errorMessage(err) }, 'metrics server error'));
  const bound = server.address() as AddressInfo;
  const address: ListenAddress = { host: o.listen.host, port: bound.port };
  log.info({ listen: formatListenAddress(address), paths: [...routes.keys()] }, 'metrics serving');

  let closing: Promise<void> | undefined;
  return {
    address,
    close() {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
      return closing;
    },
  };
}

/** The answer to one request: decided by its path (up to a `?`) and method only. */
async function answer(req: http.IncomingMessage, routes: Map<string, () => Promise<Answer> | Answer>): Promise<Answer> {
  const url = req.url ?? '';
  const q = url.indexOf('?');
  const route = routes.get(q < 0 ? url : url.slice(0, q));
  if (route === undefined) return text(404, 'not found\n');
  if (req.method !== 'GET' && req.method !== 'HEAD') return text(405, 'method not allowed\n', { Allow: ALLOW });
  return route();
}

function send(req: http.IncomingMessage, res: http.ServerResponse, a: Answer): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = Buffer.from(a.body, 'utf8');
  // A body we do not read, or an answer that says the client did something wrong: not kept alive.
  const hasBody = req.headers['transfer-encoding'] !== undefined || (req.headers['content-length'] ?? '0') !== '0';
  const close = hasBody || (a.status !== 200 && a.status !== 503);
  res.writeHead(a.status, {
    'Content-Type': a.type,
    'Content-Length': String(body.length),
    'Cache-Control': 'no-store',
    'X-Content-Type-Options': 'nosniff',
    ...(close && { Connection: 'close' }),
    ...a.headers,
  });
  // HEAD: Node sends the headers only.
  res.end(body);
}

function listenFailure(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'EADDRINUSE':
      return 'the address is in use by another process (EADDRINUSE)';
    case 'EADDRNOTAVAIL':
      return 'the address is not one of this host (EADDRNOTAVAIL)';
    case 'EACCES':
      return 'permission denied (EACCES; a port below 1024 needs privileges)';
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return `the host name does not resolve (${err.code})`;
    default:
      return err.message;
  }
}
