/**
 * A strict reader of the Prometheus text exposition format (version 0.0.4), for the metrics tests:
 * every line is a `# HELP name text`, a `# TYPE name type`, another comment, blank, or a sample
 * `name{label="value",…} value [timestamp]`. Anything else throws, naming the line. Every sample
 * belongs to a family declared by a TYPE line before it (a histogram's `_bucket`, `_sum` and
 * `_count`, a summary's `_sum`, `_count` and quantiles), no series appears twice, and a histogram's
 * buckets are cumulative and end with `le="+Inf"` equal to its `_count`.
 */

const NAME = '[a-zA-Z_:][a-zA-Z0-9_:]*';
const LABEL_NAME = '[a-zA-Z_][a-zA-Z0-9_]*';
const LABEL_VALUE = '"(?:[^"\\\\\\n]|\\\\[\\\\"n])*"';
const LABEL = `${LABEL_NAME}=${LABEL_VALUE}`;
/** What Go's ParseFloat takes (the format's definition): NaN and Inf in any case (prom-client writes "Nan"). */
const VALUE = '[+-]?(?:\\d+(?:\\.\\d*)?(?:[eE][+-]?\\d+)?|\\.\\d+(?:[eE][+-]?\\d+)?|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?|[nN][aA][nN])';
const SAMPLE = new RegExp(`^(${NAME})(?:\\{((?:${LABEL}(?:,${LABEL})*)?,?)\\})? (${VALUE})(?: -?\\d+)?$`);
const HELP = new RegExp(`^# HELP (${NAME})(?: .*)?$`);
const TYPE = new RegExp(`^# TYPE (${NAME}) (counter|gauge|histogram|summary|untyped)$`);
const ONE_LABEL = new RegExp(`(${LABEL_NAME})=(${LABEL_VALUE})`, 'g');

export type MetricType = 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';

export interface Exposition {
  /** Every sample, keyed by its series: `name{a="x",b="y"}` (labels sorted by name), or `name`. */
  samples: Map<string, number>;
  /** Every family's declared type. */
  types: Map<string, MetricType>;
}

function parseValue(text: string): number {
  if (/^[+-]?nan$/i.test(text)) return Number.NaN;
  if (/^[+]?inf(inity)?$/i.test(text)) return Number.POSITIVE_INFINITY;
  if (/^-inf(inity)?$/i.test(text)) return Number.NEGATIVE_INFINITY;
  return Number(text);
}

function unescape(quoted: string): string {
  return quoted.slice(1, -1).replace(/\\([\\"n])/g, (_, c: string) => (c === 'n' ? '\n' : c));
}

/** The series key of a name and its labels (sorted by label name). */
export function seriesKey(name: string, labels: Record<string, string> = {}): string {
  const entries = Object.entries(labels).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  if (entries.length === 0) return name;
  return `${name}{${entries.map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(',')}}`;
}

/** The family a sample name belongs to, given the declared types. */
function familyOf(name: string, types: Map<string, MetricType>): string | undefined {
  if (types.has(name)) return name;
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (!name.endsWith(suffix)) continue;
    const base = name.slice(0, -suffix.length);
    const type = types.get(base);
    if (type === 'histogram' || (type === 'summary' && suffix !== '_bucket')) return base;
  }
  return undefined;
}

/** Parses an exposition, throwing on the first line that is not the format. */
export function parseExposition(text: string): Exposition {
  const samples = new Map<string, number>();
  const types = new Map<string, MetricType>();
  const lines = text.split('\n');
  if (lines.at(-1) === '') lines.pop();
  lines.forEach((line, i) => {
    const where = `line ${i + 1}: ${JSON.stringify(line.slice(0, 200))}`;
    if (line === '') return;
    if (line.startsWith('#')) {
      const type = TYPE.exec(line);
      if (type) {
        if (types.has(type[1]!)) throw new Error(`second TYPE for ${type[1]} at ${where}`);
        types.set(type[1]!, type[2] as MetricType);
        return;
      }
      if (line.startsWith('# HELP ') && !HELP.test(line)) throw new Error(`malformed HELP at ${where}`);
      if (line.startsWith('# TYPE ')) throw new Error(`malformed TYPE at ${where}`);
      return;
    }
    const m = SAMPLE.exec(line);
    if (!m) throw new Error(`not a sample, comment or blank line at ${where}`);
    const name = m[1]!;
    if (familyOf(name, types) === undefined) throw new Error(`sample of ${name} before (or without) its TYPE line at ${where}`);
    const labels: Record<string, string> = {};
    for (const [, k, v] of (m[2] ?? '').matchAll(ONE_LABEL)) {
      if (k! in labels) throw new Error(`label ${k} twice at ${where}`);
      labels[k!] = unescape(v!);
    }
    const key = seriesKey(name, labels);
    if (samples.has(key)) throw new Error(`series ${key} twice at ${where}`);
    samples.set(key, parseValue(m[3]!));
  });
  checkHistograms(samples, types);
  return { samples, types };
}

/** Each histogram series: buckets non-decreasing in `le`, the last one `+Inf`, equal to `_count`. */
function checkHistograms(samples: Map<string, number>, types: Map<string, MetricType>): void {
  for (const [family, type] of types) {
    if (type !== 'histogram') continue;
    const series = new Map<string, Array<{ le: number; value: number }>>();
    for (const [key, value] of samples) {
      if (!key.startsWith(`${family}_bucket{`)) continue;
      const le = /le="([^"]*)"/.exec(key)?.[1];
      if (le === undefined) throw new Error(`bucket without le: ${key}`);
      const rest = key.replace(/,?le="[^"]*"/, '').replace('{,', '{').replace(`${family}_bucket`, '').replace('{}', '');
      const list = series.get(rest) ?? [];
      list.push({ le: parseValue(le), value });
      series.set(rest, list);
    }
    for (const [labels, buckets] of series) {
      buckets.sort((a, b) => a.le - b.le);
      for (let i = 1; i < buckets.length; i++) {
        if (buckets[i]!.value < buckets[i - 1]!.value) throw new Error(`${family}${labels}: buckets not cumulative`);
      }
      const last = buckets.at(-1)!;
      if (last.le !== Number.POSITIVE_INFINITY) throw new Error(`${family}${labels}: no le="+Inf" bucket`);
      const count = samples.get(`${family}_count${labels}`);
      if (count !== last.value) throw new Error(`${family}${labels}: _count ${count} differs from the +Inf bucket ${last.value}`);
    }
  }
}

/**
 * The series whose value changed from `before` to `after` (new ones from 0), as after − before,
 * among those `keep` selects.
 */
export function diffSamples(before: Map<string, number>, after: Map<string, number>, keep: (key: string) => boolean = () => true): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [key, value] of after) {
    if (!keep(key)) continue;
    const was = before.get(key) ?? 0;
    if (Object.is(value, was)) continue;
    out[key] = Number((value - was).toPrecision(12));
  }
  for (const key of before.keys()) if (keep(key) && !after.has(key)) out[key] = Number.NaN;
  return out;
}
