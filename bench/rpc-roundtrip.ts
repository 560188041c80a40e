/**
 * Benchmark: sequential no-op RPC `call` round trips per second over the local RabbitMQ, our
 * RpcServer against an oslo.messaging RPC server, driven by the same Python oslo client
 * (bench/rpc_client.py), so that only the server differs. Our server runs twice: with the real
 * FileJournal (fsync per request, as the agent does) and with an in-memory journal.
 *
 * Each server gets its own vhost; all run for the whole benchmark, measured one at a time; the
 * order alternates between rounds; medians of the rounds are reported, with ratios against the
 * Python server measured in the same run.
 *
 * Usage: npm run bench:rpc [-- --rounds 3 --warmup 2 --seconds 5 --max-calls 100000 --python /usr/bin/python3]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { dir as tmpDir, type DirectoryResult } from 'tmp-promise';
import { FileJournal } from '../src/compute/journal.js';
import { rabbitOptionsSchema } from '../src/config/schema.js';
import { silentLogger } from '../src/log.js';
import type { Bus } from '../src/messaging/bus.js';
import { RpcServer } from '../src/messaging/rpc-server.js';
import type { JournalEntry, RequestJournal, RpcRequest, RpcTarget } from '../src/messaging/rpc-types.js';
import { openBus } from '../src/messaging/transport/open-bus.js';
import { runProgram } from '../src/util/exec.js';
import { createRabbitVhost, deleteRabbitVhost, ensureRabbit } from '../test/helpers/rabbitmq.js';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '3' },
    warmup: { type: 'string', default: '2' },
    seconds: { type: 'string', default: '5' },
    'max-calls': { type: 'string', default: '100000' },
    python: { type: 'string', default: '/usr/bin/python3' },
  },
});
const rounds = positiveInt(values.rounds, 'rounds');
const warmupS = positiveNumber(values.warmup, 'warmup');
const windowS = positiveNumber(values.seconds, 'seconds');
const maxCalls = positiveInt(values['max-calls'], 'max-calls');
const python = values.python;

const CLIENT_PY = fileURLToPath(new URL('./rpc_client.py', import.meta.url));
const SERVER_PY = fileURLToPath(new URL('./rpc_server.py', import.meta.url));
const TOPIC = 'bench';
const SERVER = 'bench-host';
const CONTROL_EXCHANGE = 'nova';
const SERVER_READY_MS = 60_000;
const SERVER_EXIT_MS = 15_000;
/** A client run: start-up, warm-up, window, plus slack; beyond it the client is killed. */
const clientTimeoutMs = (warmupS + windowS) * 1000 + 60_000;

type ServerKind = 'ours-file-journal' | 'ours-memory-journal' | 'python-oslo';
const KINDS: readonly ServerKind[] = ['ours-file-journal', 'ours-memory-journal', 'python-oslo'];

interface RunningServer {
  url: string;
  stop(): Promise<void>;
}

function positiveNumber(v: string, name: string): number {
  const n = Number(v);
  if (!(n > 0) || !Number.isFinite(n)) throw new Error(`--${name} must be a positive number, got ${v}`);
  return n;
}

function positiveInt(v: string, name: string): number {
  const n = positiveNumber(v, name);
  if (!Number.isInteger(n)) throw new Error(`--${name} must be an integer, got ${v}`);
  return n;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

const pingTarget: RpcTarget = {
  version: '6.0',
  methods: new Set(['ping']),
  validate() {},
  async call() {
    return null;
  },
};

/** The cheapest journal that honours the contract: what the server costs without the fsyncs. */
class MemoryJournal implements RequestJournal {
  private seq = 0;
  private readonly uids = new Set<string>();
  private readonly open = new Map<string, JournalEntry>();

  async has(uniqueId: string): Promise<boolean> {
    return this.uids.has(uniqueId);
  }

  async accept(request: RpcRequest): Promise<JournalEntry> {
    const entry = { id: String(++this.seq), request, acceptedAt: new Date().toISOString() };
    if (request.uniqueId !== undefined) this.uids.add(request.uniqueId);
    this.open.set(entry.id, entry);
    return entry;
  }

  async finish(id: string): Promise<void> {
    this.open.delete(id);
  }

  async unfinished(): Promise<JournalEntry[]> {
    return [...this.open.values()];
  }
}

async function startOurServer(url: string, journal: RequestJournal): Promise<RunningServer> {
  const log = silentLogger();
  const bus: Bus = await openBus(url, rabbitOptionsSchema.parse({}), log);
  const server = new RpcServer({ bus, target: pingTarget, journal, controlExchange: CONTROL_EXCHANGE, host: SERVER, topic: TOPIC, log });
  try {
    await server.start();
  } catch (err) {
    await bus.close();
    throw err;
  }
  return {
    url,
    stop: async () => {
      try {
        await server.stop();
      } finally {
        await bus.close();
      }
    },
  };
}

async function startPythonServer(url: string): Promise<RunningServer> {
  // stdin stays open as a lifeline: the server stops when it closes, even if this process dies.
  const child = spawn(python, [SERVER_PY, '--url', url, '--topic', TOPIC, '--server', SERVER, '--exchange', CONTROL_EXCHANGE], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (c: string) => {
    stderr = (stderr + c).slice(-4000);
  });
  const stop = () => stopChild(child, exited);
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`Python RPC server not ready within ${SERVER_READY_MS} ms`)), SERVER_READY_MS);
      let out = '';
      child.stdout!.setEncoding('utf8').on('data', (c: string) => {
        out += c;
        if (out.includes('READY\n')) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      child.once('close', (code) => {
        clearTimeout(timer);
        reject(new Error(`Python RPC server exited (code ${code}) before it was ready`));
      });
    });
  } catch (err) {
    await stop();
    throw new Error(`${(err as Error).message}\n${stderr}`);
  }
  return { url, stop };
}

async function stopChild(child: ChildProcess, exited: Promise<void>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.stdin?.end();
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), SERVER_EXIT_MS);
  await exited;
  clearTimeout(timer);
}

async function measure(url: string): Promise<number> {
  const args = [CLIENT_PY, '--url', url, '--topic', TOPIC, '--server', SERVER, '--exchange', CONTROL_EXCHANGE];
  args.push('--warmup', String(warmupS), '--seconds', String(windowS), '--max-calls', String(maxCalls));
  const res = await runProgram(python, args, { timeoutMs: clientTimeoutMs });
  const line = res.stdout.trim().split('\n').at(-1) ?? '';
  if (res.code !== 0 || !line.startsWith('{')) {
    throw new Error(`rpc_client.py failed (exit ${res.code}):\n${res.stdout}${res.stderr}`);
  }
  const { calls_per_s: rate } = JSON.parse(line) as { calls_per_s: number };
  return rate;
}

async function main(): Promise<void> {
  await ensureRabbit();
  const tag = `bench-rpc-${process.pid}-${randomBytes(3).toString('hex')}`;
  const vhosts: string[] = [];
  const servers = new Map<ServerKind, RunningServer>();
  let journalDir: DirectoryResult | undefined;

  let cleaning: Promise<void> | undefined;
  const cleanup = () =>
    (cleaning ??= (async () => {
      for (const s of servers.values()) await s.stop().catch((err: Error) => console.error(`stopping a server: ${err.message}`));
      for (const v of vhosts) await deleteRabbitVhost(v).catch((err: Error) => console.error(`deleting vhost ${v}: ${err.message}`));
      await journalDir?.cleanup();
    })());
  // Not `once`: tsx relays the terminal's SIGINT a second time, and with no listener left the
  // process would exit before cleaning up.
  let signalled = false;
  const onSignal = (sig: NodeJS.Signals) => {
    if (signalled) return;
    signalled = true;
    console.error(`${sig}: cleaning up`);
    void cleanup().finally(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  try {
    const urls = new Map<ServerKind, string>();
    for (const kind of KINDS) {
      const vhost = `${tag}-${kind}`;
      vhosts.push(vhost);
      urls.set(kind, await createRabbitVhost(vhost));
    }
    journalDir = await tmpDir({ unsafeCleanup: true, prefix: 'sdb-rpc-' });
    const fileJournal = await new FileJournal({ dir: `${journalDir.path}/journal`, log: silentLogger() }).open();
    servers.set('ours-file-journal', await startOurServer(urls.get('ours-file-journal')!, fileJournal));
    servers.set('ours-memory-journal', await startOurServer(urls.get('ours-memory-journal')!, new MemoryJournal()));
    servers.set('python-oslo', await startPythonServer(urls.get('python-oslo')!));

    const rates = new Map<ServerKind, number[]>(KINDS.map((k) => [k, []]));
    for (let r = 0; r < rounds; r++) {
      const order = r % 2 === 0 ? KINDS : [...KINDS].reverse();
      for (const kind of order) {
        const rate = await measure(servers.get(kind)!.url);
        rates.get(kind)!.push(rate);
        console.error(`round ${r + 1}/${rounds} ${kind}: ${rate.toFixed(1)} calls/s`);
      }
    }

    const py = median(rates.get('python-oslo')!);
    console.log(
      `no-op RPC call round trips, one sequential oslo.messaging client, local RabbitMQ; ` +
        `${warmupS} s warm-up + ${windowS} s window; median of ${rounds} rounds`,
    );
    console.log('server                 calls/s  vs python   rounds');
    for (const kind of KINDS) {
      const xs = rates.get(kind)!;
      const m = median(xs);
      console.log(
        `${kind.padEnd(21)}${m.toFixed(1).padStart(9)}  ${(m / py).toFixed(2).padStart(8)}   ${xs.map((x) => x.toFixed(1)).join(' ')}`,
      );
    }
  } finally {
    await cleanup();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

await main();
