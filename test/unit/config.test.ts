import os from 'node:os';
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { parseIni, type ParsedIni } from '../../src/config/ini.js';
import { isSecretOption, knownOptions, loadConfig, loadConfigFromText } from '../../src/config/load.js';
import { defaultConfig, schema, STRATEGIES } from '../../src/config/schema.js';
import { ConfigError } from '../../src/errors.js';

const SAMPLE = fileURLToPath(new URL('../../etc/snapshot-driver.conf', import.meta.url));

function value(ini: ParsedIni, section: string, option: string): string | undefined {
  return ini.sections.get(section)?.options.get(option)?.value;
}

/** The ConfigError thrown by `fn`, failing the test when it throws nothing or something else. */
async function configError(fn: () => unknown): Promise<ConfigError> {
  try {
    await fn();
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error('expected a ConfigError, but nothing was thrown');
}

/** Sections and options of the schema, read through zod's own JSON Schema export (independent of load.ts). */
function schemaOptions(): Map<string, string[]> {
  const json = z.toJSONSchema(schema, { io: 'input', unrepresentable: 'any' }) as {
    properties: Record<string, { properties?: Record<string, unknown> }>;
  };
  return new Map(Object.entries(json.properties).map(([s, v]) => [s, Object.keys(v.properties ?? {})]));
}

describe('parseIni', () => {
  it('keeps ";" and "#" inside values', () => {
    const ini = parseIni(
      ['[DEFAULT]', 'password = pa;ss#word', 'other: a # b ; c', 'url = rabbit://u:p;w@h:5672/'].join('\n'),
      'a.conf',
    );
    expect(value(ini, 'DEFAULT', 'password')).toBe('pa;ss#word');
    expect(value(ini, 'DEFAULT', 'other')).toBe('a # b ; c');
    // "=" comes before ":" so the key is "url" and the colons stay in the value.
    expect(value(ini, 'DEFAULT', 'url')).toBe('rabbit://u:p;w@h:5672/');
  });

  it('skips lines starting with "#" or ";" and blank lines', () => {
    const ini = parseIni(
      ['# leading comment', '; another', '', '[snapshot]', '#strategy = cold', ';name_prefix = x', 'strategy = cold'].join(
        '\n',
      ),
      'a.conf',
    );
    expect([...ini.sections.keys()]).toEqual(['snapshot']);
    expect([...ini.sections.get('snapshot')!.options.keys()]).toEqual(['strategy']);
    expect(ini.sections.get('snapshot')!.options.get('strategy')).toEqual({ value: 'cold', line: 7 });
  });

  it('strips spaces and one pair of matching quotes, as oslo.config does', () => {
    const ini = parseIni(
      ['[s]', 'a =   spaced out   ', 'b = "  keep inner spaces "', "c = 'single'", 'd = "mismatched\'', 'e =', 'f = ""'].join(
        '\n',
      ),
      'a.conf',
    );
    expect(value(ini, 's', 'a')).toBe('spaced out');
    expect(value(ini, 's', 'b')).toBe('  keep inner spaces ');
    expect(value(ini, 's', 'c')).toBe('single');
    expect(value(ini, 's', 'd')).toBe('"mismatched\'');
    expect(value(ini, 's', 'e')).toBe('');
    expect(value(ini, 's', 'f')).toBe('');
  });

  it('appends continuation lines with a newline until a blank or unindented line', () => {
    const ini = parseIni(
      ['[s]', 'multi = first', '    second', '\tthird ; not a comment', '', 'next = x', 'after: y', '  more'].join('\n'),
      'a.conf',
    );
    expect(ini.sections.get('s')!.options.get('multi')).toEqual({ value: 'first\nsecond\nthird ; not a comment', line: 2 });
    expect(value(ini, 's', 'next')).toBe('x');
    expect(value(ini, 's', 'after')).toBe('y\nmore');
  });

  it('keeps the last value of a repeated key and merges a repeated section', () => {
    const ini = parseIni(['[s]', 'k = 1', '[t]', 'z = 0', '[s]', 'k = 2', 'j = 3'].join('\n'), 'a.conf');
    expect(ini.sections.get('s')!.options.get('k')).toEqual({ value: '2', line: 6 });
    expect(value(ini, 's', 'j')).toBe('3');
    expect(ini.sections.get('s')!.line).toBe(1);
  });

  it('treats section names case-sensitively, except DEFAULT', () => {
    const ini = parseIni(['[default]', 'a = 1', '[Snapshot]', 'b = 2', '[snapshot]', 'c = 3'].join('\n'), 'a.conf');
    expect([...ini.sections.keys()]).toEqual(['DEFAULT', 'Snapshot', 'snapshot']);
    expect(value(ini, 'DEFAULT', 'a')).toBe('1');
  });

  it('accepts CRLF line endings and a byte-order mark', () => {
    const ini = parseIni('\uFEFF[s]\r\nk = v\r\n  w\r\n', 'a.conf');
    expect(value(ini, 's', 'k')).toBe('v\nw');
  });

  it('reports every malformed line with file:line, without echoing the line', async () => {
    const text = [
      'orphan = 1', // 1: before any section
      '[DEFAULT', // 2: missing ]
      '[]', // 3: empty section name
      '[s]', // 4
      'password pa;ss', // 5: no "=" or ":"
      '= value', // 6: empty key
      '', // 7
      '  dangling', // 8: continuation with nothing to continue
    ].join('\n');
    const err = await configError(() => parseIni(text, '/etc/bad.conf'));
    const lines = err.message.split('\n');
    expect(lines).toHaveLength(6);
    expect(lines[0]).toMatch(/^\/etc\/bad\.conf:1: option orphan before any \[section\]/);
    expect(lines[1]).toMatch(/^\/etc\/bad\.conf:2: .*missing "\]"/);
    expect(lines[2]).toMatch(/^\/etc\/bad\.conf:3: empty section name/);
    expect(lines[3]).toMatch(/^\/etc\/bad\.conf:5: no "=" or ":" in line/);
    expect(lines[4]).toMatch(/^\/etc\/bad\.conf:6: empty option name/);
    expect(lines[5]).toMatch(/^\/etc\/bad\.conf:8: unexpected continuation line/);
    expect(err.message).not.toContain('pa;ss');
    expect(err.exitCode).toBe(2);
  });
});

describe('knownOptions', () => {
  it('lists every section and option of the schema', () => {
    expect(new Map([...knownOptions()].map(([s, o]) => [s, [...o]]))).toEqual(schemaOptions());
    expect(knownOptions().get('snapshot')).toContain('strategy');
  });

  it('marks password and transport_url options as secret', () => {
    expect(isSecretOption('rabbit_password')).toBe(true);
    expect(isSecretOption('transport_url')).toBe(true);
    expect(isSecretOption('strategy')).toBe(false);
  });
});

describe('loadConfig', () => {
  let tmp: DirectoryResult;
  beforeEach(async () => {
    tmp = await dir({ unsafeCleanup: true });
  });
  afterEach(async () => {
    await tmp.cleanup();
  });

  async function file(relative: string, lines: string[]): Promise<string> {
    const full = path.join(tmp.path, relative);
    await mkdir(path.dirname(full), { recursive: true });
    await writeFile(full, lines.join('\n') + '\n');
    return full;
  }

  it('gives the defaults when there are no files', async () => {
    expect(await loadConfig([])).toEqual(defaultConfig());
  });

  it('types the values it reads', async () => {
    const f = await file('a.conf', [
      '[DEFAULT]',
      'max_concurrent_snapshots = 7',
      'debug = Yes',
      '[snapshot]',
      'strategy = deferred-delete',
      '[hypervisor]',
      'qmp_timeout = 2.5',
    ]);
    const config = await loadConfig([f]);
    expect(config.DEFAULT.max_concurrent_snapshots).toBe(7);
    expect(config.DEFAULT.debug).toBe(true);
    expect(config.snapshot.strategy).toBe('deferred-delete');
    expect(config.hypervisor.qmp_timeout).toBe(2.5);
    expect(config.image_store).toEqual(defaultConfig().image_store);
  });

  it("[hypervisor] running_export_rate_mb: 100 MiB/s unless set; 0 (unlimited) or more", async () => {
    expect(defaultConfig().hypervisor.running_export_rate_mb).toBe(100);
    expect((await loadConfig([await file('r0.conf', ['[hypervisor]', 'running_export_rate_mb = 0'])])).hypervisor.running_export_rate_mb).toBe(0);
    const f = await file('r.conf', ['[hypervisor]', 'running_export_rate_mb = -5']);
    const err = await configError(() => loadConfig([f]));
    expect(err.message.startsWith(`[hypervisor] running_export_rate_mb = "-5" in ${f}:2: expected`)).toBe(true);
  });

  it('[DEFAULT] agent_cpus: none unless set; a CPU list of this host, each problem named', async () => {
    expect(defaultConfig().DEFAULT.agent_cpus).toBe('');
    const last = os.cpus().length - 1;
    const ok = await file('c0.conf', ['[DEFAULT]', `agent_cpus = 0-${last},0`]);
    expect((await loadConfig([ok])).DEFAULT.agent_cpus).toBe(`0-${last},0`);
    const cases: [string, string][] = [
      ['two', 'a CPU list such as 3 or 2-3,6 (taskset -c), or nothing'],
      ['1-0', '1-0 runs backwards'],
      [String(last + 1), `CPU ${last + 1} is not on this host (it has CPUs 0-${last})`],
    ];
    for (const [value, problem] of cases) {
      const f = await file(`c-${value}.conf`, ['[DEFAULT]', `agent_cpus = ${value}`]);
      const err = await configError(() => loadConfig([f]));
      expect(err.message).toContain(`[DEFAULT] agent_cpus = "${value}" in ${f}:2: `);
      expect(err.message).toContain(problem);
    }
  });

  it('names a missing file and the reason', async () => {
    const missing = path.join(tmp.path, 'nope.conf');
    const err = await configError(() => loadConfig([missing]));
    expect(err.message).toBe(`cannot read config file ${missing}: no such file`);
    expect(err.exitCode).toBe(2);
  });

  it('names a folder given as a config file', async () => {
    const err = await configError(() => loadConfig([tmp.path]));
    expect(err.message).toBe(`cannot read config file ${tmp.path}: is a directory, not a file`);
  });

  it('names a file that is not UTF-8 text', async () => {
    const f = path.join(tmp.path, 'binary.conf');
    await writeFile(f, Buffer.from([0x5b, 0x44, 0xff, 0xfe, 0x5d, 0x0a]));
    const err = await configError(() => loadConfig([f]));
    expect(err.message).toBe(`cannot read config file ${f}: not valid UTF-8 text`);
  });

  it('rejects an unknown option, suggesting the nearest known one', async () => {
    const f = await file('a.conf', ['[snapshot]', 'stratgy = cold']);
    const err = await configError(() => loadConfig([f]));
    expect(err.message).toBe(
      `[snapshot] stratgy in ${f}:2: unknown option (did you mean "strategy"?); known options: strategy, name_prefix, quiesce, max_freeze_seconds, guest_agent_timeout`,
    );
  });

  it('suggests nothing when no known option is close', async () => {
    const err = await configError(() => loadConfigFromText('[snapshot]\ncompletely_different = 1\n', 'x.conf'));
    expect(err.message).toBe(
      '[snapshot] completely_different in x.conf:2: unknown option; known options: strategy, name_prefix, quiesce, max_freeze_seconds, guest_agent_timeout',
    );
  });

  it('rejects an unknown section, suggesting the nearest known one', async () => {
    const err = await configError(() => loadConfigFromText('[DEFAULT]\n\n[image-store]\npath = /x\n', 'x.conf'));
    expect(err.message).toBe(
      `[image-store] in x.conf:3: unknown section (did you mean "image_store"?); known sections: ${[
        ...schemaOptions().keys(),
      ].join(', ')}`,
    );
  });

  it('rejects a bad value, naming section, option, value, place and expected form', async () => {
    const f = await file('x.conf', ['[DEFAULT]', 'debug = false', '[snapshot]', 'strategy = bogus']);
    const err = await configError(() => loadConfig([f]));
    expect(err.message).toBe(
      `[snapshot] strategy = "bogus" in ${f}:4: expected one of ${STRATEGIES.join(', ')}`,
    );
  });

  it('describes the expected form of numbers, booleans and patterns', () => {
    const text = [
      '[DEFAULT]',
      'max_concurrent_snapshots = 0',
      'debug = maybe',
      'host =',
      '[snapshot]',
      'name_prefix = has space',
      '[image_store]',
      'reserved_space_mb = lots',
    ].join('\n');
    const lines = (() => {
      try {
        loadConfigFromText(text, 'x.conf');
      } catch (err) {
        return (err as Error).message.split('\n');
      }
      return [];
    })();
    expect(lines).toEqual([
      '[DEFAULT] max_concurrent_snapshots = "0" in x.conf:2: expected at least 1',
      expect.stringMatching(/^\[DEFAULT\] debug = "maybe" in x\.conf:3: expected one of .*\btrue\b.*\bfalse\b/),
      '[DEFAULT] host = "" in x.conf:4: expected a non-empty string',
      '[snapshot] name_prefix = "has space" in x.conf:6: expected 1 to 32 of A-Z a-z 0-9 . _ -',
      '[image_store] reserved_space_mb = "lots" in x.conf:8: expected an integer',
    ]);
  });

  it('shows a multi-line value escaped, keeping one line per problem', () => {
    expect(() => loadConfigFromText('[snapshot]\nstrategy = cold\n  more\n', 'x.conf')).toThrow(
      /^\[snapshot\] strategy = "cold\\nmore" in x\.conf:2: expected one of [^\n]*$/,
    );
  });

  it('never echoes the value of a password or transport_url option', async () => {
    const err = await configError(() =>
      loadConfigFromText('[DEFAULT]\ntransport_url = rabbit://u:s3cr;et@h:x/\n[x]\nrabbit_password = s3cr;et\n', 'x.conf'),
    );
    expect(err.message).toContain('[DEFAULT] transport_url in x.conf:2');
    expect(err.message).not.toContain('s3cr');
  });

  it('reports all problems of all files at once, in file and line order', async () => {
    const a = await file('a.conf', ['[snapshot]', 'strategy = bogus', 'oops', '[hypervisor]', 'driver = xen']);
    const missing = path.join(tmp.path, 'missing.conf');
    const b = await file('b.conf', ['[image_store]', 'reserved_space_mb = -1', 'colour = blue']);
    const err = await configError(() => loadConfig([a, missing, b]));
    expect(err.message.split('\n')).toEqual([
      `[snapshot] strategy = "bogus" in ${a}:2: expected one of ${STRATEGIES.join(', ')}`,
      `${a}:3: no "=" or ":" in line (expected "key = value")`,
      expect.stringMatching(/^\[hypervisor\] driver = "xen" in .*a\.conf:5: expected one of qemu\b/),
      `cannot read config file ${missing}: no such file`,
      `[image_store] reserved_space_mb = "-1" in ${b}:2: expected at least 0`,
      `[image_store] colour in ${b}:3: unknown option; known options: path, reserved_space_mb, os_hash_algo, backend`,
    ]);
  });

  it('drops the options under a malformed section header instead of filing them elsewhere', () => {
    expect(() => loadConfigFromText('[snapshot]\nstrategy = cold\n[image_store\nbogus = 1\n', 'x.conf')).toThrow(
      /^x\.conf:3: section header missing "\]"$/,
    );
  });

  it('lets a later file override an earlier one, option by option', async () => {
    const a = await file('a.conf', ['[DEFAULT]', 'max_concurrent_snapshots = 2', 'debug = true', '[snapshot]', 'strategy = cold']);
    const b = await file('b.conf', ['[snapshot]', 'strategy = double-suspend', '[DEFAULT]', 'debug = false']);
    const config = await loadConfig([a, b]);
    expect(config.snapshot.strategy).toBe('double-suspend');
    expect(config.DEFAULT.debug).toBe(false);
    expect(config.DEFAULT.max_concurrent_snapshots).toBe(2);
    expect((await loadConfig([b, a])).snapshot.strategy).toBe('cold');
  });

  it('a bad value overridden by a later file is no error', async () => {
    const a = await file('a.conf', ['[snapshot]', 'strategy = bogus']);
    const b = await file('b.conf', ['[snapshot]', 'strategy = cold']);
    expect((await loadConfig([a, b])).snapshot.strategy).toBe('cold');
  });

  it("resolves relative paths against the folder of the file that set them", async () => {
    const a = await file('one/a.conf', ['[DEFAULT]', 'instances_path = inst', 'state_path = /abs/state', '[image_store]', 'path = img']);
    const b = await file('two/deeper/b.conf', ['[image_store]', 'path = ../images']);
    const config = await loadConfig([a, b]);
    expect(config.DEFAULT.instances_path).toBe(path.join(tmp.path, 'one', 'inst'));
    expect(config.DEFAULT.state_path).toBe('/abs/state');
    expect(config.image_store.path).toBe(path.join(tmp.path, 'two', 'images'));
    // Non-path options are left alone.
    const c = await file('three/c.conf', ['[hypervisor]', 'qemu_img = bin/qemu-img']);
    expect((await loadConfig([c])).hypervisor.qemu_img).toBe('bin/qemu-img');
  });

  it('rejects an empty path instead of resolving it to the folder', () => {
    expect(() => loadConfigFromText('[image_store]\npath =\n', '/etc/x.conf')).toThrow(
      '[image_store] path = "" in /etc/x.conf:2: expected a non-empty string',
    );
  });
});

describe('the sample etc/snapshot-driver.conf', () => {
  it('sets exactly every option the schema knows', async () => {
    const { readFile } = await import('node:fs/promises');
    const ini = parseIni(await readFile(SAMPLE, 'utf8'), SAMPLE);
    const inSample = new Map([...ini.sections].map(([s, sec]) => [s, [...sec.options.keys()].sort()]));
    const inSchema = new Map([...schemaOptions()].map(([s, o]) => [s, [...o].sort()]));
    expect(inSample).toEqual(inSchema);
  });

  it('sets every option to its default (host to a placeholder)', async () => {
    const defaults = defaultConfig();
    expect(await loadConfig([SAMPLE])).toEqual({ ...defaults, DEFAULT: { ...defaults.DEFAULT, host: 'compute-1' } });
  });

  it('documents every option, with its default, in a comment above it', async () => {
    const { readFile } = await import('node:fs/promises');
    const lines = (await readFile(SAMPLE, 'utf8')).split('\n');
    const undocumented: string[] = [];
    lines.forEach((line, i) => {
      if (/^[#;[\s]/.test(line) || line === '') return;
      const comment: string[] = [];
      for (let j = i - 1; j >= 0 && lines[j]!.startsWith('#'); j--) comment.unshift(lines[j]!);
      const text = comment.join('\n');
      if (!/Default:/.test(text) || !/Form:/.test(text)) undocumented.push(line);
    });
    expect(undocumented).toEqual([]);
  });
});
