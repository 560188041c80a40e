/**
 * Benchmark: guest downtime and total duration of every strategy on one real QEMU guest, each run
 * several times; figures are reported as ratios against `cold` measured in the same run (these
 * machines are noisy). Usage: npm run bench:strategies [-- --runs N --ram-mb M --data-mb D --disk-mb S]
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { buildRuntime } from '../src/compute/runtime.js';
import { defaultConfig, STRATEGIES, type StrategyName } from '../src/config/schema.js';
import { DISK_QOM_PATH } from '../src/hypervisor/qemu/launch.js';
import { silentLogger } from '../src/log.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    'ram-mb': { type: 'string', default: '256' },
    'data-mb': { type: 'string', default: '256' },
    'disk-mb': { type: 'string', default: '2048' },
  },
});
const runs = Number(values.runs);
const ramMb = Number(values['ram-mb']);
const dataMb = Number(values['data-mb']);
const diskMb = Number(values['disk-mb']);

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

async function main(): Promise<void> {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'sdb-'));
  const config = defaultConfig();
  config.DEFAULT.instances_path = path.join(base, 'i');
  config.DEFAULT.state_path = path.join(base, 's');
  config.image_store.path = path.join(base, 'images');
  config.image_store.reserved_space_mb = 0;
  const rt = buildRuntime(config, silentLogger());
  const hv = rt.hv;
  const uuid = randomUUID();
  try {
    await hv.createInstance({ uuid, name: 'bench', memoryMb: ramMb, vcpus: 1, machine: 'pc', diskSizeBytes: diskMb * 2 ** 20 });
    await rt.lifecycle.start(uuid);
    for (let off = 0; off < dataMb; off += 16) {
      await hv.hmp(uuid, `qemu-io -d ${DISK_QOM_PATH} "write -P 0x${(0x10 + (off % 200)).toString(16)} ${off * 4}M 16M"`);
    }
    const figures = new Map<StrategyName, { downtime: number[]; duration: number[] }>();
    for (let r = 0; r < runs; r++) {
      for (const strategy of STRATEGIES) {
        const res = await rt.engine.take({ requestId: `bench-${r}`, instanceUuid: uuid, imageId: randomUUID(), strategy });
        await rt.store.delete(res.image_id);
        const f = figures.get(strategy) ?? { downtime: [], duration: [] };
        f.downtime.push(res.downtime_ms);
        f.duration.push(res.duration_ms);
        figures.set(strategy, f);
      }
    }
    const cold = figures.get('cold')!;
    const baseDown = median(cold.downtime);
    const baseDur = median(cold.duration);
    console.log(`guest: ${ramMb} MiB RAM, ${diskMb} MiB qcow2 with ${dataMb} MiB of data; ${runs} runs each; medians`);
    console.log('strategy                       downtime_ms  vs cold  duration_ms  vs cold');
    for (const [s, f] of figures) {
      const d = median(f.downtime);
      const t = median(f.duration);
      console.log(
        `${s.padEnd(31)}${String(d).padStart(11)}  ${(d / baseDown).toFixed(2).padStart(7)}  ${String(t).padStart(11)}  ${(t / baseDur).toFixed(2).padStart(7)}`,
      );
    }
  } finally {
    await hv.stop(uuid, { graceful: false }).catch(() => undefined);
    await fs.rm(base, { recursive: true, force: true });
  }
}

await main();
