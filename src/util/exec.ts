import { spawn } from 'node:child_process';

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

export interface RunOptions {
  /** Called with each chunk of stdout as it arrives (e.g. qemu-img -p progress). */
  onStdout?: (chunk: string) => void;
  /** Kill the program (SIGKILL) after this many milliseconds. */
  timeoutMs?: number;
  /** Kill the program (SIGKILL) when this is aborted; it then resolves with the code it had. */
  signal?: AbortSignal;
  env?: NodeJS.ProcessEnv;
}

/**
 * Runs a program from an argument vector (never through a shell) and collects its output.
 * Resolves with the exit code; it is up to the caller to treat non-zero as an error.
 */
export function runProgram(file: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, [...args], { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
    let stdout = '';
    let stderr = '';
    let timer: NodeJS.Timeout | undefined;
    let timedOut = false;
    if (opts.timeoutMs !== undefined) {
      timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
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
    child.on('error', (err) => {
      if (timer) clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
      reject(err);
    });
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
      if (timedOut) stderr += `\n(killed after ${opts.timeoutMs} ms)`;
      resolve({ stdout, stderr, code: code ?? (signal ? 128 : 1) });
    });
  });
}
