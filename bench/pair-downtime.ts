/**
 * Benchmark: a guest's downtime while another guest's snapshot is exporting, against its downtime
 * alone (issue 13, goal 4). Two real Linux guests on the qemu backend, one agent runtime (this
 * process, as the agent would be). Each run: guest B's snapshot alone (guest A running, idle but for
 * its writer); then guest A's snapshot, and B's started as soon as A runs again, so that B's managed
 * save and resume happen while A's export (qemu-img, the NBD receiver, the hash threads) runs in the
 * same process. Reported: B's downtime both ways (medians, their ratio), whether A's export was still
 * running when B ran again (else the run did not overlap), and the event loop's delay (p99, max)
 * over the pair. `--yield-seconds S` sets `[hypervisor] background_export_yield_seconds` (default
 * the agent's; 0: A's export does not hold back while B is down, as before it could).
 *
 * Usage: npm run bench:pair [-- --runs N --ram-mb M --data-mb D --strategy S --yield-seconds S]
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { STRATEGIES, type StrategyName } from '../src/config/schema.js';
import { buildGuestImage } from '../src/guest-check/guest-image.js';
import { waitForGuestReady } from '../src/guest-check/ready.js';
import { silentLogger } from '../src/log.js';
import { buildRuntime, type Runtime } from '../src/service/runtime.js';
import { USES_MANAGED_SAVE } from '../src/snapshot/strategies.js';
import { benchConfig } from './bench-config.js';
import { qemuGuest, writeDiskData, type BenchGuest } from './bench-guest.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    'yield-seconds': { type: 'string' },
    'ram-mb': { type: 'string', default: '512' },
    'data-mb': { type: 'string', default: '1024' },
    strategy: { type: 'string', default: 'suspend-create-resume-extract' },
  },
});
const runs = Number(values.runs);
const ramMb = Number(values['ram-mb']);
const dataMb = Number(values['data-mb']);
const strategy = values.strategy as StrategyName;
if (!(STRATEGIES as readonly string[]).includes(strategy) || !USES_MANAGED_SAVE[strategy]) {
  throw new Error(`--strategy: a strategy with a managed save (${STRATEGIES.filter((s) => USES_MANAGED_SAVE[s]).join(', ')})`);
}
const DATA_OFFSET_MB = 512;
const diskMb = DATA_OFFSET_MB + dataMb;
const POLL_MS = 50;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

async function take(rt: Runtime, g: BenchGuest, r: number) {
  const res = await rt.engine.take({ requestId: `pair-${r}-${g.uuid.slice(0, 8)}`, instanceUuid: g.uuid, imageId: randomUUID(), strategy });
  await rt.store.delete(res.image_id);
  return res;
}

/**
 * Resolves once the guest has been down and runs again, while its snapshot `taking` is in progress.
 * A snapshot that ends (or fails) first ends the wait: with the time it ran again if it went down,
 * else an error (nothing was measured).
 */
async function downAndUpAgain(rt: Runtime, uuid: string, taking: Promise<unknown>): Promise<void> {
  let settled = false;
  taking.then(
    () => (settled = true),
    () => (settled = true),
  );
  let wasDown = false;
  for (;;) {
    const ended = settled;
    const { state } = await rt.hv.info(uuid);
    if (state !== 'running') wasDown = true;
    else if (wasDown) return;
    if (ended) {
      await taking; // its own error, if it failed
      throw new Error(`guest ${uuid}: its snapshot ended but the guest was never seen down and running again`);
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

async function main(): Promise<void> {
  const image = await buildGuestImage(path.resolve(import.meta.dirname, '../scripts/guest-image.sh'));
  const { base, config } = await benchConfig('sdd-pair-', 'auto');
  config.hypervisor.driver = 'qemu';
  if (values['yield-seconds'] !== undefined) config.hypervisor.background_export_yield_seconds = Number(values['yield-seconds']);
  const rt = buildRuntime(config, silentLogger());
  const cmdline = `${image.cmdline} guest.fill_mb=${Math.floor((ramMb * 3) / 4)}`;
  const guests: BenchGuest[] = [];
  try {
    for (const name of ['bench-a', 'bench-b']) guests.push(await qemuGuest(rt, image, { cmdline, ramMb, diskMb, name }));
    const [a, b] = guests as [BenchGuest, BenchGuest];
    for (const g of guests) {
      await waitForGuestReady(rt.hv, g.uuid, g.console, 0, 30 * 60_000);
      await writeDiskData(g, DATA_OFFSET_MB, dataMb);
    }
    console.log(`two guests: Linux ${image.kernelVersion}, ${ramMb} MiB RAM each (3/4 random bytes), ${dataMb} MiB of disk data each; strategy ${strategy}; qemu backend, TCG; background_export_yield_seconds ${config.hypervisor.background_export_yield_seconds}`);
    const alone: number[] = [];
    const paired: number[] = [];
    const loopP99: number[] = [];
    const loopMax: number[] = [];
    let overlapped = 0;
    for (let r = 0; r < runs; r++) {
      alone.push((await take(rt, b, r)).downtime_ms);
      const loop = monitorEventLoopDelay({ resolution: 1 });
      loop.enable();
      let aDoneAt = Infinity;
      const first = take(rt, a, r).finally(() => (aDoneAt = Date.now()));
      first.catch(() => undefined);
      await downAndUpAgain(rt, a.uuid, first);
      // B runs again (its downtime over) before A's export has ended: the two overlapped.
      const taking = take(rt, b, r);
      const bUp = downAndUpAgain(rt, b.uuid, taking).then(() => Date.now());
      bUp.catch(() => undefined); // awaited below, after B's own outcome
      const second = await taking;
      const overlapping = (await bUp) < aDoneAt;
      await first;
      loop.disable();
      paired.push(second.downtime_ms);
      loopP99.push(loop.percentile(99) / 1e6);
      loopMax.push(loop.max / 1e6);
      if (overlapping) overlapped++;
      console.log(`run ${r + 1}: B alone ${alone[r]} ms, B beside A's export ${second.downtime_ms} ms (A still exporting when B ran again: ${overlapping}); loop p99 ${loopP99[r]!.toFixed(1)} ms`);
    }
    console.log(`\nB's downtime, medians of ${runs} runs: alone ${median(alone)} ms, beside A's export ${median(paired)} ms, ratio ${(median(paired) / median(alone)).toFixed(2)}`);
    console.log(`runs where A's export lasted until B ran again: ${overlapped} of ${runs}`);
    console.log(`event loop delay over the pair: p99 median ${median(loopP99).toFixed(1)} ms, max median ${median(loopMax).toFixed(1)} ms`);
  } finally {
    for (const g of guests) await g.close();
    await fs.rm(base, { recursive: true, force: true });
  }
}

await main();
