import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';

/**
 * Runs the committed oslo.messaging scripts of test/interop/ with the system Python that has
 * oslo.messaging (not a pyenv `python3` on PATH), with an argument vector, and reads the JSON
 * lines they print. A missing Python or oslo.messaging fails the test with the script's stderr.
 */

export const OSLO_PYTHON = process.env.OSLO_PYTHON ?? '/usr/bin/python3';
const INTEROP = path.resolve(import.meta.dirname, '../interop');

export interface PythonRun {
  code: number | null;
  /** stdout, one parsed JSON value per non-empty line. */
  lines: Record<string, unknown>[];
  stderr: string;
}

/** Fails loudly unless the Python that the interop scripts need can import oslo.messaging. */
export async function assertOsloMessaging(): Promise<void> {
  const run = await runScriptRaw(['-c', 'import oslo_messaging, oslo_config']);
  if (run.code !== 0) {
    throw new Error(`${OSLO_PYTHON} with oslo.messaging is required by the interop tests (set OSLO_PYTHON): ${run.stderr}`);
  }
}

function parseLines(stdout: string, stderr: string): Record<string, unknown>[] {
  return stdout
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      try {
        return JSON.parse(l) as Record<string, unknown>;
      } catch {
        throw new Error(`interop script printed a non-JSON line: ${l}\nstderr:\n${stderr}`);
      }
    });
}

function runScriptRaw(argv: string[], timeoutMs = 180_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(OSLO_PYTHON, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${OSLO_PYTHON}: ${err.message}`));
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

export interface OsloStep {
  name: string;
  kind: 'call' | 'cast';
  method: string;
  args?: Record<string, unknown>;
  version?: string;
  /** Seconds the call waits for its reply (default 60). */
  timeout?: number;
  /** Let the client rebuild oslo_messaging.rpc.dispatcher exceptions (else RemoteError). */
  exmods?: boolean;
  context?: Record<string, unknown>;
}

export type OsloStepResult =
  | { name: string; ok: true; result: unknown }
  | {
      name: string;
      ok: false;
      exc_module: string;
      exc_class: string;
      /** RemoteError's exc_type: the server's exception class. */
      exc_type: string | null;
      /** The oslo.messaging exception classes it is an instance of (NoSuchMethod, UnsupportedVersion, RemoteError, MessagingTimeout). */
      is_a: string[];
      message: string;
    };

/** Runs test/interop/oslo_rpc.py: the steps in order; resolves with each step's outcome by name. */
export async function osloRpc(url: string, server: string, steps: OsloStep[]): Promise<Map<string, OsloStepResult>> {
  const run = await runScriptRaw([path.join(INTEROP, 'oslo_rpc.py'), url, server, JSON.stringify(steps)]);
  if (run.code !== 0) throw new Error(`oslo_rpc.py exited ${run.code}:\n${run.stdout}\n${run.stderr}`);
  const results = parseLines(run.stdout, run.stderr) as unknown as OsloStepResult[];
  if (results.length !== steps.length) {
    throw new Error(`oslo_rpc.py printed ${results.length} results for ${steps.length} steps:\n${run.stdout}\n${run.stderr}`);
  }
  return new Map(results.map((r) => [r.name, r]));
}

/** A received notification, as test/interop/oslo_listener.py prints it. */
export interface OsloNotification {
  priority: string;
  publisher_id: string;
  event_type: string;
  payload: Record<string, unknown>;
  ctxt: Record<string, unknown>;
  metadata: Record<string, unknown>;
}

export interface OsloListener {
  /** Resolves when every awaited event type has arrived (or rejects on the script's timeout). */
  done: Promise<OsloNotification[]>;
  kill(): void;
}

/**
 * Starts test/interop/oslo_listener.py and resolves once it listens (its queues are declared), so
 * that nothing sent afterwards is missed. `eventTypes`: "event.type" or "event.type=COUNT"; `done`
 * resolves once each has arrived (COUNT times).
 */
export function startOsloListener(url: string, timeoutS: number, eventTypes: string[]): Promise<OsloListener> {
  const child: ChildProcess = spawn(OSLO_PYTHON, [path.join(INTEROP, 'oslo_listener.py'), url, String(timeoutS), ...eventTypes], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  return new Promise<OsloListener>((resolveReady, rejectReady) => {
    let ready = false;
    const done = new Promise<OsloNotification[]>((resolve, reject) => {
      child.on('error', (err) => reject(new Error(`cannot run ${OSLO_PYTHON}: ${err.message}`)));
      child.on('close', (code) => {
        let lines: Record<string, unknown>[];
        try {
          lines = parseLines(stdout, stderr);
        } catch (err) {
          reject(err as Error);
          return;
        }
        if (code !== 0) reject(new Error(`oslo_listener.py exited ${code}:\n${stdout}\n${stderr}`));
        else resolve(lines.filter((l) => !('ready' in l)) as unknown as OsloNotification[]);
      });
    });
    done.catch(() => undefined);
    child.stdout!.on('data', (c: Buffer) => {
      stdout += c.toString();
      if (!ready && stdout.includes('{"ready": true}')) {
        ready = true;
        resolveReady({ done, kill: () => child.kill('SIGKILL') });
      }
    });
    done.then(
      () => {
        if (!ready) rejectReady(new Error(`oslo_listener.py ended before it was listening:\n${stdout}\n${stderr}`));
      },
      (err: unknown) => {
        if (!ready) rejectReady(err);
      },
    );
  });
}
