import fs from 'node:fs/promises';
import {
  InstanceInvalidState,
  InstanceNotFound,
  InvalidInstanceId,
  QemuProcessError,
  QmpDisconnected,
  SafetyViolation,
  errorMessage,
} from '../../errors.js';
import type { Logger } from '../../log.js';
import type { QemuImg } from '../../qemu-img/qemu-img.js';
import { pathExists } from '../../util/durable-fs.js';
import { cpusFor, onCpus } from '../../util/affinity.js';
import { isUuid } from '../../util/uuid.js';
import type { PowerState } from '../types.js';
import { launchDaemonized, qemuArgv } from './launch.js';
import { InstanceLayout, type InstanceRecord, readInstanceRecord, resolveBootFiles } from './layout.js';
import { findGuestProcess, killGuest, waitForGuestExit } from './qemu-process.js';
import type { QmpClient } from './qmp.js';
import { QmpSessions } from './qmp-sessions.js';

/**
 * The core of the qemu backend, which every part of it builds on: where an instance's files are,
 * its instance.json, whether its QEMU process lives and in which power state, the QMP sessions this
 * object's operations share, and launching and ending a guest's QEMU process.
 */

export interface QemuGuestsOptions {
  instancesPath: string;
  qemuBinary: string;
  /**
   * `[DEFAULT] agent_cpus`: the agent may be pinned there, and a guest's QEMU it starts would inherit
   * that; with it set, QEMU is started on every online CPU instead.
   */
  agentCpus?: string;
  qemuImg: QemuImg;
  /** `-machine accel=`: "kvm", "tcg" or a fallback list such as "kvm:tcg". */
  accel: string;
  /** Default timeout of each QMP command. */
  qmpTimeoutMs: number;
  log: Logger;
}

/** An instance and its live QEMU process, if any. */
export interface ProcessProbe {
  layout: InstanceLayout;
  record: InstanceRecord;
  /** The guest's live QEMU process, if any. */
  pid?: number;
}

/** An instance with its power state. */
export interface Probe extends ProcessProbe {
  state: PowerState;
}

/** After SIGKILL, how long to wait for the kernel to reap the process. */
const KILL_WAIT_MS = 10_000;

/** Maps a QMP `query-status` run state to a power state. */
export function powerStateOfRunState(status: string): PowerState {
  switch (status) {
    case 'running':
      return 'running';
    case 'internal-error':
    case 'guest-panicked':
    case 'shutdown':
      return 'crashed';
    default:
      // paused, prelaunch, inmigrate, postmigrate, finish-migrate, save-vm, restore-vm, io-error, ...
      return 'paused';
  }
}

export class QemuGuests {
  readonly instancesPath: string;
  readonly qemuImg: QemuImg;
  readonly log: Logger;
  readonly qmpTimeoutMs: number;
  private readonly sessions: QmpSessions;

  constructor(private readonly opts: QemuGuestsOptions) {
    this.instancesPath = opts.instancesPath;
    this.qemuImg = opts.qemuImg;
    this.log = opts.log;
    this.qmpTimeoutMs = opts.qmpTimeoutMs;
    this.sessions = new QmpSessions(opts.qmpTimeoutMs, opts.log);
  }

  layoutOf(uuid: string): InstanceLayout {
    if (!isUuid(uuid)) throw new InvalidInstanceId(uuid);
    return new InstanceLayout(this.instancesPath, uuid.toLowerCase());
  }

  async readRecord(layout: InstanceLayout): Promise<InstanceRecord> {
    try {
      return await readInstanceRecord(layout.instanceJson);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new InstanceNotFound(layout.uuid);
      throw err;
    }
  }

  /** The instance and its live process (if any), without asking QEMU anything. */
  async probeProcess(uuid: string): Promise<ProcessProbe> {
    const layout = this.layoutOf(uuid);
    const record = await this.readRecord(layout);
    const pid = await findGuestProcess(layout.pidFile, layout.uuid);
    return { layout, record, pid };
  }

  /**
   * The instance with its power state (asks QEMU over QMP when a process is alive). A process whose
   * monitor cannot be reached is exiting (a managed save's QEMU after `quit`: its socket is gone
   * before the process) or starting (a resume's, before it listens): asked again until it has gone
   * or answers, within the QMP timeout.
   */
  async probe(uuid: string): Promise<Probe> {
    const deadline = Date.now() + this.qmpTimeoutMs;
    for (;;) {
      const p = await this.probeProcess(uuid);
      if (p.pid === undefined) return { ...p, state: await this.offlineState(p.layout) };
      try {
        const state = await this.withQmp(p.layout, (qmp) => this.queryPowerState(qmp));
        return { ...p, state };
      } catch (err) {
        if ((await findGuestProcess(p.layout.pidFile, p.layout.uuid)) === undefined) continue; // it exited meanwhile
        if (!(err instanceof QmpDisconnected) || Date.now() >= deadline) throw err;
        await new Promise((r) => setTimeout(r, PROBE_RETRY_MS));
      }
    }
  }

  async offlineState(layout: InstanceLayout): Promise<PowerState> {
    if (await pathExists(layout.saveState)) return 'saved';
    // QEMU removes its pidfile when it exits cleanly; one left behind means it died.
    if (await pathExists(layout.pidFile)) return 'crashed';
    return 'shutoff';
  }

  async queryPowerState(qmp: QmpClient): Promise<PowerState> {
    const st = await qmp.execute<{ status: string }>('query-status');
    return powerStateOfRunState(st.status);
  }

  async requireProcess(uuid: string, what: string): Promise<ProcessProbe & { pid: number }> {
    const p = await this.probeProcess(uuid);
    if (p.pid === undefined) {
      const state = await this.offlineState(p.layout);
      throw new InstanceInvalidState(`cannot ${what}: instance ${p.layout.uuid} has no QEMU process (it is ${state})`);
    }
    return { ...p, pid: p.pid };
  }

  /** SPEC §2: nothing but the guest's own QEMU may touch the disk while that QEMU has it open. */
  async requireNoProcess(uuid: string, what: string): Promise<ProcessProbe> {
    const p = await this.probeProcess(uuid);
    if (p.pid !== undefined) {
      throw new SafetyViolation(
        `refusing to ${what} on ${p.layout.disk}: QEMU process ${p.pid} of instance ${p.layout.uuid} has the disk open`,
      );
    }
    return p;
  }

  /**
   * Runs `fn` with the guest's QMP connection, which this object's overlapping operations share
   * (see QmpSessions).
   */
  withQmp<T>(layout: InstanceLayout, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    return this.sessions.use(layout.qmpSocket, fn);
  }

  /**
   * The CPUs of a process a guest waits for (its QEMU, its managed save's stream): every online CPU
   * when the agent may be pinned (`[DEFAULT] agent_cpus`), else what the agent has (no affinity set).
   */
  get guestCpus(): string | undefined {
    return cpusFor(this.opts.agentCpus, 'guest');
  }

  /** Launches the guest's QEMU daemonized (with extra arguments, and descriptors it inherits as fds 3, 4, …); resolves with its pid. */
  async launch(layout: InstanceLayout, record: InstanceRecord, extraArgs: readonly string[], inherit: readonly number[] = []): Promise<number> {
    layout.assertSocketPathsFit();
    const boot = await resolveBootFiles(layout.dir, record).catch((err: unknown) => {
      throw new QemuProcessError(`cannot start instance ${layout.uuid}: ${layout.instanceJson}: ${errorMessage(err)}`);
    });
    await removeFiles(layout.staleRuntimeFiles);
    const argv = [...qemuArgv(record, layout, this.opts.accel, boot), ...extraArgs];
    this.log.debug({ instance_uuid: layout.uuid, argv }, 'launching QEMU');
    const [file, args] = onCpus(this.opts.qemuBinary, argv, this.guestCpus);
    await launchDaemonized(file, args, layout.qemuLog, `QEMU of instance ${layout.uuid}`, this.qmpTimeoutMs, inherit);
    const pid = await findGuestProcess(layout.pidFile, layout.uuid);
    if (pid === undefined) {
      const out = (await fs.readFile(layout.qemuLog, 'utf8').catch(() => '')).trim();
      throw new QemuProcessError(`QEMU of instance ${layout.uuid} exited right after starting: ${out || '(no output)'}`);
    }
    return pid;
  }

  /**
   * Ends the guest's process and removes its runtime files. `quit`: send QMP quit and wait for the
   * exit; `quit-sent`: only wait; `kill`: SIGKILL at once. SIGKILL is the last resort of all three.
   */
  async endProcess(layout: InstanceLayout, pid: number, how: 'quit' | 'quit-sent' | 'kill'): Promise<void> {
    const uuid = layout.uuid;
    if (how === 'quit') {
      await this.withQmp(layout, (qmp) => qmp.execute('quit')).catch((err: unknown) => {
        if (!(err instanceof QmpDisconnected)) {
          this.log.warn({ instance_uuid: uuid, err: errorMessage(err) }, 'QMP quit failed');
        }
      });
    }
    const waitMs = how === 'kill' ? 0 : this.qmpTimeoutMs;
    if (!(await waitForGuestExit(pid, uuid, waitMs))) {
      if (how !== 'kill') this.log.warn({ instance_uuid: uuid, pid }, 'QEMU did not exit after quit: killing it');
      await killGuest(pid, uuid);
      if (!(await waitForGuestExit(pid, uuid, KILL_WAIT_MS))) {
        throw new QemuProcessError(`QEMU process ${pid} of instance ${uuid} survived SIGKILL`);
      }
    }
    await removeFiles(layout.processFiles);
  }
}

/** How soon a monitor that could not be reached is tried again (probe). */
const PROBE_RETRY_MS = 50;

export function invalidState(p: Probe, action: string): InstanceInvalidState {
  return new InstanceInvalidState(`cannot ${action} instance ${p.layout.uuid}: it is ${p.state}`);
}

export async function removeFiles(files: readonly string[]): Promise<void> {
  await Promise.all(files.map((f) => fs.rm(f, { force: true })));
}
