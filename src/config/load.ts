import { constants as fsConstants } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import { ConfigError } from '../errors.js';
import { scanIni, type ParsedIni } from './ini.js';
import { PATH_OPTIONS, schema, type Config } from './schema.js';

/**
 * Loads the config (SPEC §7): reads the files in order (later files override per option), resolves
 * path options against the folder of the file that set them, and validates against the schema.
 * Every problem in every file is reported at once: one ConfigError, one line per problem.
 * No files: the defaults.
 */
export async function loadConfig(files: readonly string[]): Promise<Config> {
  const problems: Problem[] = [];
  const parsed: ParsedIni[] = [];
  for (const [order, file] of files.entries()) {
    const text = await readConfigFile(file).catch((err: unknown) => {
      problems.push({ order, line: 0, text: `cannot read config file ${file}: ${readFailure(err)}` });
      return undefined;
    });
    if (text === undefined) continue;
    const { ini, errors } = scanIni(text, file);
    problems.push(...errors.map(({ line, text }) => ({ order, line, text })));
    parsed.push(ini);
  }
  const config = validate(parsed, problems);
  await checkFolders(config, merge(parsed));
  return config;
}

/** Config files larger than this are refused unread (the sample, fully commented, is about 10 KiB). */
export const MAX_CONFIG_BYTES = 1024 * 1024;

/** At most this many problems are listed; the rest are counted. */
const MAX_PROBLEMS_SHOWN = 20;

/** The folder options: each must be a directory when it exists (a missing one is created on first use). */
const FOLDER_OPTIONS: ReadonlyArray<readonly [section: 'DEFAULT' | 'image_store', option: string]> = [
  ['DEFAULT', 'instances_path'],
  ['DEFAULT', 'state_path'],
  ['image_store', 'path'],
];

/**
 * Refuses folder options that name something other than a directory (a file, a device): the agent
 * would otherwise fail later with a bare ENOTDIR, or treat a file as a folder.
 */
async function checkFolders(config: Config, merged: Map<string, MergedSection>): Promise<void> {
  const problems: Problem[] = [];
  for (const [section, option] of FOLDER_OPTIONS) {
    const value = (config[section] as Record<string, unknown>)[option];
    if (typeof value !== 'string') continue;
    let what: string | undefined;
    try {
      const st = await stat(value);
      if (!st.isDirectory()) what = `it is ${fileKind(st)}`;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOTDIR') what = 'a part of its path is a file';
      // ENOENT: created on first use. Anything else (EACCES…) is reported by the operation that needs it.
    }
    if (what === undefined) continue;
    const setting = merged.get(section)?.options.get(option);
    const where = setting ? ` in ${setting.file}:${setting.line}` : ' (default value)';
    problems.push({
      order: setting?.order ?? 0,
      line: setting?.line ?? 0,
      text: `[${section}] ${option} = ${JSON.stringify(value)}${where}: expected a directory, but ${what}`,
    });
  }
  if (problems.length > 0) throw new ConfigError(formatProblems(problems));
}

function fileKind(st: import('node:fs').Stats): string {
  if (st.isFile()) return 'a file';
  if (st.isFIFO()) return 'a named pipe';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice() || st.isBlockDevice()) return 'a device';
  return 'not a directory';
}

/** One line per problem, in file and line order, without repeats; past MAX_PROBLEMS_SHOWN, a count. */
function formatProblems(problems: Problem[]): string {
  const sorted = [...problems].sort((a, b) => a.order - b.order || a.line - b.line);
  const lines = [...new Set(sorted.map((p) => p.text))];
  if (lines.length <= MAX_PROBLEMS_SHOWN) return lines.join('\n');
  return [...lines.slice(0, MAX_PROBLEMS_SHOWN), `... and ${lines.length - MAX_PROBLEMS_SHOWN} more problems`].join('\n');
}

/** Parses and validates one config file's text; `fileName` names it in errors and anchors relative paths. */
export function loadConfigFromText(text: string, fileName: string): Config {
  const { ini, errors } = scanIni(text, fileName);
  return validate([ini], errors.map(({ line, text }) => ({ order: 0, line, text })));
}

/** Merges parsed files (later override earlier, per option) and validates them. */
export function configFromIni(files: readonly ParsedIni[]): Config {
  return validate(files, []);
}

/**
 * Options whose values must never be echoed in messages or logs: passwords, and URLs that may hold
 * one (`[glance] api_servers` refuses credentials, but its error must not repeat them).
 */
export function isSecretOption(option: string): boolean {
  const name = option.toLowerCase();
  return name.includes('password') || name.includes('transport_url') || name === 'api_servers';
}

/** Every section the schema knows, with its options, in schema order. */
export function knownOptions(): ReadonlyMap<string, readonly string[]> {
  const sections = new Map<string, readonly string[]>();
  for (const [section, type] of Object.entries(schema.shape)) {
    sections.set(section, Object.keys(objectShape(type as z.ZodType) ?? {}));
  }
  return sections;
}

/** The ZodObject under default/prefault/optional/pipe wrappers, if any. */
function objectShape(type: z.ZodType): Record<string, unknown> | undefined {
  let current: unknown = type;
  for (let depth = 0; depth < 16; depth++) {
    if (current instanceof z.ZodObject) return current.shape;
    if (
      current instanceof z.ZodDefault ||
      current instanceof z.ZodPrefault ||
      current instanceof z.ZodOptional ||
      current instanceof z.ZodNullable
    ) {
      current = current.unwrap();
    } else if (current instanceof z.ZodPipe) {
      current = current.in;
    } else {
      return undefined;
    }
  }
  return undefined;
}

interface Problem {
  /** Index of the file the problem is in (for ordering). */
  order: number;
  line: number;
  text: string;
}

interface Setting {
  value: string;
  file: string;
  order: number;
  line: number;
}

interface MergedSection {
  header: { file: string; order: number; line: number };
  options: Map<string, Setting>;
}

function validate(files: readonly ParsedIni[], earlier: Problem[]): Config {
  const merged = merge(files);
  const result = schema.safeParse(rawConfig(merged), { error: describeExpected });
  const problems = [...earlier];
  if (!result.success) {
    for (const issue of result.error.issues) problems.push(...describeIssue(issue, merged));
  }
  if (problems.length > 0) throw new ConfigError(formatProblems(problems));
  if (!result.success) throw new ConfigError('invalid configuration');
  return result.data;
}

function merge(files: readonly ParsedIni[]): Map<string, MergedSection> {
  const merged = new Map<string, MergedSection>();
  files.forEach((ini, order) => {
    for (const [name, section] of ini.sections) {
      let target = merged.get(name);
      if (!target) {
        target = { header: { file: ini.fileName, order, line: section.line }, options: new Map() };
        merged.set(name, target);
      }
      for (const [option, entry] of section.options) {
        target.options.set(option, { value: entry.value, file: ini.fileName, order, line: entry.line });
      }
    }
  });
  return merged;
}

/** The merged values as the schema takes them, with path options resolved. */
function rawConfig(merged: Map<string, MergedSection>): Record<string, Record<string, string>> {
  return Object.fromEntries(
    [...merged].map(([section, { options }]) => [
      section,
      Object.fromEntries(
        [...options].map(([option, setting]) => [option, effectiveValue(section, option, setting)]),
      ),
    ]),
  );
}

function effectiveValue(section: string, option: string, setting: Setting): string {
  const isPath = PATH_OPTIONS.some(([s, o]) => s === section && o === option);
  // An empty path stays empty so that validation rejects it instead of it becoming the folder.
  if (!isPath || setting.value.trim() === '') return setting.value;
  return path.resolve(path.dirname(path.resolve(setting.file)), setting.value);
}

function describeIssue(issue: z.core.$ZodIssue, merged: Map<string, MergedSection>): Problem[] {
  const [section, option] = issue.path.map(String);
  const known = knownOptions();

  if (issue.code === 'unrecognized_keys' && section === undefined) {
    const sections = [...known.keys()];
    return issue.keys.map((name) => {
      const header = merged.get(name)?.header;
      return {
        order: header?.order ?? 0,
        line: header?.line ?? 0,
        text:
          `[${name}]${header ? ` in ${header.file}:${header.line}` : ''}: unknown section` +
          `${suggestion(name, sections)}; known sections: ${sections.join(', ')}`,
      };
    });
  }
  if (issue.code === 'unrecognized_keys' && section !== undefined && option === undefined) {
    const options = known.get(section) ?? [];
    return issue.keys.map((name) => {
      const setting = merged.get(section)?.options.get(name);
      return {
        order: setting?.order ?? 0,
        line: setting?.line ?? 0,
        text:
          `[${section}] ${name}${setting ? ` in ${setting.file}:${setting.line}` : ''}: unknown option` +
          `${suggestion(name, options)}; known options: ${options.join(', ') || '(none)'}`,
      };
    });
  }

  const expected = `expected ${issue.message}`;
  if (section === undefined) return [{ order: 0, line: 0, text: `config: ${expected}` }];
  if (option === undefined) {
    const header = merged.get(section)?.header;
    return [
      {
        order: header?.order ?? 0,
        line: header?.line ?? 0,
        text: `[${section}]${header ? ` in ${header.file}:${header.line}` : ''}: ${expected}`,
      },
    ];
  }
  const setting = merged.get(section)?.options.get(option);
  if (!setting) return [{ order: 0, line: 0, text: `[${section}] ${option} (default value): ${expected}` }];
  const shown = isSecretOption(option) ? '' : ` = ${clipped(setting.value)}`;
  return [
    {
      order: setting.order,
      line: setting.line,
      text: `[${section}] ${option}${shown} in ${setting.file}:${setting.line}: ${expected}`,
    },
  ];
}

/**
 * Per-parse error map: the expected form, as a noun phrase, for issues whose schema gave no message
 * of its own (schema messages are noun phrases too, e.g. "an integer"). It never includes the input,
 * so secrets are not echoed.
 */
function describeExpected(issue: z.core.$ZodRawIssue): string {
  switch (issue.code) {
    case 'invalid_value':
      return `one of ${issue.values.map(String).join(', ')}`;
    case 'invalid_format':
      return issue.format === 'regex' && 'pattern' in issue
        ? `a value matching ${String(issue.pattern)}`
        : `a valid ${issue.format}`;
    case 'too_small':
      if (issue.origin === 'string') {
        return Number(issue.minimum) === 1 ? 'a non-empty string' : `at least ${issue.minimum} characters`;
      }
      return `${issue.inclusive === false ? 'more than' : 'at least'} ${issue.minimum}`;
    case 'too_big':
      if (issue.origin === 'string') return `at most ${issue.maximum} characters`;
      return `${issue.inclusive === false ? 'less than' : 'at most'} ${issue.maximum}`;
    case 'invalid_type':
      return `a value of type ${issue.expected}`;
    case 'not_multiple_of':
      return `a multiple of ${issue.divisor}`;
    default:
      return 'a valid value';
  }
}

/** ` (did you mean "x"?)` when a known name is close to the unknown one, else ''. */
function suggestion(name: string, known: readonly string[]): string {
  const wanted = name.trim().toLowerCase();
  let best: { name: string; distance: number } | undefined;
  for (const candidate of known) {
    const distance = editDistance(wanted, candidate.toLowerCase());
    if (!best || distance < best.distance) best = { name: candidate, distance };
  }
  if (!best || best.distance > Math.max(2, Math.floor(best.name.length / 3))) return '';
  return ` (did you mean "${best.name}"?)`;
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const substitution = (previous[j - 1] ?? 0) + (a[i - 1] === b[j - 1] ? 0 : 1);
      current.push(Math.min((previous[j] ?? 0) + 1, (current[j - 1] ?? 0) + 1, substitution));
    }
    previous = current;
  }
  return previous[b.length] ?? 0;
}

/** A value as JSON for a message, cut short after 100 characters. */
function clipped(value: string): string {
  const text = JSON.stringify(value);
  return text.length <= 100 ? text : `${text.slice(0, 100)}… (${text.length} characters)`;
}

class ReadRefused extends Error {}

/**
 * Reads a config file: a regular file of at most MAX_CONFIG_BYTES, UTF-8. Opened non-blocking and
 * checked before reading, so that a named pipe or a device (/dev/zero) is refused at once instead of
 * blocking or being read forever.
 */
async function readConfigFile(file: string): Promise<string> {
  const fh = await open(file, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  let bytes: Buffer;
  try {
    const st = await fh.stat();
    if (st.isDirectory()) throw Object.assign(new Error('is a directory'), { code: 'EISDIR' });
    if (!st.isFile()) throw new ReadRefused(`not a regular file (it is ${fileKind(st)})`);
    if (st.size > MAX_CONFIG_BYTES) throw new ReadRefused(`${st.size} bytes, over the limit of ${MAX_CONFIG_BYTES} bytes`);
    // Read at most one byte past the limit, in case the file grew since fstat.
    const buf = Buffer.alloc(MAX_CONFIG_BYTES + 1);
    let length = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, length, buf.length - length, length);
      if (bytesRead === 0) break;
      length += bytesRead;
      if (length === buf.length) throw new ReadRefused(`over the limit of ${MAX_CONFIG_BYTES} bytes`);
    }
    bytes = buf.subarray(0, length);
  } finally {
    await fh.close();
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw new Error('not valid UTF-8 text');
  }
}

function readFailure(err: unknown): string {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  switch (code) {
    case 'ENOENT':
      return 'no such file';
    case 'EACCES':
    case 'EPERM':
      return 'permission denied';
    case 'EISDIR':
      return 'is a directory, not a file';
    case 'ENXIO':
      return 'not a regular file';
    default:
      return err instanceof Error ? err.message : String(err);
  }
}
