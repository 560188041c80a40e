import { isIPv6 } from 'node:net';
import { inspect } from 'node:util';
import { ConfigError } from '../errors.js';
import { rabbitOptionsSchema, type RabbitOptions } from './rabbit-options.js';

/**
 * `[DEFAULT] transport_url` (SPEC §5), parsed by hand because WHATWG URL cannot hold several hosts:
 *
 *   rabbit://user:pass@host:port[,user2:pass2@host2:port2]/vhost?option=value&…
 *   memory://[/vhost]
 *
 * The rules follow oslo.messaging (TransportURL.parse, then the rabbit driver and kombu):
 * - hosts are separated by ","; they are tried in the order given (failover);
 * - user and password are percent-decoded; the password may hold ":" and even "@" (the host starts
 *   after the last "@"), but "/", "?", "#" and "," must be percent-encoded;
 * - a host carries its own credentials only: a missing (or empty) user or password is "guest", as
 *   kombu makes it, whatever other hosts say (a URL mixing hosts with and without credentials gets
 *   a warning, as in oslo);
 * - IPv6 hosts are bracketed ("[::1]:5672"); the port defaults to 5672, or 5671 with ssl;
 * - no host at all means localhost;
 * - the vhost is the percent-decoded path without its leading "/": none, "/" or "//" → "/",
 *   "/nova" → "nova", "/%2F" → "/";
 * - query options are [oslo_messaging_rabbit] options and override the config file's values;
 *   an unknown one is an error.
 * Errors are ConfigErrors that never contain the password.
 */

export type TransportScheme = 'rabbit' | 'memory';

export const DEFAULT_AMQP_PORT = 5672;
export const DEFAULT_AMQPS_PORT = 5671;
const DEFAULT_CREDENTIAL = 'guest';

export class BrokerHost {
  constructor(
    readonly hostname: string,
    readonly port: number,
    readonly username: string,
    readonly password: string,
  ) {}

  /** `user:***@host:port` (IPv6 in brackets). */
  toString(): string {
    const host = this.hostname.includes(':') ? `[${this.hostname}]` : this.hostname;
    return `${encodeURIComponent(this.username)}:***@${host}:${this.port}`;
  }

  toJSON(): string {
    return this.toString();
  }

  [inspect.custom](): string {
    return `BrokerHost(${this.toString()})`;
  }
}

export class TransportUrl {
  constructor(
    readonly scheme: TransportScheme,
    /** Brokers in failover order; empty for memory://. */
    readonly hosts: readonly BrokerHost[],
    readonly virtualHost: string,
    /** [oslo_messaging_rabbit] with the URL's query options applied. */
    readonly options: RabbitOptions,
    /** The query options the URL set, in order (already applied to `options`). */
    readonly query: ReadonlyArray<readonly [name: string, value: string]>,
    /** Things oslo.messaging would warn about (no secrets in them). */
    readonly warnings: readonly string[],
  ) {}

  /** The URL with every password replaced by `***`, for logs and messages. */
  toString(): string {
    const vhost = this.virtualHost === '/' ? '' : encodeURIComponent(this.virtualHost);
    const query = this.query.map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join('&');
    return `${this.scheme}://${this.hosts.join(',')}/${vhost}${query ? `?${query}` : ''}`;
  }

  toJSON(): string {
    return this.toString();
  }

  [inspect.custom](): string {
    return `TransportUrl(${this.toString()})`;
  }
}

/**
 * Parses a transport URL; `rabbit` is the config's [oslo_messaging_rabbit] section (defaults when
 * left out), which the URL's query options override. Throws ConfigError.
 */
export function parseTransportUrl(text: string, rabbit: RabbitOptions = rabbitOptionsSchema.parse({})): TransportUrl {
  const scheme = /^([A-Za-z][A-Za-z0-9+.-]*):\/\//.exec(text);
  if (!scheme) fail('expected it to start with rabbit:// or memory://');
  const name = scheme[1]!.toLowerCase();
  if (name !== 'rabbit' && name !== 'memory') {
    fail(`unsupported scheme "${name}://": expected rabbit:// or memory://`);
  }

  const rest = text.slice(scheme[0].length);
  const netlocEnd = firstIndexOf(rest, ['/', '?', '#']);
  const netloc = rest.slice(0, netlocEnd);
  const afterNetloc = rest.slice(netlocEnd);
  if (afterNetloc.includes('@')) {
    fail('"@" after the host part: a "/", "?" or "#" in a user name or password must be percent-encoded');
  }
  if (afterNetloc.includes('#')) {
    fail('"#" is not allowed (in a password or vhost it must be percent-encoded as %23)');
  }
  const queryStart = afterNetloc.indexOf('?');
  const path = queryStart < 0 ? afterNetloc : afterNetloc.slice(0, queryStart);
  const queryText = queryStart < 0 ? '' : afterNetloc.slice(queryStart + 1);

  const query = parseQuery(queryText);
  const options = applyQuery(rabbit, query);
  const virtualHost = parseVirtualHost(path);

  if (name === 'memory') {
    if (netloc !== '') fail('memory:// takes no host (the in-process broker): use memory:// or memory:///vhost');
    return new TransportUrl('memory', [], virtualHost, options, query, []);
  }

  const defaultPort = options.ssl ? DEFAULT_AMQPS_PORT : DEFAULT_AMQP_PORT;
  const parsed = netloc
    .split(',')
    .filter((segment) => segment !== '')
    .map((segment, index) => parseHost(segment, index + 1, defaultPort));
  const hosts = parsed.length > 0 ? parsed.map((p) => p.host) : [localhost(defaultPort)];

  const warnings: string[] = [];
  const withCredentials = parsed.filter((p) => p.hasCredentials).length;
  if (withCredentials > 0 && withCredentials < parsed.length) {
    warnings.push(
      'some hosts of transport_url have a user and password and some do not; ' +
        `those without connect as "${DEFAULT_CREDENTIAL}" (hosts: ${hosts.join(', ')})`,
    );
  }
  return new TransportUrl('rabbit', hosts, virtualHost, options, query, warnings);
}

/** Why `text` is not a valid transport URL (without the password), or undefined when it is. */
export function transportUrlProblem(text: string): string | undefined {
  try {
    parseTransportUrl(text);
    return undefined;
  } catch (err) {
    if (err instanceof ConfigError) return err.message.replace(/^invalid transport_url: /, '');
    throw err;
  }
}

/**
 * Best-effort redaction of a URL-like text that may not even parse: the password part of each
 * `user:password@` becomes `***`.
 */
export function redactTransportUrl(text: string): string {
  const scheme = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//.exec(text)?.[0] ?? '';
  const rest = text.slice(scheme.length);
  const netlocEnd = firstIndexOf(rest, ['/', '?', '#']);
  const hosts = rest
    .slice(0, netlocEnd)
    .split(',')
    .map((segment) => {
      const at = segment.lastIndexOf('@');
      if (at < 0) return segment;
      const userinfo = segment.slice(0, at);
      const colon = userinfo.indexOf(':');
      return colon < 0 ? segment : `${userinfo.slice(0, colon)}:***${segment.slice(at)}`;
    });
  return scheme + hosts.join(',') + rest.slice(netlocEnd);
}

function fail(problem: string): never {
  throw new ConfigError(`invalid transport_url: ${problem}`);
}

function firstIndexOf(text: string, chars: readonly string[]): number {
  const found = chars.map((c) => text.indexOf(c)).filter((i) => i >= 0);
  return found.length > 0 ? Math.min(...found) : text.length;
}

function localhost(port: number): BrokerHost {
  return new BrokerHost('localhost', port, DEFAULT_CREDENTIAL, DEFAULT_CREDENTIAL);
}

function parseHost(
  segment: string,
  position: number,
  defaultPort: number,
): { host: BrokerHost; hasCredentials: boolean } {
  const at = segment.lastIndexOf('@');
  let username: string | undefined;
  let password: string | undefined;
  let hostPort = segment;
  if (at >= 0) {
    const userinfo = segment.slice(0, at);
    hostPort = segment.slice(at + 1);
    const colon = userinfo.indexOf(':');
    username = percentDecode(colon < 0 ? userinfo : userinfo.slice(0, colon));
    if (colon >= 0) password = percentDecode(userinfo.slice(colon + 1));
  }
  // Errors name the host by position only: when a "/", "," or "?" in a password was not
  // percent-encoded, what looks like a host or port here may be a piece of the password.
  const where = `host ${position}`;

  let hostname: string;
  let portText: string | undefined;
  if (hostPort.startsWith('[')) {
    const close = hostPort.indexOf(']');
    if (close < 0) fail(`${where}: IPv6 address without its closing "]"`);
    hostname = hostPort.slice(1, close);
    if (!isIPv6(hostname)) fail(`${where}: not a valid IPv6 address in brackets`);
    const after = hostPort.slice(close + 1);
    if (after !== '' && !after.startsWith(':')) fail(`${where}: expected ":port" after "]"`);
    portText = after === '' ? undefined : after.slice(1);
  } else {
    const colon = hostPort.indexOf(':');
    hostname = colon < 0 ? hostPort : hostPort.slice(0, colon);
    portText = colon < 0 ? undefined : hostPort.slice(colon + 1);
    if (portText?.includes(':')) fail(`${where}: an IPv6 address must be written in brackets, e.g. [::1]:5672`);
    if (hostname !== '' && !/^[A-Za-z0-9._-]+$/.test(hostname)) {
      fail(`${where}: not a valid host name or IPv4 address (allowed: A-Z a-z 0-9 . _ -)`);
    }
  }

  let port = defaultPort;
  if (portText !== undefined && portText !== '') {
    if (!/^\d{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535) {
      fail(`${where}: the port is not a number from 1 to 65535`);
    }
    port = Number(portText);
  }

  return {
    host: new BrokerHost(
      hostname === '' ? 'localhost' : hostname,
      port,
      username || DEFAULT_CREDENTIAL,
      password || DEFAULT_CREDENTIAL,
    ),
    hasCredentials: username !== undefined && password !== undefined,
  };
}

function parseVirtualHost(path: string): string {
  if (path === '') return '/';
  const vhost = percentDecode(path.slice(1));
  return vhost === '' ? '/' : vhost;
}

function parseQuery(text: string): Array<[string, string]> {
  if (text === '') return [];
  const pairs: Array<[string, string]> = [];
  for (const part of text.split('&')) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    if (eq < 0) fail(`query option "${decodeQueryPart(part)}" has no value (expected name=value)`);
    const key = decodeQueryPart(part.slice(0, eq));
    if (pairs.some(([k]) => k === key)) fail(`query option "${key}" is given more than once`);
    pairs.push([key, decodeQueryPart(part.slice(eq + 1))]);
  }
  return pairs;
}

function applyQuery(rabbit: RabbitOptions, query: ReadonlyArray<readonly [string, string]>): RabbitOptions {
  const known = rabbitOptionsSchema.shape;
  const names = Object.keys(known);
  const options: Record<string, unknown> = { ...rabbit };
  for (const [key, value] of query) {
    if (!Object.hasOwn(known, key)) {
      fail(`unknown query option "${key}"; known options (those of [oslo_messaging_rabbit]): ${names.join(', ')}`);
    }
    const result = known[key as keyof typeof known].safeParse(value);
    if (!result.success) {
      fail(`query option "${key}": bad value (${result.error.issues.map((i) => i.message).join('; ')})`);
    }
    options[key] = result.data;
  }
  return options as RabbitOptions;
}

function decodeQueryPart(text: string): string {
  return percentDecode(text.replaceAll('+', ' '));
}

/**
 * Percent-decoding as Python's urllib.parse.unquote does it: valid %XX sequences become bytes
 * (read as UTF-8), anything else, such as a lone "%", stays as it is.
 */
export function percentDecode(text: string): string {
  return text.replace(/(?:%[0-9A-Fa-f]{2})+/g, (run) =>
    Buffer.from(run.replaceAll('%', ''), 'hex').toString('utf8'),
  );
}
