/**
 * Benchmark: the part of a managed save that is the agent's, alone. A QEMU (no guest running) whose
 * RAM is a file of random bytes migrates it, uncapped, either into `exec:cat > file` (bare QEMU, the
 * baseline) or into the agent's MigrationReceiver (QEMU → unix socket → `cat` → the state file,
 * fdatasynced as it goes and fsynced at the end). Alternating, several runs; medians and the ratio.
 * The agent's figure includes its fsync (bare QEMU's does not sync at all).
 *
 * Usage: npm run bench:save-stream [-- --runs N --ram-mb M]
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { MigrationReceiver } from '../src/hypervisor/qemu/migration-stream.js';
import { QmpClient } from '../src/hypervisor/qemu/qmp.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '5' }, 'ram-mb': { type: 'string', default: '512' } } });
const runs = Number(values.runs);
const ramMb = Number(values['ram-mb']);
const TIMEOUT_MS = 120_000;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

async function saveOnce(dir: string, how: 'bare' | 'agent'): Promise<number> {
  const qmpSocket = path.join(dir, 'qmp.sock');
  const out = path.join(dir, 'out.state');
  await fs.rm(qmpSocket, { force: true });
  await fs.rm(out, { force: true });
  const qemu = spawn(
    'qemu-system-x86_64',
    ['-nodefaults', '-display', 'none', '-S', '-machine', 'pc,accel=tcg,memory-backend=ram0', '-m', String(ramMb),
      '-object', `memory-backend-file,id=ram0,size=${ramMb}M,mem-path=${path.join(dir, 'ram.bin')},share=off`,
      '-qmp', `unix:${qmpSocket},server=on,wait=on`],
    { stdio: 'ignore' },
  );
  const exited = new Promise((r) => qemu.once('exit', r));
  try {
    let qmp: QmpClient | undefined;
    for (let i = 0; qmp === undefined; i++) {
      qmp = await QmpClient.connect(qmpSocket, { timeoutMs: TIMEOUT_MS }).catch(async (err: unknown) => {
        if (i > 200) throw err;
        await new Promise((r) => setTimeout(r, 50));
        return undefined;
      });
    }
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': Number.MAX_SAFE_INTEGER });
    const completed = qmp.waitForEvent('MIGRATION', (e) => e.data?.status === 'completed' || e.data?.status === 'failed', TIMEOUT_MS);
    const t0 = performance.now();
    if (how === 'bare') {
      await qmp.execute('migrate', { uri: `exec:cat > ${out}` });
      await completed;
    } else {
      const socket = path.join(dir, 'save.sock');
      await fs.rm(socket, { force: true });
      const receiver = await MigrationReceiver.listen(socket, out);
      await qmp.execute('migrate', { uri: `unix:${socket}` });
      await Promise.all([completed, receiver.done]);
      await receiver.close();
    }
    const ms = performance.now() - t0;
    await qmp.execute('quit').catch(() => undefined);
    return ms;
  } finally {
    qemu.kill('SIGKILL');
    await exited;
  }
}

async function main(): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'sdd-save-stream-'));
  try {
    const ram = await fs.open(path.join(dir, 'ram.bin'), 'w');
    for (let mb = 0; mb < ramMb; mb += 16) await ram.write(randomBytes(16 * 2 ** 20));
    await ram.close();
    const figures = { bare: [] as number[], agent: [] as number[] };
    for (let r = 0; r < runs; r++) {
      for (const how of ['bare', 'agent'] as const) figures[how].push(await saveOnce(dir, how));
      console.log(`run ${r + 1}: bare ${Math.round(figures.bare[r]!)} ms, agent ${Math.round(figures.agent[r]!)} ms`);
    }
    const [b, a] = [median(figures.bare), median(figures.agent)];
    console.log(`\nsave of ${ramMb} MiB of random RAM, medians of ${runs}: bare QEMU into exec:cat ${Math.round(b)} ms; agent (socket → cat, synced) ${Math.round(a)} ms; ratio ${(a / b).toFixed(2)}`);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

await main();
