import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { inspect } from 'node:util';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { loadConfigFromText } from '../../src/config/load.js';
import { defaultConfig, rabbitOptionsSchema, type RabbitOptions } from '../../src/config/schema.js';
import { ConfigError } from '../../src/errors.js';
import { parseTransportUrl, percentDecode, redactTransportUrl, transportUrlProblem } from '../../src/config/transport-url.js';
import { tlsOptions } from '../../src/messaging/transport/rabbit-bus.js';

const SECRET = 'S3cr3t-pw';

function hosts(url: string, rabbit?: RabbitOptions) {
  return parseTransportUrl(url, rabbit).hosts.map((h) => ({
    hostname: h.hostname,
    port: h.port,
    username: h.username,
    password: h.password,
  }));
}

function problem(url: string): string {
  try {
    parseTransportUrl(url);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as ConfigError).message;
  }
  throw new Error(`expected ${url} to be refused`);
}

const rabbit = (overrides: Record<string, string> = {}): RabbitOptions => rabbitOptionsSchema.parse(overrides);

describe('parseTransportUrl: hosts and credentials', () => {
  it('reads one host with user, password, port and vhost', () => {
    const url = parseTransportUrl('rabbit://nova:pw@rabbit1.example.org:5673/nova');
    expect(url.scheme).toBe('rabbit');
    expect(hosts('rabbit://nova:pw@rabbit1.example.org:5673/nova')).toEqual([
      { hostname: 'rabbit1.example.org', port: 5673, username: 'nova', password: 'pw' },
    ]);
    expect(url.virtualHost).toBe('nova');
    expect(url.warnings).toEqual([]);
  });

  it('keeps several hosts in failover order, each with its own credentials', () => {
    expect(hosts('rabbit://a:1@h1:5672,b:2@h2:5673,c:3@10.0.0.3')).toEqual([
      { hostname: 'h1', port: 5672, username: 'a', password: '1' },
      { hostname: 'h2', port: 5673, username: 'b', password: '2' },
      { hostname: '10.0.0.3', port: 5672, username: 'c', password: '3' },
    ]);
  });

  it('gives a host without credentials guest/guest, never another host credentials (oslo + kombu)', () => {
    const url = parseTransportUrl('rabbit://nova:pw@h1,h2:5673');
    expect(hosts('rabbit://nova:pw@h1,h2:5673')).toEqual([
      { hostname: 'h1', port: 5672, username: 'nova', password: 'pw' },
      { hostname: 'h2', port: 5673, username: 'guest', password: 'guest' },
    ]);
    // oslo.messaging warns about such a mix; so do we, without the password.
    expect(url.warnings).toHaveLength(1);
    expect(url.warnings[0]).toMatch(/some hosts .* have a user and password and some do not/);
    expect(url.warnings[0]).not.toContain('pw@');
    expect(parseTransportUrl('rabbit://h1,h2').warnings).toEqual([]);
  });

  it('defaults a missing user or password to guest, as kombu does', () => {
    expect(hosts('rabbit://nova@h')[0]).toMatchObject({ username: 'nova', password: 'guest' });
    expect(hosts('rabbit://nova:@h')[0]).toMatchObject({ username: 'nova', password: 'guest' });
    expect(hosts('rabbit://:pw@h')[0]).toMatchObject({ username: 'guest', password: 'pw' });
  });

  it('uses guest@localhost:5672 when the URL names no host', () => {
    expect(hosts('rabbit://')).toEqual([{ hostname: 'localhost', port: 5672, username: 'guest', password: 'guest' }]);
    expect(hosts('rabbit:///nova')).toEqual([{ hostname: 'localhost', port: 5672, username: 'guest', password: 'guest' }]);
    expect(hosts('rabbit://u:p@:5673')).toEqual([{ hostname: 'localhost', port: 5673, username: 'u', password: 'p' }]);
  });

  it('reads bracketed IPv6 addresses, with or without a port', () => {
    expect(hosts('rabbit://u:p@[::1]:5673,[fe80::1:2]')).toEqual([
      { hostname: '::1', port: 5673, username: 'u', password: 'p' },
      { hostname: 'fe80::1:2', port: 5672, username: 'guest', password: 'guest' },
    ]);
    expect(String(parseTransportUrl('rabbit://u:p@[::1]:5673/'))).toBe('rabbit://u:***@[::1]:5673/');
  });

  it('defaults the port to 5672, or 5671 with ssl (from the query or the config), keeping an explicit port', () => {
    expect(hosts('rabbit://h')[0]!.port).toBe(5672);
    expect(hosts('rabbit://h?ssl=true')[0]!.port).toBe(5671);
    expect(hosts('rabbit://h', rabbit({ ssl: 'true' }))[0]!.port).toBe(5671);
    expect(hosts('rabbit://h:5672', rabbit({ ssl: 'true' }))[0]!.port).toBe(5672);
    expect(hosts('rabbit://h?ssl=false', rabbit({ ssl: 'true' }))[0]!.port).toBe(5672);
  });

  it('percent-decodes user and password; a password may hold ";", ":" and even a raw "@"', () => {
    expect(hosts('rabbit://us%65r:p%40ss%3Aw%2Fd%2C%23@h')[0]).toMatchObject({ username: 'user', password: 'p@ss:w/d,#' });
    expect(hosts('rabbit://user:pa;ss:wo@rd@h:5672/')[0]).toMatchObject({ username: 'user', password: 'pa;ss:wo@rd', hostname: 'h' });
    expect(hosts('rabbit://user:%E2%82%AC%zz@h')[0]!.password).toBe('€%zz');
  });
});

describe('parseTransportUrl: virtual host', () => {
  it.each([
    ['rabbit://h', '/'],
    ['rabbit://h/', '/'],
    ['rabbit://h//', '/'],
    ['rabbit://h/%2F', '/'],
    ['rabbit://h/nova', 'nova'],
    ['rabbit://h/a%20b', 'a b'],
    ['rabbit://h/nova?ssl=false', 'nova'],
    ['memory://', '/'],
    ['memory:///x', 'x'],
  ])('%s → vhost %j', (url, vhost) => {
    expect(parseTransportUrl(url).virtualHost).toBe(vhost);
  });
});

describe('parseTransportUrl: query options', () => {
  it('overrides [oslo_messaging_rabbit] with the query, keeping the other options', () => {
    const config = rabbit({ rabbit_qos_prefetch_count: '3', amqp_durable_queues: 'true' });
    const url = parseTransportUrl('rabbit://h/?ssl=true&ssl_ca_file=%2Fetc%2Fca.pem&rabbit_qos_prefetch_count=10', config);
    expect(url.options).toEqual({
      ...config,
      ssl: true,
      ssl_ca_file: '/etc/ca.pem',
      rabbit_qos_prefetch_count: 10,
    });
    expect(url.query).toEqual([
      ['ssl', 'true'],
      ['ssl_ca_file', '/etc/ca.pem'],
      ['rabbit_qos_prefetch_count', '10'],
    ]);
    expect(parseTransportUrl('rabbit://h', config).options).toEqual(config);
  });

  it('accepts every [oslo_messaging_rabbit] option, with oslo.config boolean spellings', () => {
    const url = parseTransportUrl(
      'rabbit://h?amqp_durable_queues=yes&amqp_auto_delete=1&rabbit_quorum_queue=on&heartbeat_timeout_threshold=0' +
        '&rabbit_retry_interval=0.5&rabbit_retry_backoff=1&rabbit_interval_max=5&ssl_cert_file=c&ssl_key_file=k',
    );
    expect(url.options).toMatchObject({
      amqp_durable_queues: true,
      amqp_auto_delete: true,
      rabbit_quorum_queue: true,
      heartbeat_timeout_threshold: 0,
      rabbit_retry_interval: 0.5,
      rabbit_retry_backoff: 1,
      rabbit_interval_max: 5,
      ssl_cert_file: 'c',
      ssl_key_file: 'k',
    });
  });

  it('refuses an unknown option, naming it and the known ones', () => {
    const message = problem('rabbit://u:pw@h/?ssl=true&ssl_verify=1');
    expect(message).toContain('unknown query option "ssl_verify"');
    expect(message).toContain('ssl_ca_file');
  });

  it('refuses a bad value, a repeated option and an option without a value, naming the option', () => {
    expect(problem('rabbit://h?ssl=maybe')).toMatch(/query option "ssl": bad value/);
    expect(problem('rabbit://h?rabbit_qos_prefetch_count=-1')).toMatch(/query option "rabbit_qos_prefetch_count": bad value/);
    expect(problem('rabbit://h?ssl=true&ssl=false')).toContain('query option "ssl" is given more than once');
    expect(problem('rabbit://h?ssl')).toContain('query option "ssl" has no value');
  });
});

describe('parseTransportUrl: memory://', () => {
  it('has no hosts, and takes a vhost', () => {
    const url = parseTransportUrl('memory://');
    expect(url.scheme).toBe('memory');
    expect(url.hosts).toEqual([]);
    expect(String(url)).toBe('memory:///');
    expect(String(parseTransportUrl('memory:///x'))).toBe('memory:///x');
  });

  it('refuses a host', () => {
    expect(problem('memory://somewhere')).toContain('memory:// takes no host');
  });
});

describe('parseTransportUrl: errors', () => {
  it.each([
    ['amqp://h', /unsupported scheme "amqp:\/\/"/],
    ['kafka://h', /unsupported scheme/],
    ['h:5672', /start with rabbit:\/\/ or memory:\/\//],
    ['', /start with rabbit:\/\/ or memory:\/\//],
    [`rabbit://u:${SECRET}@h:99999/`, /host 1: the port is not a number from 1 to 65535/],
    [`rabbit://u:${SECRET}@h:0/`, /host 1: the port is not a number/],
    [`rabbit://u:${SECRET}@h1,u:${SECRET}@h2:x/`, /host 2: the port is not a number/],
    [`rabbit://u:${SECRET}@::1:5672/`, /IPv6 address must be written in brackets/],
    [`rabbit://u:${SECRET}@[::1/`, /without its closing "\]"/],
    [`rabbit://u:${SECRET}@[not-v6]:5672/`, /not a valid IPv6 address/],
    [`rabbit://u:${SECRET}@[::1]x/`, /expected ":port" after "\]"/],
    [`rabbit://u:${SECRET}@bad host/`, /not a valid host name/],
    [`rabbit://u:${SECRET}/x@h/`, /"@" after the host part/],
    [`rabbit://u:${SECRET}?x@h/`, /"@" after the host part/],
    [`rabbit://u:${SECRET}@h/#frag`, /"#" is not allowed/],
  ])('%s is refused clearly, without the password', (url, expected) => {
    const message = problem(url);
    expect(message).toMatch(/^invalid transport_url: /);
    expect(message).toMatch(expected);
    expect(message).not.toContain(SECRET);
  });

  it('never echoes a password piece when a "," or "/" in it was not encoded', () => {
    for (const url of [`rabbit://user:${SECRET},x@h`, `rabbit://user:ab,${SECRET}@h`, `rabbit://user:ab/${SECRET}@h`]) {
      const message = problem(url);
      expect(message).not.toContain(SECRET);
      expect(message).not.toContain('ab');
    }
  });

  it('transportUrlProblem names the problem without the prefix, or undefined for a good URL', () => {
    expect(transportUrlProblem('rabbit://h:x')).toBe('host 1: the port is not a number from 1 to 65535');
    expect(transportUrlProblem('rabbit://h')).toBeUndefined();
  });
});

describe('redaction', () => {
  it('prints every host with its password hidden, the vhost and the query', () => {
    const url = parseTransportUrl(`rabbit://nova:${SECRET}@h1:5672,other:${SECRET}@[::1]/nova%2Fx?ssl=true`);
    const shown = 'rabbit://nova:***@h1:5672,other:***@[::1]:5671/nova%2Fx?ssl=true';
    expect(String(url)).toBe(shown);
    expect(`${url}`).toBe(shown);
    expect(JSON.stringify({ url })).toBe(JSON.stringify({ url: shown }));
    expect(JSON.stringify(url.hosts)).not.toContain(SECRET);
    expect(inspect(url)).not.toContain(SECRET);
    expect(inspect(url.hosts, { depth: 5 })).not.toContain(SECRET);
    expect(String(parseTransportUrl('rabbit://h'))).toBe('rabbit://guest:***@h:5672/');
  });

  it('redactTransportUrl hides passwords even in a URL that does not parse', () => {
    expect(redactTransportUrl(`rabbit://u:${SECRET}@h:x,v:${SECRET}@h2/vh?q=1`)).toBe('rabbit://u:***@h:x,v:***@h2/vh?q=1');
    expect(redactTransportUrl('rabbit://h1,h2/')).toBe('rabbit://h1,h2/');
  });

  it('percentDecode leaves invalid sequences as they are', () => {
    expect(percentDecode('100%')).toBe('100%');
    expect(percentDecode('%41%42c%4')).toBe('ABc%4');
  });
});

describe('config: transport options', () => {
  let tmp: DirectoryResult;
  beforeEach(async () => {
    tmp = await dir({ unsafeCleanup: true });
  });
  afterEach(async () => {
    await tmp.cleanup();
  });

  it('defaults to memory://, control exchange nova and oslo.messaging rabbit defaults', () => {
    const config = defaultConfig();
    expect(config.DEFAULT.transport_url).toBe('memory://');
    expect(config.DEFAULT.control_exchange).toBe('nova');
    expect(config.oslo_messaging_rabbit).toEqual({
      amqp_durable_queues: false,
      amqp_auto_delete: false,
      rabbit_quorum_queue: false,
      rabbit_qos_prefetch_count: 0,
      ssl: false,
      ssl_ca_file: '',
      ssl_cert_file: '',
      ssl_key_file: '',
      heartbeat_timeout_threshold: 60,
      rabbit_retry_interval: 1,
      rabbit_retry_backoff: 2,
      rabbit_interval_max: 30,
    });
  });

  it('refuses a bad transport_url at load time, naming the option and the problem, never the password', () => {
    const text = ['[DEFAULT]', `transport_url = rabbit://nova:${SECRET};x@rabbit:56x/`].join('\n');
    let message = '';
    try {
      loadConfigFromText(text, '/etc/snapshot-driver/a.conf');
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      message = (err as Error).message;
    }
    expect(message).toMatch(/^\[DEFAULT\] transport_url in \/etc\/snapshot-driver\/a\.conf:2: expected a transport URL/);
    expect(message).toContain('the port is not a number');
    expect(message).not.toContain(SECRET);
  });

  it('keeps a ";" in the password of transport_url, and resolves ssl_* files against the config folder', () => {
    const config = loadConfigFromText(
      [
        '[DEFAULT]',
        'transport_url = rabbit://nova:pa;ss@rabbit:5672/nova',
        '[oslo_messaging_rabbit]',
        'ssl = true',
        'ssl_ca_file = certs/ca.pem',
        'ssl_cert_file = /abs/cert.pem',
      ].join('\n'),
      '/etc/snapshot-driver/a.conf',
    );
    expect(parseTransportUrl(config.DEFAULT.transport_url).hosts[0]!.password).toBe('pa;ss');
    expect(config.oslo_messaging_rabbit.ssl_ca_file).toBe('/etc/snapshot-driver/certs/ca.pem');
    expect(config.oslo_messaging_rabbit.ssl_cert_file).toBe('/abs/cert.pem');
    expect(config.oslo_messaging_rabbit.ssl_key_file).toBe('');
  });

  it('refuses a control_exchange that is not an exchange name', () => {
    expect(() => loadConfigFromText('[DEFAULT]\ncontrol_exchange = a b\n', 'a.conf')).toThrow(
      /\[DEFAULT\] control_exchange = "a b" in a\.conf:2: expected 1 to 255 of/,
    );
  });

  it('builds TLS options as oslo does: verify the chain only with ssl_ca_file, never the host name', async () => {
    const ca = path.join(tmp.path, 'ca.pem');
    await writeFile(ca, 'CA PEM');
    const withCa = tlsOptions(rabbit({ ssl: 'true', ssl_ca_file: ca }));
    expect(withCa.rejectUnauthorized).toBe(true);
    expect(withCa.ca).toEqual([Buffer.from('CA PEM')]);
    expect(withCa.checkServerIdentity?.('h', {} as never)).toBeUndefined();

    const without = tlsOptions(rabbit({ ssl: 'true' }));
    expect(without.rejectUnauthorized).toBe(false);
    expect(without.ca).toBeUndefined();

    expect(() => tlsOptions(rabbit({ ssl: 'true', ssl_key_file: path.join(tmp.path, 'missing.key') }))).toThrow(
      /\[oslo_messaging_rabbit\] ssl_key_file = .*missing\.key: cannot read it/,
    );
  });
});
