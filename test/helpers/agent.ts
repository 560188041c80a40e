import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { CLI_ENTRY } from './entry.js';

/**
 * The agent as operators run it: `node dist/snapshot-driver.mjs --config-file X serve` in a child process
 * (test/global-setup.ts builds dist/). Its stderr (pino JSON, one object a line) is collected and
 * parsed, so that tests can wait for and assert on log lines.
 */

/** One parsed stderr line: pino's fields (`msg`, `level`, …), or `{ raw }` for a line that is not JSON. */
export type LogLine = Record<string, unknown> & { msg?: string; raw?: string };

export interface AgentExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface StartAgentOptions {
  /** Extra environment (e.g. SNAPSHOT_DRIVER_FAULT). */
  env?: NodeJS.ProcessEnv;
  /** How long to wait for 'agent serving' (default 60 s: it first carries out its journal). */
  readyTimeoutMs?: number;
}

export class AgentProcess {
  readonly lines: LogLine[] = [];
  readonly exited: Promise<AgentExit>;
  private exit: AgentExit | undefined;
  private partial = '';
  private readonly watchers = new Set<() => void>();

  constructor(private readonly child: ChildProcess) {
    child.stderr!.on('data', (chunk: Buffer) => this.onStderr(chunk.toString('utf8')));
    // stdout is unused by serve; drain it so that the child never blocks on a full pipe.
    child.stdout!.resume();
    this.exited = new Promise<AgentExit>((resolve) => {
      child.on('close', (code, signal) => {
        if (this.partial !== '') this.push(this.partial);
        this.partial = '';
        this.exit = { code, signal };
        this.wake();
        resolve(this.exit);
      });
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** The exit status once the process has exited. */
  get exitStatus(): AgentExit | undefined {
    return this.exit;
  }

  /** Log lines whose `msg` equals `msg` (and whose fields match `fields`, compared with ===). */
  find(msg: string | RegExp, fields: Record<string, unknown> = {}): LogLine[] {
    return this.lines.filter((l) => matches(l, msg, fields));
  }

  /**
   * Resolves with the `count`-th log line matching `msg` and `fields`; rejects when the process
   * exits first or after `timeoutMs`, quoting the last lines of its log.
   */
  waitForLog(msg: string | RegExp, fields: Record<string, unknown> = {}, opts: { count?: number; timeoutMs?: number } = {}): Promise<LogLine> {
    return this.waitForLine((l) => matches(l, msg, fields), `log line ${String(msg)} ${JSON.stringify(fields)}`, opts);
  }

  /** As waitForLog, for any test of a line. */
  waitForLine(test: (line: LogLine) => boolean, what: string, opts: { count?: number; timeoutMs?: number } = {}): Promise<LogLine> {
    const count = opts.count ?? 1;
    const timeoutMs = opts.timeoutMs ?? 60_000;
    const label = `${what} (#${count})`;
    return new Promise<LogLine>((resolve, reject) => {
      const check = (): boolean => {
        const found = this.lines.filter(test);
        if (found.length >= count) {
          done();
          resolve(found[count - 1]!);
          return true;
        }
        if (this.exit) {
          done();
          reject(new Error(`agent exited (${JSON.stringify(this.exit)}) before ${label}\n${this.tail()}`));
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`no ${label} within ${timeoutMs} ms\n${this.tail()}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.watchers.delete(watcher);
      };
      const watcher = () => void check();
      if (!check()) this.watchers.add(watcher);
    });
  }

  /** SIGTERM (the agent finishes running operations) and waits for the exit. */
  async stop(timeoutMs = 60_000): Promise<AgentExit> {
    if (this.exit) return this.exit;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), timeoutMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  /** SIGKILL, for cleanup after a failed test. */
  async kill(): Promise<AgentExit> {
    if (this.exit) return this.exit;
    this.child.kill('SIGKILL');
    return this.exited;
  }

  /** The last log lines, as text, for error messages. */
  tail(n = 30): string {
    return this.lines
      .slice(-n)
      .map((l) => (l.raw !== undefined ? l.raw : JSON.stringify(l)))
      .join('\n');
  }

  private onStderr(text: string): void {
    const parts = (this.partial + text).split('\n');
    this.partial = parts.pop()!;
    for (const line of parts) this.push(line);
    this.wake();
  }

  private push(line: string): void {
    if (line.trim() === '') return;
    try {
      const parsed: unknown = JSON.parse(line);
      this.lines.push(typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed) ? (parsed as LogLine) : { raw: line });
    } catch {
      this.lines.push({ raw: line });
    }
  }

  private wake(): void {
    for (const w of [...this.watchers]) w();
  }
}

function matches(line: LogLine, msg: string | RegExp, fields: Record<string, unknown>): boolean {
  const text = line.msg;
  if (typeof text !== 'string') return false;
  if (typeof msg === 'string' ? text !== msg : !msg.test(text)) return false;
  return Object.entries(fields).every(([k, v]) => line[k] === v);
}

/** Spawns the agent without waiting for it (for a start that is expected to die). */
export function spawnAgent(configFile: string, opts: StartAgentOptions = {}): AgentProcess {
  const child = spawn(process.execPath, [CLI_ENTRY, '--config-file', configFile, 'serve'], {
    env: { ...process.env, ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return new AgentProcess(child);
}

/** Starts `snapshot-driver --config-file X serve` and resolves once it logs 'agent serving'. */
export async function startAgentProcess(configFile: string, opts: StartAgentOptions = {}): Promise<AgentProcess> {
  const agent = spawnAgent(configFile, opts);
  try {
    await agent.waitForLog('agent serving', {}, { timeoutMs: opts.readyTimeoutMs ?? 60_000 });
  } catch (err) {
    await agent.kill();
    throw err;
  }
  return agent;
}

export interface AgentConfigOptions {
  /** `[DEFAULT] host`: unique per test file, so that its `compute.<host>` queue is its own. */
  host: string;
  transportUrl: string;
  /** Default suspend-create-resume-extract. */
  strategy?: string;
  /** `[DEFAULT] max_concurrent_snapshots`; default: not written (the agent's default, 5). */
  maxConcurrentSnapshots?: number;
  /** `[image_store] path` (default `images`, relative to the config file's folder). */
  imageStorePath?: string;
  /**
   * `[metrics] listen`; default `127.0.0.1:0` (a free port, logged: metricsBaseUrl), so that agents
   * of files running at the same time never ask for the same port.
   */
  metricsListen?: string;
}

/**
 * Writes `<dir>/agent.conf` for a test agent: instances in `<dir>/instances`, state in `<dir>/state`,
 * images in `<dir>/images` (relative paths, resolved against the file's folder), TCG, a 1 s
 * shutdown timeout, no reserved space, and quick broker reconnects. Resolves with its path.
 */
export async function writeAgentConfig(dir: string, o: AgentConfigOptions): Promise<string> {
  const file = path.join(dir, 'agent.conf');
  await fs.writeFile(
    file,
    [
      '[DEFAULT]',
      `host = ${o.host}`,
      `transport_url = ${o.transportUrl}`,
      'instances_path = instances',
      'state_path = state',
      ...(o.maxConcurrentSnapshots === undefined ? [] : [`max_concurrent_snapshots = ${o.maxConcurrentSnapshots}`]),
      '[snapshot]',
      `strategy = ${o.strategy ?? 'suspend-create-resume-extract'}`,
      '[hypervisor]',
      'accel = tcg',
      'shutdown_timeout = 1',
      // The OS-less test guests ignore the ACPI power button: a soft reboot turns hard after 1 s.
      'wait_soft_reboot_seconds = 1',
      '[image_store]',
      `path = ${o.imageStorePath ?? 'images'}`,
      'reserved_space_mb = 0',
      '[oslo_messaging_rabbit]',
      'rabbit_retry_interval = 0.2',
      'rabbit_retry_backoff = 0.2',
      'rabbit_interval_max = 1',
      '[metrics]',
      `listen = ${o.metricsListen ?? '127.0.0.1:0'}`,
      '',
    ].join('\n'),
  );
  return file;
}

/** `http://host:port` of the agent's metrics endpoint, from its 'metrics serving' log line. */
export async function metricsBaseUrl(agent: AgentProcess): Promise<string> {
  const line = await agent.waitForLog('metrics serving', {}, { timeoutMs: 60_000 });
  const listen = line.listen;
  if (typeof listen !== 'string') throw new Error(`'metrics serving' without a listen address: ${JSON.stringify(line)}`);
  return `http://${listen}`;
}

/**
 * Polls `<imagesDir>/<id>.json` until the image's status is one of `statuses` (an image that ends
 * `killed` instead fails at once); resolves with the metadata.
 */
export async function waitForImageStatus(
  imagesDir: string,
  id: string,
  statuses: readonly string[] = ['active'],
  timeoutMs = 60_000,
): Promise<Record<string, unknown>> {
  const deadline = Date.now() + timeoutMs;
  let last: Record<string, unknown> | undefined;
  for (;;) {
    const text = await fs.readFile(path.join(imagesDir, `${id}.json`), 'utf8').catch(() => undefined);
    if (text !== undefined) {
      try {
        last = JSON.parse(text) as Record<string, unknown>;
      } catch {
        // Caught mid-write by a non-atomic writer: read it again.
      }
      if (last && statuses.includes(String(last.status))) return last;
      if (last?.status === 'killed') throw new Error(`image ${id} was killed: ${JSON.stringify(last)}`);
    }
    if (Date.now() > deadline) throw new Error(`image ${id} did not become ${statuses.join('|')} within ${timeoutMs} ms (last: ${JSON.stringify(last)})`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** A nova Instance object primitive, as nova's RPC API sends it. */
export function novaInstance(data: { uuid: string; display_name: string; user_id: string; project_id: string }): Record<string, unknown> {
  return {
    'nova_object.name': 'Instance',
    'nova_object.namespace': 'nova',
    'nova_object.version': '2.7',
    'nova_object.data': data,
  };
}

/** True if every byte of the raw image's [offset, offset + len) is `pattern`. */
export async function rawHasPattern(file: string, pattern: number, offset: number, len: number): Promise<boolean> {
  const fh = await fs.open(file, 'r');
  try {
    const buf = Buffer.alloc(len);
    const { bytesRead } = await fh.read(buf, 0, len, offset);
    return bytesRead === len && buf.every((b) => b === pattern);
  } finally {
    await fh.close();
  }
}
