import fs from 'node:fs/promises';

/**
 * What the test guest (scripts/guest-image.sh) says on its serial console, which the qemu backend
 * appends to `<instance>/console.log`. One line per report:
 *
 *   WRITER start boot=B seq=S files=N     the writer started; S is the next record it writes
 *   WRITER seq=S n=N max_us=U hist=H      once a second: S fsynced; N records since the last line;
 *                                         H their write+fsync latencies (i:count, bucket i holding
 *                                         2^(i/16) µs up to 2^((i+1)/16) µs)
 *   WRITER slow seq=S us=U                one write+fsync took longer than writer.slow_ms
 *   WRITER error TEXT                     a write or fsync failed (the writer goes on)
 *   PROBE start mode=uie|poll
 *   PROBE tick rtc=T off=MS               every RTC second: the guest clock's offset from host time
 *   PROBE stop ms=MS rtc=T                the vCPUs were stopped for MS (seen at RTC second T)
 *   PROBE gap ms=MS                       CLOCK_MONOTONIC jumped by MS (the process or host stalled)
 *   GUEST ready                           init has started the agent, the writer and the probe
 *   INITRAMFS error: TEXT                 the boot failed
 *
 * Kernel messages may interleave; lines that match nothing are skipped.
 */

export type ConsoleReport =
  | { kind: 'writer-start'; boot: number; seq: number; files: number }
  | { kind: 'writer-progress'; seq: number; n: number; maxUs: number; hist: LatencyHistogram }
  | { kind: 'writer-slow'; seq: number; us: number }
  | { kind: 'writer-error'; text: string }
  | { kind: 'probe-start'; mode: string }
  | { kind: 'probe-tick'; rtc: number; offMs: number }
  | { kind: 'probe-stop'; ms: number; rtc: number }
  | { kind: 'probe-gap'; ms: number }
  | { kind: 'guest-ready' }
  | { kind: 'boot-error'; text: string };

/** A report and the byte offset of its line in console.log. */
export type ConsoleEvent = ConsoleReport & { offset: number };

const NUM = '(-?\\d+(?:\\.\\d+)?)';
const PATTERNS: ReadonlyArray<[RegExp, (m: RegExpExecArray) => ConsoleReport]> = [
  [new RegExp(`^WRITER start boot=${NUM} seq=${NUM} files=${NUM}$`), (m) => ({ kind: 'writer-start', boot: +m[1]!, seq: +m[2]!, files: +m[3]! })],
  [
    new RegExp(`^WRITER seq=${NUM} n=${NUM} max_us=${NUM}(?: hist=((?:\\d+:\\d+(?:,\\d+:\\d+)*)?))?$`),
    (m) => ({ kind: 'writer-progress', seq: +m[1]!, n: +m[2]!, maxUs: +m[3]!, hist: parseHistogram(m[4] ?? '') }),
  ],
  [new RegExp(`^WRITER slow seq=${NUM} us=${NUM}$`), (m) => ({ kind: 'writer-slow', seq: +m[1]!, us: +m[2]! })],
  [/^WRITER error (.*)$/, (m) => ({ kind: 'writer-error', text: m[1]! })],
  [/^PROBE start mode=(\w+)$/, (m) => ({ kind: 'probe-start', mode: m[1]! })],
  [new RegExp(`^PROBE tick rtc=${NUM} off=${NUM}$`), (m) => ({ kind: 'probe-tick', rtc: +m[1]!, offMs: +m[2]! })],
  [new RegExp(`^PROBE stop ms=${NUM} rtc=${NUM}$`), (m) => ({ kind: 'probe-stop', ms: +m[1]!, rtc: +m[2]! })],
  [new RegExp(`^PROBE gap ms=${NUM}$`), (m) => ({ kind: 'probe-gap', ms: +m[1]! })],
  [/^GUEST ready$/, () => ({ kind: 'guest-ready' })],
  [/^INITRAMFS error: (.*)$/, (m) => ({ kind: 'boot-error', text: m[1]! })],
];

/** Buckets per octave of the writer's histogram (guest/writer.c HIST_PER_OCTAVE). */
export const HIST_PER_OCTAVE = 16;

/** Write+fsync latency counts by bucket: bucket i holds 2^(i/16) µs up to 2^((i+1)/16) µs. */
export type LatencyHistogram = Map<number, number>;

function parseHistogram(text: string): LatencyHistogram {
  const out: LatencyHistogram = new Map();
  if (text === '') return out;
  for (const pair of text.split(',')) {
    const [i, c] = pair.split(':').map(Number) as [number, number];
    out.set(i, (out.get(i) ?? 0) + c);
  }
  return out;
}

/** Upper edge of a latency bucket, in ms. */
function bucketTopMs(i: number): number {
  return 2 ** ((i + 1) / HIST_PER_OCTAVE) / 1000;
}

/**
 * Percentiles of a latency histogram, in ms: each the upper edge of the bucket it falls in (so at
 * most 4.4% high); undefined for an empty one. `slowUs`: the exact latencies of the same window's
 * records over the writer's `writer.slow_ms` (its `WRITER slow` lines): a percentile among them is
 * exact.
 */
export function latencyPercentiles(hist: LatencyHistogram, slowUs: readonly number[] = []): { n: number; p50Ms: number; p99Ms: number } | undefined {
  const buckets = [...hist.entries()].filter(([, c]) => c > 0).sort((a, b) => a[0] - b[0]);
  const n = buckets.reduce((sum, [, c]) => sum + c, 0);
  if (n === 0) return undefined;
  const slowest = [...slowUs].sort((a, b) => b - a);
  const at = (q: number): number => {
    const rank = Math.ceil(q * n);
    const fromTop = n - rank; // records slower than the one at this rank
    if (fromTop < slowest.length) return slowest[fromTop]! / 1000;
    let seen = 0;
    for (const [i, c] of buckets) {
      seen += c;
      if (seen >= rank) return bucketTopMs(i);
    }
    return bucketTopMs(buckets.at(-1)![0]);
  };
  return { n, p50Ms: at(0.5), p99Ms: at(0.99) };
}

export function parseConsoleLine(line: string): ConsoleReport | undefined {
  const text = line.replace(/\r$/, '');
  for (const [re, make] of PATTERNS) {
    const m = re.exec(text);
    if (m) return make(m);
  }
  return undefined;
}

/** Parses whole lines of `text`, which starts at byte `base` of the file. */
export function parseConsole(text: Buffer, base = 0): ConsoleEvent[] {
  const out: ConsoleEvent[] = [];
  let start = 0;
  for (let nl = text.indexOf(0x0a); nl >= 0; nl = text.indexOf(0x0a, start)) {
    const report = parseConsoleLine(text.subarray(start, nl).toString('latin1'));
    if (report) out.push({ ...report, offset: base + start });
    start = nl + 1;
  }
  return out;
}

const POLL_MS = 100;

/** The console log of one instance, read as it grows. */
export class GuestConsole {
  constructor(readonly file: string) {}

  /** The current end of the log: a mark to read from later. */
  async mark(): Promise<number> {
    return fs.stat(this.file).then(
      (st) => st.size,
      (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') return 0;
        throw err;
      },
    );
  }

  /** The reports in whole lines from byte `from` (a mark) to the end, or to byte `to`. */
  async events(from = 0, to?: number): Promise<ConsoleEvent[]> {
    let fh;
    try {
      fh = await fs.open(this.file, 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    try {
      const end = to ?? (await fh.stat()).size;
      const buf = Buffer.alloc(Math.max(0, end - from));
      const { bytesRead } = await fh.read(buf, 0, buf.length, from);
      return parseConsole(buf.subarray(0, bytesRead), from);
    } finally {
      await fh.close();
    }
  }

  /**
   * Waits until `pick` returns something for the reports from `from` on (given them all, each
   * time); rejects after `timeoutMs`, naming `what` and the last lines, or at once when the guest
   * reported a boot error.
   */
  async waitFor<T>(from: number, what: string, timeoutMs: number, pick: (events: ConsoleEvent[]) => T | undefined): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const events = await this.events(from);
      const found = pick(events);
      if (found !== undefined) return found;
      const bootError = events.find((e) => e.kind === 'boot-error');
      if (bootError) throw new Error(`${this.file}: the guest failed to boot: ${(bootError as { text: string }).text}`);
      if (Date.now() >= deadline) {
        const tail = (await fs.readFile(this.file, 'latin1').catch(() => '')).split('\n').slice(-15).join('\n');
        throw new Error(`${this.file}: no ${what} within ${timeoutMs} ms; last console lines:\n${tail}`);
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  }

  /** Waits for `count` probe ticks after `from`: by then the probe has reported every stop before `from`. */
  waitForTicks(from: number, count: number, timeoutMs = 30_000): Promise<ConsoleEvent[]> {
    return this.waitFor(from, `${count} probe ticks`, timeoutMs, (ev) => {
      const ticks = ev.filter((e) => e.kind === 'probe-tick');
      return ticks.length >= count ? ev : undefined;
    });
  }

  /** Waits for a writer progress line after `from`; resolves with the seq it reports fsynced. */
  async waitForFsynced(from: number, timeoutMs = 30_000): Promise<number> {
    return this.waitFor(from, 'writer progress line', timeoutMs, (ev) => {
      const p = ev.find((e) => e.kind === 'writer-progress');
      return p?.kind === 'writer-progress' ? p.seq : undefined;
    });
  }
}

/**
 * Stops shorter than this are the probe's noise, not a stop: on a loaded host every tick of its
 * window can be read late, and the next one on time then looks like a short stop (17–31 ms seen
 * beside the other test files). The stops this project cares about are a managed save's (seconds).
 */
export const PROBE_NOISE_MS = 50;

/** What the guest saw of one window of its console: its stops and stalls. */
export interface GuestObserved {
  /** Sum of the vCPU stops the probe reported (ms), those under PROBE_NOISE_MS left out. */
  stoppedMs: number;
  /** Every stop the probe reported (ms), noise included. */
  stops: number[];
  /** CLOCK_MONOTONIC gaps the probe reported (ms). */
  gaps: number[];
  /** The writer's longest write+fsync (ms): how long the guest's I/O was held (a freeze included). */
  writerMaxMs: number;
  /** All its write+fsync latencies in the window, by bucket (latencyPercentiles reads it). */
  writerLatency: LatencyHistogram;
  /** The exact latencies (µs) of those over `writer.slow_ms`. */
  writerSlowUs: number[];
  writerErrors: string[];
}

export function observed(events: readonly ConsoleEvent[]): GuestObserved {
  const out: GuestObserved = { stoppedMs: 0, stops: [], gaps: [], writerMaxMs: 0, writerLatency: new Map(), writerSlowUs: [], writerErrors: [] };
  for (const e of events) {
    if (e.kind === 'probe-stop') out.stops.push(e.ms);
    else if (e.kind === 'probe-gap') out.gaps.push(e.ms);
    else if (e.kind === 'writer-slow') {
      out.writerMaxMs = Math.max(out.writerMaxMs, e.us / 1000);
      out.writerSlowUs.push(e.us);
    }
    else if (e.kind === 'writer-progress') {
      out.writerMaxMs = Math.max(out.writerMaxMs, e.maxUs / 1000);
      for (const [i, c] of e.hist) out.writerLatency.set(i, (out.writerLatency.get(i) ?? 0) + c);
    }
    else if (e.kind === 'writer-error') out.writerErrors.push(e.text);
  }
  out.stoppedMs = out.stops.filter((ms) => ms >= PROBE_NOISE_MS).reduce((a, b) => a + b, 0);
  return out;
}
