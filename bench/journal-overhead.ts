/**
 * Benchmark: what the operation journal costs the guest. Every step is recorded (written and
 * fsynced) before it acts, and two of those records fall inside a suspend strategy's downtime
 * window (before create-snapshot and before resume). This runs the same strategy on one real guest
 * alternately with the real journal and with a journal that writes nothing (the baseline, same run),
 * and reports medians and their ratio.
 *
 * Usage: npm run bench:journal [-- --runs N --strategy S --ram-mb M --data-mb D]
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { buildRuntime } from '../src/service/runtime.js';
import { benchConfig } from './bench-config.js';
import { STRATEGIES, type StrategyName } from '../src/config/schema.js';
import { DISK_QOM_PATH } from '../src/hypervisor/qemu/launch.js';
import { silentLogger } from '../src/log.js';
import { SnapshotEngine } from '../src/snapshot/engine.js';
import { OperationHandle, OperationJournal, type NewOperation, type OperationRecord } from '../src/snapshot/operation-journal.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '7' },
    strategy: { type: 'string', default: 'suspend-create-resume-extract' },
    'ram-mb': { type: 'string', default: '256' },
    'data-mb': { type: 'string', default: '64' },
  },
});
const runs = Number(values.runs);
if (!(STRATEGIES as readonly string[]).includes(values.strategy)) throw new Error(`--strategy: one of ${STRATEGIES.join(', ')}`);
const strategy = values.strategy as StrategyName;
const ramMb = Number(values['ram-mb']);
const dataMb = Number(values['data-mb']);
const MiB = 2 ** 20;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

/** The baseline: records nothing. */
class NullJournal extends OperationJournal {
  override async begin(op: NewOperation): Promise<OperationHandle> {
    const now = new Date().toISOString();
    const record: OperationRecord = { version: 1, ...op, phase: 'setup', step_index: -1, owner: { pid: 0, start: null, boot: null }, started_at: now, updated_at: now };
    return new OperationHandle(this, record);
  }
  override async write(): Promise<void> {}
  override async remove(): Promise<void> {}
}

async function main(): Promise<void> {
  const { base, config } = await benchConfig('sdj-', 'off');
  const log = silentLogger();
  const rt = buildRuntime(config, log);
  const engineWithout = new SnapshotEngine({
    hv: rt.hv,
    store: rt.store,
    lifecycle: rt.lifecycle,
    operations: new NullJournal(path.join(base, 'null'), log),
    log,
    namePrefix: config.snapshot.name_prefix,
    defaultStrategy: strategy,
  });
  const uuid = randomUUID();
  try {
    await rt.qemu!.createInstance({ uuid, name: 'bench', memoryMb: ramMb, vcpus: 1, machine: 'pc', diskSizeBytes: 4 * dataMb * MiB });
    await rt.lifecycle.start(uuid);
    const out = await rt.qemu!.hmp(uuid, `qemu-io -d ${DISK_QOM_PATH} "write -P 0x5a 0 ${dataMb}M"`);
    if (out.trim() !== '') throw new Error(`HMP qemu-io write failed: ${out.trim()}`);
    const figures = { journal: { down: [] as number[], dur: [] as number[] }, none: { down: [] as number[], dur: [] as number[] } };
    for (let r = 0; r < runs; r++) {
      for (const [which, engine] of [['journal', rt.engine], ['none', engineWithout]] as const) {
        const res = await engine.take({ requestId: `bench-${r}`, instanceUuid: uuid, imageId: randomUUID(), strategy });
        await rt.store.delete(res.image_id);
        figures[which].down.push(res.downtime_ms);
        figures[which].dur.push(res.duration_ms);
      }
    }
    const kvm = await rt.qemu!.qmp<{ enabled: boolean }>(uuid, 'query-kvm');
    const ratio = (a: number, b: number) => (b > 0 ? (a / b).toFixed(3) : 'n/a');
    const [dj, dn, tj, tn] = [median(figures.journal.down), median(figures.none.down), median(figures.journal.dur), median(figures.none.dur)];
    console.log(`${strategy}; guest ${ramMb} MiB RAM (empty), ${dataMb} MiB of data; accel=${kvm.enabled ? 'kvm' : 'tcg'}; ${runs} runs each, alternating; medians`);
    console.log('journal            downtime_ms  duration_ms');
    console.log(`none (baseline)    ${String(dn).padStart(11)}  ${String(tn).padStart(11)}`);
    console.log(`fsynced records    ${String(dj).padStart(11)}  ${String(tj).padStart(11)}`);
    console.log(`ratio              ${ratio(dj, dn).padStart(11)}  ${ratio(tj, tn).padStart(11)}`);
  } finally {
    await rt.hv.stop(uuid, { graceful: false }).catch(() => undefined);
    await fs.rm(base, { recursive: true, force: true });
  }
}

await main();
