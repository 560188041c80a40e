import { spawn } from 'node:child_process';
import { getPriority, setPriority } from 'node:os';
import { ProgramTimeout } from '../errors.js';
import { anyAlive, processTree, signalIfSame } from './processes.js';

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

export interface RunOptions {
  /** Called with each chunk of stdout as it arrives (e.g. qemu-img -p progress). */
  onStdout?: (chunk: string) => void;
  /**
   * The program's bound, in ms. Past it the program and every process it started get SIGTERM, and
   * SIGKILL `killGraceMs` later if still there; runProgram then rejects with ProgramTimeout.
   */
  timeoutMs?: number;
  /** The operator's name for the bound (e.g. `[hypervisor] qemu_img_timeout`), for the ProgramTimeout. */
  timeoutOption?: string;
  /** From SIGTERM to SIGKILL once the bound has passed; default DEFAULT_KILL_GRACE_MS. */
  killGraceMs?: number;
  /** Kill the program (SIGKILL) when this is aborted; it then resolves with the code it had. */
  signal?: AbortSignal;
  env?: NodeJS.ProcessEnv;
  /**
   * Run it at this niceness at least (never above the priority it inherits), set right after it
   * starts: the threads it makes from then on inherit it; one made before, such as QEMU's RCU
   * thread, keeps the inherited one.
   */
  nice?: number;
}

/** From SIGTERM to SIGKILL when a program overruns its bound. */
export const DEFAULT_KILL_GRACE_MS = 5000;
/** After the program was killed, how long its output pipes may stay open (held by an escaped descendant). */
const PIPE_CLOSE_MS = 1000;

/**
 * Runs a program from an argument vector (never through a shell) and collects its output.
 * Resolves with the exit code; it is up to the caller to treat non-zero as an error. Rejects with
 * ProgramTimeout when it overran `timeoutMs` (it is then gone, with every process it started).
 */
export function runProgram(file: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, [...args], { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
    if (opts.nice !== undefined && child.pid !== undefined) {
      try {
        if (getPriority(child.pid) < opts.nice) setPriority(child.pid, opts.nice);
      } catch {
        // Gone already (its exit is reported below), or not allowed: it runs at our priority.
      }
    }
    let stdout = '';
    let stderr = '';
    let timer: NodeJS.Timeout | undefined;
    let timedOut = false;
    let stopping: Promise<void> | undefined;
    if (opts.timeoutMs !== undefined && child.pid !== undefined) {
      const pid = child.pid;
      timer = setTimeout(() => {
        timedOut = true;
        stopping = stopTree(pid, opts.killGraceMs ?? DEFAULT_KILL_GRACE_MS, () => child.exitCode !== null || child.signalCode !== null);
      }, opts.timeoutMs);
    }
    const onAbort = () => child.kill('SIGKILL');
    if (opts.signal?.aborted) onAbort();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    child.stdout.setEncoding('utf8');
    child.stderr.setEncoding('utf8');
    child.stdout.on('data', (c: string) => {
      stdout += c;
      opts.onStdout?.(c);
    });
    child.stderr.on('data', (c: string) => {
      stderr += c;
    });
    child.on('exit', () => {
      if (!timedOut) return;
      // A descendant that escaped the kill may hold our pipes open: do not wait on it.
      setTimeout(() => {
        child.stdout.destroy();
        child.stderr.destroy();
      }, PIPE_CLOSE_MS).unref();
    });
    child.on('error', (err) => {
      if (timer) clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
      reject(err);
    });
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
      if (timedOut) {
        // Resolved once every process of the tree is gone (or SIGKILLed).
        void (stopping ?? Promise.resolve()).then(() => reject(new ProgramTimeout(file, args, opts.timeoutMs!, opts.timeoutOption, stderr)));
        return;
      }
      resolve({ stdout, stderr, code: code ?? (signal ? 128 : 1) });
    });
  });
}

/**
 * SIGTERM to `pid` and its descendants, then, after `graceMs` unless all are gone, SIGKILL to those
 * still there (the same processes: a pid reused meanwhile is left alone).
 */
async function stopTree(pid: number, graceMs: number, rootExited: () => boolean): Promise<void> {
  const tree = await processTree(pid);
  for (const p of tree) signalIfSame(p, 'SIGTERM');
  const deadline = Date.now() + graceMs;
  while (Date.now() < deadline) {
    if (!rootExited() || (await anyAlive(tree))) await sleep(Math.min(50, Math.max(1, deadline - Date.now())));
    else return;
  }
  // Children started during the grace period are part of it too.
  const late = rootExited() ? [] : await processTree(pid);
  for (const p of [...tree, ...late]) signalIfSame(p, 'SIGKILL');
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
