import { InstanceNotFound, LibvirtError, ProgramTimeout } from '../../errors.js';
import { runProgram } from '../../util/exec.js';

/**
 * libvirt through `virsh -c <uri>`, one process per command, always from an argument vector and
 * bounded in time. (No npm binding of libvirt works on Node 20 with managed save, backup jobs,
 * monitor commands and events.) A process costs 60–120 ms to start here, so a step that holds the
 * guest runs one command, never several in a row.
 *
 * Each call opens its own connection: a libvirtd restarted between two calls is simply reached again,
 * and a call that finds libvirtd gone (not answering: nothing was sent) is tried again until it is
 * back, for up to the command's bound. A call cut in the middle is not repeated: it fails, and the
 * caller looks at the domain to see what happened.
 */

export interface VirshOptions {
  binary: string;
  uri: string;
  /** Bound of a command that asks or changes something at once (domstate, suspend, dumpxml…). */
  commandTimeoutMs: number;
}

/** What virsh says when the domain does not exist. */
const NO_DOMAIN = /failed to get domain|Domain not found|no domain with matching/i;
/** What virsh says when it could not reach libvirtd at all (so the command was never sent). */
const NOT_REACHED = /failed to connect to the hypervisor/i;
const RECONNECT_DELAY_MS = 250;
/** The line `virsh -t` prints after a command's output. */
const TIMING = /\n?\(Time: (\d+(?:\.\d+)?) ms\)\s*$/;

export interface RunOptions {
  timeoutMs?: number;
  /** The option `timeoutMs` comes from, named when it fires (default: qmp_timeout's, when timeoutMs is unset). */
  timeoutOption?: string;
  /** The domain the command is about: its absence is InstanceNotFound. */
  uuid?: string;
  verbose?: boolean;
}

export class Virsh {
  constructor(readonly opts: VirshOptions) {}

  /**
   * Runs one virsh command; resolves with its stdout. A non-zero exit is a LibvirtError with virsh's
   * message (InstanceNotFound when the domain `uuid` does not exist).
   */
  async run(args: readonly string[], opts: RunOptions = {}): Promise<string> {
    return this.exec(args, opts, []);
  }

  /**
   * Runs one command with virsh's own timing (`-t`): resolves with its stdout and how long the
   * command took from libvirt's call to its answer, virsh's start and connection left out.
   */
  async runTimed(args: readonly string[], opts: RunOptions = {}): Promise<{ stdout: string; commandMs: number }> {
    const timed = splitTiming(await this.exec(args, opts, ['-t']));
    if (!timed) throw new LibvirtError(`virsh ${args[0]} printed no timing line`, args);
    return timed;
  }

  private async exec(args: readonly string[], opts: RunOptions, extra: readonly string[]): Promise<string> {
    const timeoutMs = opts.timeoutMs ?? this.opts.commandTimeoutMs;
    // -q drops virsh's informational lines ("Domain 'x' started"); `verbose` keeps them when they are the answer.
    const argv = [...(opts.verbose ? [] : ['-q']), ...extra, '-c', this.opts.uri, ...args];
    const reconnectUntil = Date.now() + this.opts.commandTimeoutMs;
    let res;
    for (;;) {
      try {
        res = await runProgram(this.opts.binary, argv, {
          timeoutMs,
          timeoutOption: opts.timeoutOption ?? (opts.timeoutMs === undefined ? '[hypervisor] qmp_timeout' : undefined),
          env: { ...process.env, LC_ALL: 'C' },
        });
      } catch (err) {
        if (err instanceof ProgramTimeout) throw new LibvirtError(`virsh ${args[0]}: ${err.message}`, args, { cause: err });
        throw new LibvirtError(`cannot run ${this.opts.binary}: ${(err as Error).message}`, args, { cause: err });
      }
      if (res.code === 0 || !NOT_REACHED.test(res.stderr) || Date.now() > reconnectUntil) break;
      await new Promise((r) => setTimeout(r, RECONNECT_DELAY_MS));
    }
    if (res.code !== 0) {
      const msg = virshMessage(res.stderr) || res.stdout.trim() || `exit code ${res.code}`;
      if (opts.uuid !== undefined && NO_DOMAIN.test(msg)) throw new InstanceNotFound(opts.uuid);
      throw new LibvirtError(`virsh ${args[0]} failed: ${msg}`, args);
    }
    return res.stdout;
  }
}

/** The output of `virsh -t` split into the command's own output and its timing line; undefined without one. */
export function splitTiming(out: string): { stdout: string; commandMs: number } | undefined {
  const m = TIMING.exec(out);
  return m ? { stdout: out.slice(0, m.index), commandMs: Number(m[1]) } : undefined;
}

/** virsh's error lines without their "error: " prefix, joined. */
export function virshMessage(stderr: string): string {
  return stderr
    .split('\n')
    .map((l) => l.replace(/^error:\s*/, '').trim())
    .filter((l) => l !== '')
    .join('; ');
}

/** `Key:   value` lines (dominfo, domjobinfo) as a map; continuation lines are dropped. */
export function parseKeyValues(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split('\n')) {
    const m = /^([^:\s][^:]*):\s*(.*)$/.exec(line.trimEnd());
    if (m) out.set(m[1]!.trim(), m[2]!.trim());
  }
  return out;
}
