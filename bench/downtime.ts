/**
 * Benchmark: guest downtime of every strategy on one real Linux guest (scripts/guest-image.sh: its
 * writer appends fsynced records all along, its probe reports every pause it sees) whose RAM is not
 * empty (by default it is mapped from a file of random bytes, which Linux leaves in its free pages, so
 * a managed save writes all of it; `--ram-fill zero` leaves it empty, as `npm run bench:strategies`
 * does) and whose disk holds data beyond its root filesystem (written through its QEMU). Each strategy
 * runs several times; medians are reported with ratios against `cold` measured in the same run (these
 * machines are noisy), beside the pause the guest itself saw and its writer's longest write+fsync.
 *
 * Usage: npm run bench:downtime [-- --runs N --ram-mb M --data-mb D --disk-mb S --quiesce off|auto|required
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
import { GuestConsole } from '../src/guest-check/console.js';
import { buildGuestImage } from '../src/guest-check/guest-image.js';
import { observeRunningGuest } from '../src/guest-check/observe.js';
import { waitForGuestReady } from '../src/guest-check/ready.js';
import { silentLogger } from '../src/log.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    'ram-mb': { type: 'string', default: '512' },
    'data-mb': { type: 'string', default: '1024' },
    'disk-mb': { type: 'string', default: '2048' },
    quiesce: { type: 'string', default: 'auto' },
    'ram-fill': { type: 'string', default: 'random' },
  },
});
const runs = Number(values.runs);
const ramMb = Number(values['ram-mb']);
const dataMb = Number(values['data-mb']);
const diskMb = Number(values['disk-mb']);
if (!(QUIESCE_MODES as readonly string[]).includes(values.quiesce)) throw new Error(`--quiesce: one of ${QUIESCE_MODES.join(', ')}`);
const quiesce = values.quiesce as QuiesceMode;
/** The guest's root filesystem takes the first 256 MiB of its disk: the data goes after it. */
const DATA_OFFSET_MB = 512;
if (DATA_OFFSET_MB + dataMb > diskMb) throw new Error(`--disk-mb must be at least ${DATA_OFFSET_MB} + --data-mb`);
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
  /** The vCPU stops the guest's probe saw (ms). */
  seen: number[];
  duration: number[];
  freeze: number[];
  /** The guest writer's longest write+fsync (ms). */
  writerMax: number[];
}

async function main(): Promise<void> {
  const { base, config } = await benchConfig('sdd-', quiesce);
  const rt = buildRuntime(config, silentLogger());
  const hv = rt.qemu!;
  const uuid = randomUUID();
  const guest = await buildGuestImage(path.resolve(import.meta.dirname, '../scripts/guest-image.sh'));
  try {
    const memoryFile = randomRam ? path.join(base, 'ram.bin') : undefined;
    if (memoryFile) await writeRandomFile(memoryFile, ramMb);
    await hv.createInstance({
      uuid,
      name: 'bench',
      memoryMb: ramMb,
      vcpus: 1,
      machine: 'pc',
      baseImage: guest.rootDisk,
      baseImageFormat: guest.rootDiskFormat,
      diskSizeBytes: diskMb * MiB,
      memoryFile,
      kernel: guest.kernel,
      initrd: guest.initrd,
      cmdline: guest.cmdline,
    });
    const guestConsole = new GuestConsole(path.join(config.DEFAULT.instances_path, uuid, 'console.log'));
    await rt.lifecycle.start(uuid);
    await waitForGuestReady(hv, uuid, guestConsole);
    for (let off = 0; off < dataMb; off += CHUNK_MB) {
      const len = Math.min(CHUNK_MB, dataMb - off);
      const at = DATA_OFFSET_MB + off;
      const out = await hv.hmp(uuid, `qemu-io -d ${DISK_QOM_PATH} "write -P 0x${(0x10 + ((off / CHUNK_MB) % 200)).toString(16)} ${at}M ${len}M"`);
      if (out.trim() !== '') throw new Error(`HMP qemu-io write failed: ${out.trim()}`);
    }
    const disk = await hv.diskInfo(uuid);
    const kvm = await hv.qmp<{ enabled: boolean }>(uuid, 'query-kvm');

    const figures = new Map<StrategyName, Figures>();
    for (let r = 0; r < runs; r++) {
      for (const strategy of STRATEGIES) {
        const obs = await observeRunningGuest(guestConsole, () =>
          rt.engine.take({ requestId: `bench-${r}`, instanceUuid: uuid, imageId: randomUUID(), strategy }),
        );
        const res = obs.result;
        await rt.store.delete(res.image_id);
        const state = (await hv.info(uuid)).state;
        if (state !== 'running') throw new Error(`after ${strategy} the guest is ${state}, not running`);
        if (obs.guest.writerErrors.length > 0) throw new Error(`the guest's writer failed: ${obs.guest.writerErrors.join('; ')}`);
        const f = figures.get(strategy) ?? { downtime: [], seen: [], duration: [], freeze: [], writerMax: [] };
        f.downtime.push(res.downtime_ms);
        f.seen.push(Math.round(obs.guest.stoppedMs));
        f.duration.push(res.duration_ms);
        f.freeze.push(res.freeze_ms);
        f.writerMax.push(Math.round(obs.guest.writerMaxMs));
        figures.set(strategy, f);
      }
    }

    const cold = figures.get('cold')!;
    const baseDown = median(cold.downtime);
    const baseDur = median(cold.duration);
    const ratio = (x: number, b: number) => (b > 0 ? (x / b).toFixed(2) : 'n/a').padStart(7);
    console.log(
      `guest: Linux ${guest.kernelVersion}, ${ramMb} MiB RAM ${randomRam ? 'from a file of random bytes' : '(empty)'}, ` +
        `${diskMb} MiB qcow2 (ext4 root + ${dataMb} MiB of data; ${Math.round(disk.actualSize / MiB)} MiB on the host), writer running; ` +
        `quiesce=${quiesce}; accel=${kvm.enabled ? 'kvm' : 'tcg'}; ${runs} runs each; medians`,
    );
    console.log('guest_saw_ms: the vCPU stops the probe inside the guest measured; writer_max_ms: its longest write+fsync');
    console.log('strategy                       downtime_ms  guest_saw_ms  vs cold  duration_ms  vs cold  freeze_ms  writer_max_ms');
    const col = (x: number, w: number) => String(x).padStart(w);
    for (const [s, f] of figures) {
      const d = median(f.downtime);
      const t = median(f.duration);
      console.log(
        `${s.padEnd(31)}${col(d, 11)}  ${col(median(f.seen), 12)}  ${ratio(d, baseDown)}  ${col(t, 11)}  ${ratio(t, baseDur)}  ` +
          `${col(median(f.freeze), 9)}  ${col(median(f.writerMax), 13)}`,
      );
    }
  } finally {
    await hv.stop(uuid, { graceful: false }).catch(() => undefined);
    await fs.rm(base, { recursive: true, force: true });
  }
}

await main();
