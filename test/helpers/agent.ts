import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';

/**
 * The agent as operators run it: `node dist/cli/main.js --config-file X serve` in a child process
 * (test/global-setup.ts builds dist/). Its stderr (pino JSON, one object a line) is collected and
 * parsed, so that tests can wait for and assert on log lines.
 */

const CLI = path.resolve(import.meta.dirname, '../../dist/cli/main.js');

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
    const count = opts.count ?? 1;
    const timeoutMs = opts.timeoutMs ?? 60_000;
    const what = `log line ${String(msg)} ${JSON.stringify(fields)} (#${count})`;
    return new Promise<LogLine>((resolve, reject) => {
      const check = (): boolean => {
        const found = this.find(msg, fields);
        if (found.length >= count) {
          done();
          resolve(found[count - 1]!);
          return true;
        }
        if (this.exit) {
          done();
          reject(new Error(`agent exited (${JSON.stringify(this.exit)}) before ${what}\n${this.tail()}`));
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`no ${what} within ${timeoutMs} ms\n${this.tail()}`));
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
  const child = spawn(process.execPath, [CLI, '--config-file', configFile, 'serve'], {
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
