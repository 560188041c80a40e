import { describe, expect, it } from 'vitest';
import { formatListenAddress, parseListenAddress } from '../../src/config/listen-address.js';
import { loadConfigFromText } from '../../src/config/load.js';
import { defaultConfig } from '../../src/config/schema.js';
import { ConfigError } from '../../src/errors.js';

/** `[metrics] listen = <value>` through the whole config path. */
function listen(value: string) {
  return loadConfigFromText(`[metrics]\nlisten = ${value}\n`, 'm.conf').metrics.listen;
}

function problemWith(value: string): string {
  try {
    listen(value);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as Error).message;
  }
  throw new Error(`expected ${JSON.stringify(value)} to be refused`);
}

describe('[metrics] listen', () => {
  it('defaults to 127.0.0.1:9464', () => {
    expect(defaultConfig().metrics.listen).toEqual({ host: '127.0.0.1', port: 9464 });
    expect(loadConfigFromText('[DEFAULT]\ndebug = false\n', 'm.conf').metrics.listen).toEqual({ host: '127.0.0.1', port: 9464 });
  });

  it.each([
    ['127.0.0.1:9464', { host: '127.0.0.1', port: 9464 }],
    ['0.0.0.0:9100', { host: '0.0.0.0', port: 9100 }],
    ['10.1.2.3:65535', { host: '10.1.2.3', port: 65535 }],
    ['localhost:0', { host: 'localhost', port: 0 }],
    ['compute-1.mgmt.example.org:9464', { host: 'compute-1.mgmt.example.org', port: 9464 }],
    ['[::1]:9464', { host: '::1', port: 9464 }],
    ['[::]:9464', { host: '::', port: 9464 }],
    ['[fd00:1:2::3]:8080', { host: 'fd00:1:2::3', port: 8080 }],
    ['  127.0.0.1:9464  ', { host: '127.0.0.1', port: 9464 }],
  ])('takes %s', (value, expected) => {
    expect(listen(value)).toEqual(expected);
  });

  it('is off when empty', () => {
    expect(listen('')).toBeNull();
    expect(listen('   ')).toBeNull();
    expect(parseListenAddress('')).toBeNull();
  });

  it.each([
    ['9464', 'no :port'],
    ['127.0.0.1', 'no :port'],
    [':9464', 'no host; 0.0.0.0 or [::] listens on every interface'],
    ['::1:9464', 'an IPv6 address must be written in brackets, as [::1]:9464'],
    ['[::1]', 'an IPv6 address in brackets must be followed by :port'],
    ['[::1]9464', 'an IPv6 address in brackets must be followed by :port'],
    ['[127.0.0.1]:9464', 'not an IPv6 address inside the brackets'],
    ['[localhost]:9464', 'not an IPv6 address inside the brackets'],
    ['256.1.1.1:9464', 'not an IPv4 address'],
    ['1.2.3:9464', 'not an IPv4 address'],
    ['host name:9464', 'not an IP address nor a host name'],
    ['-bad-.example:9464', 'not an IP address nor a host name'],
    ['http://127.0.0.1:9464', 'a host and a port, not a URL nor a path'],
    ['127.0.0.1:65536', 'the port is not a number from 0 to 65535'],
    ['127.0.0.1:-1', 'the port is not a number from 0 to 65535'],
    ['127.0.0.1:+80', 'the port is not a number from 0 to 65535'],
    ['127.0.0.1:http', 'the port is not a number from 0 to 65535'],
    ['127.0.0.1:', 'the port is not a number from 0 to 65535'],
    ['127.0.0.1:9464/metrics', 'a host and a port, not a URL nor a path'],
  ])('refuses %s, naming [metrics] listen, the place, the expected form and the problem', (value, problem) => {
    expect(problemWith(value)).toBe(
      `[metrics] listen = ${JSON.stringify(value)} in m.conf:2: expected host:port such as 127.0.0.1:9464, [::1]:9464 ` +
        `(an IPv6 address in brackets) or 0.0.0.0:9464 (every interface), or empty (off) (${problem})`,
    );
  });

  it('refuses an unknown option of [metrics]', () => {
    expect(() => loadConfigFromText('[metrics]\nlisten_port = 9464\n', 'm.conf')).toThrow(/^\[metrics\] listen_port in m\.conf:2: unknown option; known options: listen$/);
    expect(() => loadConfigFromText('[metrics]\nlistne = 127.0.0.1:9464\n', 'm.conf')).toThrow(/^\[metrics\] listne in m\.conf:2: unknown option \(did you mean "listen"\?\); known options: listen$/);
  });

  it('formats an address back, an IPv6 host in brackets', () => {
    expect(formatListenAddress({ host: '::1', port: 9464 })).toBe('[::1]:9464');
    expect(formatListenAddress({ host: '127.0.0.1', port: 0 })).toBe('127.0.0.1:0');
  });
});
