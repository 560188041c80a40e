import zlib from 'node:zlib';

/**
 * The records the test guest's writer (guest/writer.c) appends to `/var/lib/writer/rec-NNNNNN.log`
 * on its ext4 root and fsyncs one by one: 64 bytes, little-endian.
 *
 *   0 magic u32 "WREC" · 4 boot u32 · 8 seq u64 · 16 mono_ns u64 · 24 realtime_ns u64 ·
 *   32 payload[28], payload[i] = (seq·31 + i) & 0xff · 60 crc32 of bytes 0..59 (zlib's)
 *
 * seq runs 1, 2, 3, … with no hole, across files and boots (each start of the writer is a new boot).
 */

export const RECORD_BYTES = 64;
export const RECORD_MAGIC = 0x43455257;
const PAYLOAD_OFFSET = 32;
const PAYLOAD_BYTES = 28;
const CRC_OFFSET = 60;

export interface WriterRecord {
  boot: number;
  seq: bigint;
  monoNs: bigint;
  realtimeNs: bigint;
}

/** Decodes one record, or says why it is not a whole, intact one. */
export function decodeRecord(buf: Buffer): { record: WriterRecord } | { problem: string } {
  if (buf.length !== RECORD_BYTES) return { problem: `${buf.length} bytes, expected ${RECORD_BYTES}` };
  const magic = buf.readUInt32LE(0);
  if (magic !== RECORD_MAGIC) return { problem: `bad magic 0x${magic.toString(16)}` };
  const crc = zlib.crc32(buf.subarray(0, CRC_OFFSET));
  if (crc !== buf.readUInt32LE(CRC_OFFSET)) return { problem: 'CRC mismatch' };
  const seq = buf.readBigUInt64LE(8);
  for (let i = 0; i < PAYLOAD_BYTES; i++) {
    if (buf[PAYLOAD_OFFSET + i] !== Number((seq * 31n + BigInt(i)) & 0xffn)) return { problem: `payload byte ${i} wrong` };
  }
  return { record: { boot: buf.readUInt32LE(4), seq, monoNs: buf.readBigUInt64LE(16), realtimeNs: buf.readBigUInt64LE(24) } };
}

/** What the records of one filesystem say. */
export interface RecordsSummary {
  files: number;
  count: number;
  first?: bigint;
  last?: bigint;
  /** Boot numbers seen, in order. */
  boots: number[];
  /** Everything wrong: a bad record, a hole or a repeat in the sequence, a torn tail. Empty when intact. */
  problems: string[];
}

/**
 * Checks the writer's files, given as [name, content] in any order: every record intact, the sequence
 * without a hole or repeat from the first file to the last.
 */
export function checkRecords(files: ReadonlyArray<readonly [string, Buffer]>): RecordsSummary {
  const sorted = [...files].filter(([n]) => /^rec-\d{6}\.log$/.test(n)).sort(([a], [b]) => a.localeCompare(b));
  const out: RecordsSummary = { files: sorted.length, count: 0, boots: [], problems: [] };
  let expected: bigint | undefined;
  for (const [name, data] of sorted) {
    if (data.length % RECORD_BYTES !== 0) out.problems.push(`${name}: ${data.length % RECORD_BYTES} bytes of a torn record at the end`);
    for (let off = 0; off + RECORD_BYTES <= data.length; off += RECORD_BYTES) {
      const decoded = decodeRecord(data.subarray(off, off + RECORD_BYTES));
      if ('problem' in decoded) {
        out.problems.push(`${name} at offset ${off}: ${decoded.problem}`);
        continue;
      }
      const r = decoded.record;
      if (expected === undefined && r.seq !== 1n) out.problems.push(`${name} at offset ${off}: the sequence starts at ${r.seq}, not 1`);
      if (expected !== undefined && r.seq !== expected) out.problems.push(`${name} at offset ${off}: seq ${r.seq}, expected ${expected}`);
      expected = r.seq + 1n;
      out.first ??= r.seq;
      out.last = r.seq;
      out.count++;
      if (out.boots.at(-1) !== r.boot) out.boots.push(r.boot);
    }
  }
  return out;
}
