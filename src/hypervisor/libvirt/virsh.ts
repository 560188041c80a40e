import { InstanceNotFound, LibvirtError } from '../../errors.js';
import { runProgram } from '../../util/exec.js';

/**
 * libvirt through `virsh -c <uri>`, one process per command, always from an argument vector and
 * bounded in time. (No npm binding of libvirt works on Node 20 with managed save, backup jobs,
 * monitor commands and events.) A process costs 60–120 ms to start here, so a step that holds the
 * guest runs one command, never several in a row.
 *
 * Each call opens its own connection: a libvirtd restarted between two calls is simply reached again.
 */

export interface VirshOptions {
  binary: string;
  uri: string;
  /** Bound of a command that asks or changes something at once (domstate, suspend, dumpxml…). */
  commandTimeoutMs: number;
}

/** What virsh says when the domain does not exist. */
const NO_DOMAIN = /failed to get domain|Domain not found|no domain with matching/i;

export class Virsh {
  constructor(readonly opts: VirshOptions) {}

  /**
   * Runs one virsh command; resolves with its stdout. A non-zero exit is a LibvirtError with virsh's
   * message (InstanceNotFound when the domain `uuid` does not exist).
   */
  async run(args: readonly string[], opts: { timeoutMs?: number; uuid?: string; verbose?: boolean } = {}): Promise<string> {
    const timeoutMs = opts.timeoutMs ?? this.opts.commandTimeoutMs;
    // -q drops virsh's informational lines ("Domain 'x' started"); `verbose` keeps them when they are the answer.
    const argv = [...(opts.verbose ? [] : ['-q']), '-c', this.opts.uri, ...args];
    let res;
    try {
      res = await runProgram(this.opts.binary, argv, { timeoutMs, env: { ...process.env, LC_ALL: 'C' } });
    } catch (err) {
      throw new LibvirtError(`cannot run ${this.opts.binary}: ${(err as Error).message}`, args, { cause: err });
    }
    if (res.code !== 0) {
      const msg = virshMessage(res.stderr) || res.stdout.trim() || `exit code ${res.code}`;
      if (opts.uuid !== undefined && NO_DOMAIN.test(msg)) throw new InstanceNotFound(opts.uuid);
      throw new LibvirtError(`virsh ${args[0]} failed: ${msg}`, args);
    }
    return res.stdout;
  }
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
