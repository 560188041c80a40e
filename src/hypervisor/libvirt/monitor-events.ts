import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import readline from 'node:readline';
import type { Logger } from '../../log.js';
import type { VirshOptions } from './virsh.js';

/**
 * QEMU monitor events of one domain with QEMU's own timestamps (its host clock), from
 * `virsh qemu-monitor-event <uuid> --loop`: without `--timestamp` virsh prints the time QEMU stamped
 * the event with, e.g. `event STOP at 1796011892.142250 for domain 'x': <null>`. One listener keeps
 * receiving across the domain's QEMU processes (a managed save's STOP, then the restore's RESUME).
 *
 * The listener is a virsh process: it is known to be listening once its main thread blocks reading
 * its event pipe (libvirt's virsh registers the callback, then waits on that pipe), which /proc shows.
 * If it exits (libvirtd restarted) it is started again; events in between are lost, and callers fall
 * back to their own clock.
 */

export interface MonitorEvent {
  name: string;
  /** QEMU's timestamp, epoch ms (with µs). */
  atMs: number;
  data: string;
}

const LINE = /^event (\S+) at (\d+)\.(\d{1,6}) for domain '.*': (.*)$/;
const READY_POLL_MS = 5;
const RESPAWN_DELAY_MS = 500;
/** The longest one listener process lives (s); a watch still open then starts another. */
const LISTENER_LIFETIME_S = 600;
/** Events kept per watch (an operation's worth). */
const KEEP = 500;

export function parseEventLine(line: string): MonitorEvent | undefined {
  const m = LINE.exec(line.trim());
  if (!m) return undefined;
  return { name: m[1]!, atMs: Number(m[2]) * 1000 + Number(m[3]!.padEnd(6, '0')) / 1000, data: m[4]! };
}

/** True once the process's main thread is blocked in read(2) on a pipe whose write end it also holds. */
async function waitingOnOwnPipe(pid: number): Promise<boolean> {
  const syscall = await fs.readFile(`/proc/${pid}/syscall`, 'utf8').catch(() => '');
  const [nr, fdHex] = syscall.trim().split(' ');
  if (nr !== '0' || fdHex === undefined) return false; // 0: read
  const fd = Number.parseInt(fdHex, 16);
  const target = await fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
  if (!target.startsWith('pipe:')) return false;
  const fds = await fs.readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
  for (const other of fds) {
    if (Number(other) === fd) continue;
    if ((await fs.readlink(`/proc/${pid}/fd/${other}`).catch(() => '')) === target) return true;
  }
  return false;
}

export class DomainEventWatch {
  private readonly events: MonitorEvent[] = [];
  private readonly waiters = new Set<() => void>();
  private child?: ChildProcess;
  private closed = false;

  private constructor(
    private readonly virsh: VirshOptions,
    readonly uuid: string,
    private readonly log: Logger,
  ) {}

  /** Starts listening; resolves once the listener is registered (or after readyTimeoutMs, logged). */
  static async open(virsh: VirshOptions, uuid: string, log: Logger, readyTimeoutMs: number): Promise<DomainEventWatch> {
    const watch = new DomainEventWatch(virsh, uuid, log);
    await watch.spawn(readyTimeoutMs);
    return watch;
  }

  private async spawn(readyTimeoutMs: number): Promise<void> {
    // Bounded: a listener whose agent was killed (SIGKILL leaves its children) ends by itself; an open
    // watch starts a new one when it does.
    const bound = String(LISTENER_LIFETIME_S);
    const child = spawn(this.virsh.binary, ['-q', '-c', this.virsh.uri, 'qemu-monitor-event', this.uuid, '--loop', '--timeout', bound], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C' },
    });
    this.child = child;
    // A watch kept for a restore that another process will do must not keep this one alive, nor
    // outlive it.
    child.unref();
    (child.stdout as unknown as { unref(): void }).unref();
    (child.stderr as unknown as { unref(): void }).unref();
    const killAtExit = () => child.kill('SIGTERM');
    process.once('exit', killAtExit);
    child.once('exit', () => process.off('exit', killAtExit));
    let stderr = '';
    child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr = (stderr + c).slice(-2000)));
    readline.createInterface({ input: child.stdout! }).on('line', (line) => {
      const ev = parseEventLine(line);
      if (ev === undefined) return;
      this.events.push(ev);
      if (this.events.length > KEEP) this.events.shift();
      for (const wake of this.waiters) wake();
    });
    child.on('error', (err) => this.log.warn({ instance_uuid: this.uuid, err: err.message }, 'cannot run the QEMU event listener (virsh)'));
    child.on('exit', (code, signal) => {
      if (this.closed || this.child !== child) return;
      this.log.info({ instance_uuid: this.uuid, code, signal, stderr: stderr.trim() }, 'QEMU event listener ended: starting it again');
      setTimeout(() => {
        if (!this.closed) this.spawn(readyTimeoutMs).catch(() => undefined);
      }, RESPAWN_DELAY_MS).unref();
    });
    const deadline = Date.now() + readyTimeoutMs;
    while (child.pid !== undefined && child.exitCode === null && !(await waitingOnOwnPipe(child.pid))) {
      if (Date.now() > deadline) {
        this.log.warn({ instance_uuid: this.uuid, timeout_ms: readyTimeoutMs }, 'QEMU event listener not seen listening: its events may be missed');
        return;
      }
      await new Promise((r) => setTimeout(r, READY_POLL_MS));
    }
  }

  /**
   * The first event `name` stamped at or after `sinceMs` (epoch ms); waits up to `timeoutMs` for it
   * to arrive; undefined if it does not.
   */
  async find(name: string, sinceMs: number, timeoutMs: number): Promise<MonitorEvent | undefined> {
    const pick = () => this.events.find((e) => e.name === name && e.atMs >= sinceMs);
    const found = pick();
    if (found !== undefined || this.closed) return found;
    return new Promise((resolve) => {
      const done = (ev: MonitorEvent | undefined) => {
        clearTimeout(timer);
        this.waiters.delete(wake);
        resolve(ev);
      };
      const wake = () => {
        const ev = pick();
        if (ev !== undefined || this.closed) done(ev);
      };
      const timer = setTimeout(() => done(undefined), timeoutMs);
      this.waiters.add(wake);
    });
  }

  close(): void {
    this.closed = true;
    for (const wake of this.waiters) wake();
    this.child?.kill('SIGTERM');
  }
}
