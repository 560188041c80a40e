import { isIPv4, isIPv6 } from 'node:net';

/** Where a server listens: a host (an IPv4 or IPv6 address without brackets, or a host name) and a port. */
export interface ListenAddress {
  host: string;
  /** 0: a free port the kernel picks (the agent logs which). */
  port: number;
}

/** What `[metrics] listen` takes, for messages. */
export const LISTEN_FORM =
  'host:port such as 127.0.0.1:9464, [::1]:9464 (an IPv6 address in brackets) or 0.0.0.0:9464 (every interface), or empty (off)';

const LABEL = '[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?';
const HOST_NAME = new RegExp(`^(?=.{1,253}$)${LABEL}(?:\\.${LABEL})*$`);

/**
 * Parses a `host:port` listen address (`[metrics] listen`): `127.0.0.1:9464`, `[::1]:9464`,
 * `localhost:9464`; empty (or only spaces) means off (null). Anything else: `{ problem }`, saying
 * what is wrong without echoing the value.
 */
export function parseListenAddress(text: string): ListenAddress | null | { problem: string } {
  const value = text.trim();
  if (value === '') return null;
  if (value.includes('/')) return { problem: 'a host and a port, not a URL nor a path' };
  let host: string;
  let port: string;
  if (value.startsWith('[')) {
    const m = /^\[([^\]]*)\]:([^:]*)$/.exec(value);
    if (!m) return { problem: 'an IPv6 address in brackets must be followed by :port' };
    host = m[1]!;
    port = m[2]!;
    if (!isIPv6(host)) return { problem: 'not an IPv6 address inside the brackets' };
  } else {
    const colon = value.lastIndexOf(':');
    if (colon < 0) return { problem: 'no :port' };
    host = value.slice(0, colon);
    port = value.slice(colon + 1);
    if (host.includes(':')) return { problem: 'an IPv6 address must be written in brackets, as [::1]:9464' };
    if (host === '') return { problem: 'no host; 0.0.0.0 or [::] listens on every interface' };
    if (/^[\d.]+$/.test(host)) {
      if (!isIPv4(host)) return { problem: 'not an IPv4 address' };
    } else if (!HOST_NAME.test(host)) {
      return { problem: 'not an IP address nor a host name' };
    }
  }
  if (!/^\d{1,5}$/.test(port) || Number(port) > 65_535) return { problem: 'the port is not a number from 0 to 65535' };
  return { host, port: Number(port) };
}

/** `host:port`, an IPv6 host in brackets. */
export function formatListenAddress(a: ListenAddress): string {
  return `${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}
