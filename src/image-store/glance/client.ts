import type { Readable } from 'node:stream';
import { Agent, errors as undiciErrors, request, type Dispatcher } from 'undici';
import type { Logger } from '../../log.js';
import { GlanceAuthMissing, GlanceError, GlanceUnavailable } from '../errors.js';
import type { StoreRequestAuth } from '../backend.js';

export type GlanceAuthStrategy = 'keystone' | 'noauth';

export interface GlanceClientOptions {
  /** `[glance] api_servers`: base URLs without a trailing slash, tried in order. */
  apiServers: readonly string[];
  /** `[glance] timeout` in ms: connect, answer, and each wait for more data. */
  timeoutMs: number;
  /** `[glance] retries`. */
  retries: number;
  authStrategy: GlanceAuthStrategy;
  log: Logger;
  /** Pause before retry n (1-based); default 250 ms doubling, at most 2 s. Tests set 0. */
  backoffMs?: (attempt: number) => number;
}

/** Glance's answer to one request, its body read whole (JSON answers are small). */
export interface GlanceAnswer {
  status: number;
  server: string;
  body: Buffer;
}

/** Glance's error bodies (webob) run to a few hundred bytes of HTML or JSON: what is kept of one. */
const MAX_MESSAGE_CHARS = 300;
/** JSON answers larger than this are refused (an image list page of 200 images is ~400 KiB). */
const MAX_JSON_BYTES = 8 * 1024 * 1024;

/** Connection-level failures: the server was not reached, so the next one is tried. */
const UNREACHED = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'UND_ERR_CONNECT_TIMEOUT']);

/** Thrown inside an attempt: the request did not get an answer (cut, timed out, not reached). */
export class NoAnswer extends Error {
  constructor(
    message: string,
    readonly reached: boolean,
  ) {
    super(message);
  }
}

/**
 * The HTTP side of the Glance store: one undici dispatcher (connection pool) for every API server,
 * every request bounded in time, the servers tried in order when one cannot be reached, and bounded
 * retries for what a retry can mend (no answer, 5xx) on requests that may be repeated. Headers sent:
 * `X-OpenStack-Request-ID` always; with `auth_strategy = keystone` the request's token as
 * `X-Auth-Token` (nova sends only that), and the identity it came with (`X-Identity-Status:
 * Confirmed`, `X-Project-Id`, `X-User-Id`, `X-Roles`), which keystonemiddleware replaces with what
 * the token says and which a Glance pipeline without keystonemiddleware trusts.
 */
export class GlanceClient {
  readonly dispatcher: Dispatcher;
  readonly timeoutMs: number;
  readonly retries: number;
  readonly authStrategy: GlanceAuthStrategy;
  readonly apiServers: readonly string[];
  private readonly log: Logger;
  private readonly backoffMs: (attempt: number) => number;

  constructor(opts: GlanceClientOptions) {
    if (opts.apiServers.length === 0) throw new TypeError('[glance] api_servers: at least one URL is needed');
    this.apiServers = opts.apiServers;
    this.timeoutMs = opts.timeoutMs;
    this.retries = opts.retries;
    this.authStrategy = opts.authStrategy;
    this.log = opts.log;
    this.backoffMs = opts.backoffMs ?? ((n) => Math.min(2000, 250 * 2 ** (n - 1)));
    this.dispatcher = new Agent({
      connect: { timeout: opts.timeoutMs },
      headersTimeout: opts.timeoutMs,
      bodyTimeout: opts.timeoutMs,
      keepAliveTimeout: 4000,
    });
  }

  async close(): Promise<void> {
    await this.dispatcher.close();
  }

  /** The headers of a request for `auth`; GlanceAuthMissing when keystone has no token to send. */
  headers(auth: StoreRequestAuth | undefined, what: string): Record<string, string> {
    const h: Record<string, string> = {};
    if (auth?.requestId !== undefined) h['x-openstack-request-id'] = auth.requestId;
    if (this.authStrategy === 'noauth') return h;
    if (auth?.authToken === undefined) {
      throw new GlanceAuthMissing(
        `cannot ${what}: [glance] auth_strategy = keystone and this operation has no token ` +
          '(tokens are held in memory only: a request carried out again after an agent stop, or a command, has none)',
      );
    }
    h['x-auth-token'] = auth.authToken.reveal();
    h['x-identity-status'] = 'Confirmed';
    if (auth.projectId !== undefined) h['x-project-id'] = auth.projectId;
    if (auth.userId !== undefined) h['x-user-id'] = auth.userId;
    if (auth.roles !== undefined && auth.roles.length > 0) h['x-roles'] = auth.roles.join(',');
    return h;
  }

  pause(attempt: number): Promise<void> {
    const ms = this.backoffMs(attempt);
    return ms > 0 ? new Promise((resolve) => setTimeout(resolve, ms)) : Promise.resolve();
  }

  /**
   * One request with a small body (or none), its answer read whole. Retried (servers in order, then
   * again up to `retries` times) on no answer and on 5xx when `idempotent`; a request that may not
   * be repeated (a POST) is tried on the next server only when the previous one was not reached.
   * Any answer in `ok` resolves; another one throws GlanceError naming it.
   */
  async call(
    method: 'GET' | 'POST' | 'PATCH' | 'DELETE',
    path: string,
    opts: { auth: StoreRequestAuth | undefined; what: string; ok: readonly number[]; json?: unknown; contentType?: string; idempotent?: boolean; log?: Logger },
  ): Promise<GlanceAnswer> {
    const headers = this.headers(opts.auth, opts.what);
    const body = opts.json === undefined ? undefined : JSON.stringify(opts.json);
    if (body !== undefined) headers['content-type'] = opts.contentType ?? 'application/json';
    const idempotent = opts.idempotent ?? method !== 'POST';
    const log = opts.log ?? opts.auth?.log ?? this.log;
    let last: string | undefined;
    for (let attempt = 0; attempt <= this.retries; attempt++) {
      if (attempt > 0) await this.pause(attempt);
      for (const server of this.apiServers) {
        let answer: GlanceAnswer;
        try {
          answer = await this.once(server, method, path, headers, body);
        } catch (err) {
          if (!(err instanceof NoAnswer)) throw err;
          last = `${server}: ${err.message}`;
          log.warn({ glance: server, method, path, attempt }, `Glance did not answer: ${err.message}`);
          if (!err.reached) continue; // the next server
          if (!idempotent) throw new GlanceUnavailable(`cannot ${opts.what}: ${last} (not repeated: ${method} is not idempotent)`);
          break; // the next attempt
        }
        log.debug({ glance: server, method, path, status: answer.status }, 'Glance answered');
        if (opts.ok.includes(answer.status)) return answer;
        if (answer.status >= 500 && idempotent) {
          last = `${server}: ${describeAnswer(answer.status, answer.body)}`;
          log.warn({ glance: server, method, path, status: answer.status, attempt }, `Glance answered ${last}`);
          break;
        }
        throw glanceError(opts.what, answer.status, answer.body, headers['x-auth-token']);
      }
    }
    throw new GlanceUnavailable(`cannot ${opts.what}: no Glance API server answered after ${this.retries + 1} attempts (last: ${last ?? 'none'})`);
  }

  private async once(server: string, method: string, path: string, headers: Record<string, string>, body: string | undefined): Promise<GlanceAnswer> {
    const signal = AbortSignal.timeout(this.timeoutMs * 2);
    let res: Dispatcher.ResponseData;
    try {
      res = await request(`${server}${path}`, { method: method as Dispatcher.HttpMethod, headers, body, dispatcher: this.dispatcher, signal });
    } catch (err) {
      throw noAnswer(err, this.timeoutMs);
    }
    try {
      return { status: res.statusCode, server, body: await readLimited(res.body, MAX_JSON_BYTES) };
    } catch (err) {
      throw noAnswer(err, this.timeoutMs);
    }
  }

  /**
   * Sends `body` (a stream, chunked) to `server`. Resolves with the status and the answer's body
   * (read whole), whatever the status; a cut, or a server not reached, throws NoAnswer. undici's
   * header timeout is off here (it would count the time the body takes to send): the caller's
   * watchdog aborts through `signal` a server that takes no data, or does not answer, for too long.
   */
  async put(
    server: string,
    path: string,
    body: Readable,
    opts: { auth: StoreRequestAuth | undefined; what: string; contentType: string; signal: AbortSignal },
  ): Promise<GlanceAnswer> {
    const headers = { ...this.headers(opts.auth, opts.what), 'content-type': opts.contentType };
    let res: Dispatcher.ResponseData;
    try {
      res = await request(`${server}${path}`, { method: 'PUT', headers, body, dispatcher: this.dispatcher, signal: opts.signal, headersTimeout: 0 });
    } catch (err) {
      throw noAnswer(opts.signal.aborted ? (opts.signal.reason ?? err) : err, this.timeoutMs);
    }
    try {
      return { status: res.statusCode, server, body: await readLimited(res.body, MAX_JSON_BYTES) };
    } catch (err) {
      throw noAnswer(opts.signal.aborted ? (opts.signal.reason ?? err) : err, this.timeoutMs);
    }
  }

  /** GET of a (large) body as a stream, from the first server that answers 200; other answers throw GlanceError. */
  async download(path: string, opts: { auth: StoreRequestAuth | undefined; what: string }): Promise<Readable> {
    const headers = this.headers(opts.auth, opts.what);
    let last: string | undefined;
    for (const server of this.apiServers) {
      let res: Dispatcher.ResponseData;
      try {
        res = await request(`${server}${path}`, { method: 'GET', headers, dispatcher: this.dispatcher });
      } catch (err) {
        const e = noAnswer(err, this.timeoutMs);
        last = `${server}: ${e.message}`;
        if (e.reached) break;
        continue;
      }
      if (res.statusCode === 200) return res.body;
      const text = await readLimited(res.body, MAX_JSON_BYTES).catch(() => Buffer.alloc(0));
      throw glanceError(opts.what, res.statusCode, text, headers['x-auth-token']);
    }
    throw new GlanceUnavailable(`cannot ${opts.what}: ${last ?? 'no Glance API server'}`);
  }
}

/** The body whole, refusing more than `max` bytes. */
async function readLimited(body: Readable, max: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const chunk of body as AsyncIterable<Buffer>) {
    n += chunk.length;
    if (n > max) {
      body.destroy();
      throw new Error(`answer larger than ${max} bytes`);
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

/** An undici failure as NoAnswer: `reached` false when the server could not be connected to. */
export function noAnswer(err: unknown, timeoutMs: number): NoAnswer {
  if (err instanceof NoAnswer) return err;
  const code = (err as { code?: string } | null)?.code;
  const cause = (err as { cause?: { code?: string } } | null)?.cause?.code;
  if ((code !== undefined && UNREACHED.has(code)) || (cause !== undefined && UNREACHED.has(cause))) {
    return new NoAnswer(`cannot connect (${code ?? cause})`, false);
  }
  if (err instanceof undiciErrors.HeadersTimeoutError) return new NoAnswer(`no answer within ${timeoutMs / 1000} s`, true);
  if (err instanceof undiciErrors.BodyTimeoutError) return new NoAnswer(`answer stalled for ${timeoutMs / 1000} s`, true);
  if (err instanceof undiciErrors.SocketError) return new NoAnswer('connection closed by Glance', true);
  if (err instanceof Error && (err.name === 'TimeoutError' || err.name === 'AbortError')) return new NoAnswer(err.message || 'timed out', true);
  if (err instanceof Error) return new NoAnswer(`${err.message}${code !== undefined ? ` (${code})` : ''}`, true);
  return new NoAnswer(String(err), true);
}

/** Glance's message out of its error body (webob JSON, or HTML/text), on one line, trimmed. */
export function glanceMessage(body: Buffer): string {
  let text = body.toString('utf8');
  try {
    const j = JSON.parse(text) as { message?: unknown; title?: unknown; error?: { message?: unknown } };
    const m = j.message ?? j.error?.message ?? j.title;
    if (typeof m === 'string') text = m;
  } catch {
    text = text.replace(/<[^>]*>/g, ' ');
  }
  text = text.replace(/\s+/g, ' ').trim();
  return text.length > MAX_MESSAGE_CHARS ? `${text.slice(0, MAX_MESSAGE_CHARS)}…` : text;
}

export function describeAnswer(status: number, body: Buffer): string {
  const m = glanceMessage(body);
  return m === '' ? `HTTP ${status}` : `HTTP ${status}: ${m}`;
}

/** `token`: the one sent, cut out of Glance's message should the answer echo it. */
export function glanceError(what: string, status: number, body: Buffer, token?: string): GlanceError {
  let m = glanceMessage(body);
  if (token !== undefined && token.length > 0) m = m.replaceAll(token, '[redacted]');
  return new GlanceError(`cannot ${what}: Glance answered ${m === '' ? `HTTP ${status}` : `HTTP ${status}: ${m}`}`, status, m);
}
