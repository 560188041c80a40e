import { ConfigError } from '../errors.js';

/**
 * An oslo.config-style INI reader (oslo_config/iniparser.py semantics):
 * - a line is a comment only when it starts with `#` or `;`, so `pa;ss#word` stays a whole value;
 * - `key = value` or `key: value` (whichever separator comes first), key and value stripped, and one
 *   pair of matching surrounding quotes (`"…"` or `'…'`) removed from the value;
 * - a line starting with a space or tab continues the previous value (joined with "\n"); a blank
 *   line or any other line ends it;
 * - section names are case-sensitive, except that `[DEFAULT]` may be spelled in any case;
 * - a key before any section is an error; a key repeated within a file keeps its last value.
 *
 * Syntax errors never echo the offending line: it may hold a password.
 */

export interface IniEntry {
  readonly value: string;
  /** 1-based line of the key. */
  readonly line: number;
}

export interface IniSection {
  readonly name: string;
  /** 1-based line of the section's first header in the file. */
  readonly line: number;
  readonly options: Map<string, IniEntry>;
}

export interface ParsedIni {
  readonly fileName: string;
  /** Sections in order of first appearance; a section repeated in a file is merged into one. */
  readonly sections: Map<string, IniSection>;
}

export interface IniSyntaxError {
  readonly line: number;
  /** `file:line: what is wrong` */
  readonly text: string;
}

export const DEFAULT_SECTION = 'DEFAULT';

/** Parses INI text; throws one ConfigError listing every syntax error, one per line (`file:line: what`). */
export function parseIni(text: string, fileName: string): ParsedIni {
  const { ini, errors } = scanIni(text, fileName);
  if (errors.length > 0) throw new ConfigError(errors.map((e) => e.text).join('\n'));
  return ini;
}

/**
 * Like parseIni, but returns the syntax errors beside what could be parsed, so that a caller can
 * report them together with other problems. Bad lines are skipped.
 */
export function scanIni(text: string, fileName: string): { ini: ParsedIni; errors: IniSyntaxError[] } {
  const sections = new Map<string, IniSection>();
  const errors: IniSyntaxError[] = [];
  let section: IniSection | undefined;
  // After a malformed header its options are dropped silently: the header error says it all.
  let inBadSection = false;
  let pending: { key: string; lines: string[]; line: number } | undefined;

  const flush = (): void => {
    if (pending && section) section.options.set(pending.key, { value: pending.lines.join('\n'), line: pending.line });
    pending = undefined;
  };

  const lines = text.replace(/^\uFEFF/, '').split('\n');
  lines.forEach((raw, index) => {
    const lineNo = index + 1;
    const line = raw.trimEnd();
    const fail = (what: string): void => {
      errors.push({ line: lineNo, text: `${fileName}:${lineNo}: ${what}` });
    };

    if (line === '') {
      flush();
      return;
    }
    if (line.startsWith(' ') || line.startsWith('\t')) {
      if (pending) pending.lines.push(line.trimStart());
      else fail('unexpected continuation line (a line starting with whitespace must continue a value)');
      return;
    }
    flush();

    if (line.startsWith('[')) {
      section = undefined;
      inBadSection = true;
      if (!line.endsWith(']')) return fail('section header missing "]"');
      if (line.length <= 2) return fail('empty section name');
      inBadSection = false;
      let name = line.slice(1, -1);
      if (name.toUpperCase() === DEFAULT_SECTION) name = DEFAULT_SECTION;
      section = sections.get(name);
      if (!section) {
        section = { name, line: lineNo, options: new Map() };
        sections.set(name, section);
      }
      return;
    }
    if (line.startsWith('#') || line.startsWith(';')) return;

    const kv = splitKeyValue(line);
    if (!kv) return fail('no "=" or ":" in line (expected "key = value")');
    if (kv.key === '') return fail('empty option name before "=" or ":"');
    if (!section) return inBadSection ? undefined : fail(`option ${kv.key} before any [section] header`);
    pending = { key: kv.key, lines: [kv.value], line: lineNo };
  });
  flush();
  return { ini: { fileName, sections }, errors };
}

function splitKeyValue(line: string): { key: string; value: string } | undefined {
  const colon = line.indexOf(':');
  const equal = line.indexOf('=');
  if (colon < 0 && equal < 0) return undefined;
  const at = colon < 0 || (equal >= 0 && equal < colon) ? equal : colon;
  let value = line.slice(at + 1).trim();
  // oslo strips a pair only when the first and last characters are the same quote (a lone `"` too).
  if (value !== '' && (value[0] === '"' || value[0] === "'") && value[0] === value[value.length - 1]) {
    value = value.slice(1, -1);
  }
  return { key: line.slice(0, at).trim(), value };
}
