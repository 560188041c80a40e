/**
 * Prints the hostile-input corpus as a markdown table (for the closing note of issue 5):
 *
 *   npx tsx test/hostile/print-table.ts
 */
import { CORPUS, EXISTING_IMAGE, NEW_IMAGE, RUNNING_GUEST, SANDBOX_INI, SHUTOFF_GUEST, UNKNOWN_UUID, assertUniqueIds, type HostileCase } from './corpus.js';

/** The fixture uuids, by name (the table explains them once). */
const LABELS: Array<[string, string]> = [
  [RUNNING_GUEST, '<running>'],
  [SHUTOFF_GUEST, '<shutoff>'],
  [EXISTING_IMAGE, '<existing-image>'],
  [NEW_IMAGE, '<new-id>'],
  [UNKNOWN_UUID, '<unknown>'],
];

function labelled(s: string): string {
  return LABELS.reduce((text, [uuid, label]) => text.replaceAll(uuid, label), s);
}

const MAX_INPUT = 110;

function shorten(s: string, max = MAX_INPUT): string {
  return s.length <= max ? s : `${s.slice(0, max - 1)}…`;
}

/** A table cell: one line, pipes escaped, in a code span when it can be. */
function cell(s: string, code = true): string {
  const line = s.replace(/\r?\n/g, '⏎').replace(/\|/g, '\\|');
  return code && !line.includes('`') ? `\`${line}\`` : line;
}

function argv(args: readonly string[]): string {
  return args.map((a) => (a === '' || /[\s"'\\]/.test(a) || /[^\x20-\x7e]/.test(a) ? JSON.stringify(a) : a)).join(' ');
}

function input(c: HostileCase): string {
  switch (c.kind) {
    case 'rpc': {
      const route = c.input.route === 'fanout' ? ' → compute_fanout' : c.input.route === 'server' ? ' → compute.<host>' : '';
      const props = c.input.properties ? ` (${Object.entries(c.input.properties).map(([k, v]) => `${k}: ${String(v)}`).join(', ')})` : '';
      return shorten(labelled(c.input.shown), 120) + route + props;
    }
    case 'config': {
      const command = c.input.command ? ` (then: ${argv(c.input.command)})` : '';
      const f = c.input.file;
      if (f) return ('path' in f ? `--config-file ${f.path}` : `--config-file <${f.special === 'missing' ? 'a missing file' : f.special === 'fifo' ? 'a named pipe' : 'a directory'}>`) + command;
      const ini = c.input.ini ?? '';
      if (typeof ini !== 'string') return `${ini.length} bytes of binary garbage${command}`;
      const hostile = ini.endsWith(`\n${SANDBOX_INI}`) ? ini.slice(0, -SANDBOX_INI.length - 1) : ini;
      const text = hostile.length > 200 ? `${hostile.slice(0, 60)}… (${hostile.length} chars)` : hostile;
      return shorten(text) + command;
    }
    case 'cli': {
      const args = c.input.argv.map((a) => (a.length > 60 ? `${a.slice(0, 12)}…(${a.length} chars)` : labelled(a)));
      return shorten(`${c.input.noConfig ? '' : '… '}${argv(args)}`);
    }
  }
}

/** The expected message pattern, unescaped enough to read. */
function pattern(re: RegExp): string {
  return re.source.replace(/\\([.\\/()[\]{}?*+^$|"'-])/g, '$1').replace(/\\n/g, '⏎');
}

function expected(c: HostileCase): string {
  const message = shorten(labelled(pattern(c.expect.message)), 120);
  if (c.kind === 'rpc') return `${c.expect.class}${c.expect.reply ? ' (reply)' : ' (log)'}: ${message}`;
  return `exit ${c.expect.exitCode}, ${c.expect.class}: ${message}`;
}

assertUniqueIds();
const counts = { rpc: 0, config: 0, cli: 0 };
for (const c of CORPUS) counts[c.kind]++;

const out: string[] = [
  `Hostile-input corpus: ${CORPUS.length} cases (${counts.rpc} rpc, ${counts.config} config, ${counts.cli} cli).`,
  'rpc: "(reply)" = the caller gets a failure reply of that class; "(log)" = no reply address, the server logs the refusal.',
  'rpc inputs leave out version 6.0, _unique_id and the reply address when they hold their usual values.',
  'cli: "…" = --config-file <sandbox config>.',
  `Fixtures: ${LABELS.map(([uuid, label]) => `${label} = ${uuid}`).join(', ')}.`,
  '',
  '| id | kind | input (shortened) | expected error |',
  '|---|---|---|---|',
  ...CORPUS.map((c) => `| ${c.id} | ${c.kind} | ${cell(input(c))} | ${cell(expected(c), false)} |`),
];
process.stdout.write(`${out.join('\n')}\n`);
