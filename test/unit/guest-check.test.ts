import zlib from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { latencyPercentiles, observed, parseConsole, parseConsoleLine } from '../../src/guest-check/console.js';
import { checkRecords, decodeRecord, RECORD_BYTES, RECORD_MAGIC } from '../../src/guest-check/records.js';

/** A record exactly as guest/writer.c writes it. */
function record(seq: number, boot = 1): Buffer {
  const b = Buffer.alloc(RECORD_BYTES);
  b.writeUInt32LE(RECORD_MAGIC, 0);
  b.writeUInt32LE(boot, 4);
  b.writeBigUInt64LE(BigInt(seq), 8);
  b.writeBigUInt64LE(123n, 16);
  b.writeBigUInt64LE(456n, 24);
  for (let i = 0; i < 28; i++) b[32 + i] = (seq * 31 + i) & 0xff;
  b.writeUInt32LE(zlib.crc32(b.subarray(0, 60)), 60);
  return b;
}

const records = (from: number, to: number, boot = 1) => Buffer.concat(Array.from({ length: to - from + 1 }, (_, i) => record(from + i, boot)));

describe('writer records', () => {
  it('decodes an intact record and says what is wrong with a damaged one', () => {
    expect(decodeRecord(record(7, 3))).toEqual({ record: { boot: 3, seq: 7n, monoNs: 123n, realtimeNs: 456n } });
    const crc = record(7);
    crc[40] = crc[40]! ^ 1;
    expect(decodeRecord(crc)).toEqual({ problem: 'CRC mismatch' });
    expect(decodeRecord(Buffer.alloc(64))).toEqual({ problem: 'bad magic 0x0' });
    expect(decodeRecord(record(1).subarray(0, 63))).toEqual({ problem: '63 bytes, expected 64' });
  });

  it('a sequence across files and boots with no hole is intact', () => {
    const s = checkRecords([
      ['rec-000002.log', records(1025, 1500, 2)],
      ['rec-000001.log', Buffer.concat([records(1, 1000, 1), records(1001, 1024, 2)])],
      ['lost+found', Buffer.alloc(3)],
    ]);
    expect(s).toEqual({ files: 2, count: 1500, first: 1n, last: 1500n, boots: [1, 2], problems: [] });
  });

  it('finds a hole, a repeat, a torn tail, a bad record and a sequence not starting at 1', () => {
    const bad = records(5, 6);
    bad[RECORD_BYTES + 50] = 0;
    const s = checkRecords([['rec-000001.log', Buffer.concat([records(2, 3), records(3, 3), records(5, 6), bad, record(9).subarray(0, 10)])]]);
    expect(s.problems).toEqual([
      'rec-000001.log: 10 bytes of a torn record at the end',
      'rec-000001.log at offset 0: the sequence starts at 2, not 1',
      'rec-000001.log at offset 128: seq 3, expected 4',
      'rec-000001.log at offset 192: seq 5, expected 4',
      'rec-000001.log at offset 320: seq 5, expected 7',
      'rec-000001.log at offset 384: CRC mismatch',
    ]);
  });
});

describe('guest console', () => {
  it('parses every report, skips other lines, keeps byte offsets', () => {
    const text = [
      '[    0.000000] Linux version 6.1.0',
      'WRITER start boot=2 seq=1001 files=1',
      'PROBE start mode=uie',
      'GUEST ready',
      'PROBE tick rtc=1764470000 off=0.4',
      'WRITER seq=1050 n=49 max_us=2300 hist=160:30,176:18,180:1',
      'WRITER seq=1051 n=0 max_us=0 hist=',
      'WRITER slow seq=1051 us=480000',
      'PROBE stop ms=503.2 rtc=1764470003',
      'PROBE gap ms=61.0',
      'WRITER error write rec-000002.log: Input/output error',
      'PROBE stop ms=17.2 rtc=1764470009',
      'WRITER seq=10',
      '',
    ].join('\r\n');
    const events = parseConsole(Buffer.from(text), 100);
    expect(events.map((e) => e.kind)).toEqual([
      'writer-start',
      'probe-start',
      'guest-ready',
      'probe-tick',
      'writer-progress',
      'writer-progress',
      'writer-slow',
      'probe-stop',
      'probe-gap',
      'writer-error',
      'probe-stop',
    ]);
    expect(events[0]).toEqual({ kind: 'writer-start', boot: 2, seq: 1001, files: 1, offset: 100 + text.indexOf('WRITER start') });
    expect(events[7]).toMatchObject({ kind: 'probe-stop', ms: 503.2, rtc: 1764470003 });
    const seen = observed(events);
    expect(seen).toEqual({
      stoppedMs: 503.2, // the 17.2 ms stop is under the probe's noise floor
      stops: [503.2, 17.2],
      gaps: [61],
      writerMaxMs: 480,
      writerLatency: new Map([[160, 30], [176, 18], [180, 1]]),
      writerSlowUs: [480_000],
      writerErrors: ['write rec-000002.log: Input/output error'],
    });
    // Bucket 160 holds 1024 µs up to 1069 µs; 176: 2048–2138 µs; 180: 2435–2543 µs.
    const p = latencyPercentiles(seen.writerLatency)!;
    expect(p.n).toBe(49);
    expect(p.p50Ms).toBeCloseTo(2 ** (161 / 16) / 1000, 6);
    expect(p.p99Ms).toBeCloseTo(2 ** (181 / 16) / 1000, 6);
    expect(latencyPercentiles(new Map())).toBeUndefined();
    // With the exact latencies of the slowest records, a percentile among them is exact.
    const hist = new Map([[160, 98], [188, 1], [240, 1]]); // 100 records
    expect(latencyPercentiles(hist, [3300, 40_000])).toEqual({ n: 100, p50Ms: 2 ** (161 / 16) / 1000, p99Ms: 3.3 });
    expect(latencyPercentiles(hist, [40_000])!.p99Ms).toBeCloseTo(2 ** (189 / 16) / 1000, 6); // rank 99 is not among them: its bucket
    expect(parseConsoleLine('INITRAMFS error: /dev/vda did not appear')).toEqual({ kind: 'boot-error', text: '/dev/vda did not appear' });
  });

  it('a line cut short at the end of the file is not read yet', () => {
    expect(parseConsole(Buffer.from('GUEST ready\nWRITER seq=5 n=1 max'))).toHaveLength(1);
  });
});
