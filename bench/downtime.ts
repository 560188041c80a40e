/**
 * Benchmark: guest downtime of every strategy on one real QEMU guest whose RAM is not empty (by
 * default it is mapped from a file of random bytes, so a managed save writes all of it; `--ram-fill
 * zero` leaves it empty, as `npm run bench:strategies` does) and whose disk holds data written
 * through the guest. Each strategy runs several times; medians are reported with
 * ratios against `cold` measured in the same run (these machines are noisy).
 *
 * The guest has no OS, so no guest agent: freeze_ms is 0 whatever the quiesce mode. The default
 * mode here is `off`, because `auto` would spend [snapshot] guest_agent_timeout waiting for an
 * agent that never answers, inside the `live` strategy's duration.
 *
 * Usage: npm run bench:downtime [-- --runs N --ram-mb M --data-mb D --disk-mb S --quiesce off|auto
 *        --ram-fill random|zero]
 */
import { randomFill, randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { buildRuntime } from '../src/compute/runtime.js';
import { benchConfig } from './bench-config.js';
import { QUIESCE_MODES, STRATEGIES, type QuiesceMode, type StrategyName } from '../src/config/schema.js';
import { DISK_QOM_PATH } from '../src/hypervisor/qemu/launch.js';
import { silentLogger } from '../src/log.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    'ram-mb': { type: 'string', default: '512' },
    'data-mb': { type: 'string', default: '1024' },
    'disk-mb': { type: 'string', default: '2048' },
    quiesce: { type: 'string', default: 'off' },
    'ram-fill': { type: 'string', default: 'random' },
  },
});
const runs = Number(values.runs);
const ramMb = Number(values['ram-mb']);
const dataMb = Number(values['data-mb']);
const diskMb = Number(values['disk-mb']);
if (!(QUIESCE_MODES as readonly string[]).includes(values.quiesce)) throw new Error(`--quiesce: one of ${QUIESCE_MODES.join(', ')}`);
const quiesce = values.quiesce as QuiesceMode;
if (dataMb > diskMb) throw new Error('--data-mb must not exceed --disk-mb');
if (values['ram-fill'] !== 'random' && values['ram-fill'] !== 'zero') throw new Error('--ram-fill: random or zero');
const randomRam = values['ram-fill'] === 'random';

const CHUNK_MB = 16;
const MiB = 2 ** 20;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

/** Writes `mb` MiB of random bytes to `file`, one chunk at a time. */
async function writeRandomFile(file: string, mb: number): Promise<void> {
  const fill = (buf: Buffer, offset: number, size: number) =>
    new Promise<void>((resolve, reject) => randomFill(buf, offset, size, (err) => (err ? reject(err) : resolve())));
  const chunk = Buffer.alloc(CHUNK_MB * MiB);
  const fh = await fs.open(file, 'wx', 0o600);
  try {
    for (let done = 0; done < mb; done += CHUNK_MB) {
      const len = Math.min(CHUNK_MB, mb - done) * MiB;
      await fill(chunk, 0, len);
      await fh.write(chunk, 0, len);
    }
  } finally {
    await fh.close();
  }
}

interface Figures {
  downtime: number[];
  duration: number[];
  freeze: number[];
}

async function main(): Promise<void> {
  const { base, config } = await benchConfig('sdd-', quiesce);
  const rt = buildRuntime(config, silentLogger());
  const hv = rt.hv;
  const uuid = randomUUID();
  try {
    const memoryFile = randomRam ? path.join(base, 'ram.bin') : undefined;
    if (memoryFile) await writeRandomFile(memoryFile, ramMb);
    await hv.createInstance({ uuid, name: 'bench', memoryMb: ramMb, vcpus: 1, machine: 'pc', diskSizeBytes: diskMb * MiB, memoryFile });
    await rt.lifecycle.start(uuid);
    for (let off = 0; off < dataMb; off += CHUNK_MB) {
      const len = Math.min(CHUNK_MB, dataMb - off);
      const out = await hv.hmp(uuid, `qemu-io -d ${DISK_QOM_PATH} "write -P 0x${(0x10 + ((off / CHUNK_MB) % 200)).toString(16)} ${off}M ${len}M"`);
      if (out.trim() !== '') throw new Error(`HMP qemu-io write failed: ${out.trim()}`);
    }
    const disk = await hv.diskInfo(uuid);
    const kvm = await hv.qmp<{ enabled: boolean }>(uuid, 'query-kvm');

    const figures = new Map<StrategyName, Figures>();
    for (let r = 0; r < runs; r++) {
      for (const strategy of STRATEGIES) {
        const res = await rt.engine.take({ requestId: `bench-${r}`, instanceUuid: uuid, imageId: randomUUID(), strategy });
        await rt.store.delete(res.image_id);
        const state = (await hv.info(uuid)).state;
        if (state !== 'running') throw new Error(`after ${strategy} the guest is ${state}, not running`);
        const f = figures.get(strategy) ?? { downtime: [], duration: [], freeze: [] };
        f.downtime.push(res.downtime_ms);
        f.duration.push(res.duration_ms);
        f.freeze.push(res.freeze_ms);
        figures.set(strategy, f);
      }
    }

    const cold = figures.get('cold')!;
    const baseDown = median(cold.downtime);
    const baseDur = median(cold.duration);
    const ratio = (x: number, b: number) => (b > 0 ? (x / b).toFixed(2) : 'n/a').padStart(7);
    console.log(
      `guest: ${ramMb} MiB RAM ${randomRam ? 'from a file of random bytes' : '(empty)'}, ${diskMb} MiB qcow2 with ${dataMb} MiB of data ` +
        `(${Math.round(disk.actualSize / MiB)} MiB on the host); quiesce=${quiesce}; accel=${kvm.enabled ? 'kvm' : 'tcg'}; ${runs} runs each; medians`,
    );
    console.log('strategy                       downtime_ms  vs cold  duration_ms  vs cold  freeze_ms');
    for (const [s, f] of figures) {
      const d = median(f.downtime);
      const t = median(f.duration);
      console.log(
        `${s.padEnd(31)}${String(d).padStart(11)}  ${ratio(d, baseDown)}  ${String(t).padStart(11)}  ${ratio(t, baseDur)}  ${String(median(f.freeze)).padStart(9)}`,
      );
    }
  } finally {
    await hv.stop(uuid, { graceful: false }).catch(() => undefined);
    await fs.rm(base, { recursive: true, force: true });
  }
}

await main();
