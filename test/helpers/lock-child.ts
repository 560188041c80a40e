import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';

const ROOT = path.resolve(import.meta.dirname, '../..');

/**
 * A real child process (node, the TypeScript sources through tsx) that works a PidLock on `file`
 * when told to on its stdin, one command a line, and answers each with one JSON line on its stdout:
 * - `acquire` → `{"held":true}` or `{"held":false,"holder":{…}}` (not waiting);
 * - `wait` → `{"held":true}` once it holds the lock (waiting for it; `{"waiting":true}` first if it must);
 * - `release` → `{"released":true}`;
 * - `holder` → `{"holder":{…}|null}`.
 */
export class LockChild {
  private readonly answers: string[] = [];
  private readonly waiters: ((line: string) => void)[] = [];
  private stderr = '';
  readonly exited: Promise<unknown>;

  private constructor(readonly child: ChildProcess) {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const w = this.waiters.shift();
      if (w) w(line);
      else this.answers.push(line);
    });
    child.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.exited = once(child, 'exit');
  }

  static async start(file: string, what?: string): Promise<LockChild> {
    const script = [
      `const { PidLock } = await import(${JSON.stringify(pathToFileURL(path.join(ROOT, 'src/util/pid-lock.ts')).href)});`,
      `const { createInterface } = await import('node:readline');`,
      `const lock = new PidLock(${JSON.stringify(file)}${what === undefined ? '' : `, ${JSON.stringify(what)}`});`,
      'const say = (o) => process.stdout.write(JSON.stringify(o) + "\\n");',
      'say({ ready: true });',
      'for await (const cmd of createInterface({ input: process.stdin })) {',
      '  if (cmd === "acquire") { const holder = await lock.acquire(); say(holder === undefined ? { held: true } : { held: false, holder }); }',
      '  else if (cmd === "wait") { await lock.acquire({ wait: { onWait: () => say({ waiting: true }) } }); say({ held: true }); }',
      '  else if (cmd === "release") { await lock.release(); say({ released: true }); }',
      '  else if (cmd === "holder") { say({ holder: (await lock.holder()) ?? null }); }',
      '}',
    ].join('\n');
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      cwd: ROOT,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const c = new LockChild(child);
    const ready = await c.next();
    if (!('ready' in ready)) throw new Error(`lock child: unexpected first line ${JSON.stringify(ready)}`);
    return c;
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** Sends a command without waiting for its answer. */
  send(cmd: 'acquire' | 'wait' | 'release' | 'holder'): void {
    this.child.stdin!.write(`${cmd}\n`);
  }

  /** The next answer line, parsed; rejects if the child exits first. */
  next(): Promise<Record<string, unknown>> {
    const queued = this.answers.shift();
    if (queued !== undefined) return Promise.resolve(JSON.parse(queued) as Record<string, unknown>);
    return new Promise((resolve, reject) => {
      const onExit = (code: number | null, signal: string | null) =>
        reject(new Error(`lock child ${this.pid} exited (${code ?? signal}) before answering: ${this.stderr}`));
      this.child.once('exit', onExit);
      this.waiters.push((line) => {
        this.child.off('exit', onExit);
        resolve(JSON.parse(line) as Record<string, unknown>);
      });
    });
  }

  async command(cmd: 'acquire' | 'wait' | 'release' | 'holder'): Promise<Record<string, unknown>> {
    this.send(cmd);
    return this.next();
  }

  /** SIGKILL, and wait until the process is gone (reaped). */
  async kill(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill('SIGKILL');
    await this.exited;
  }
}
