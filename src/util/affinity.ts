import { readFileSync } from 'node:fs';
import os from 'node:os';
import { ConfigError } from '../errors.js';
import { runProgram } from './exec.js';

/**
 * CPU affinity through util-linux's `taskset` (Node has no sched_setaffinity): `[DEFAULT] agent_cpus`
 * keeps the agent and the copies no guest waits for on the CPUs the operator set aside for the host,
 * and gives work a guest waits for every CPU.
 */

const AGENT_CPUS_OPTION = '[DEFAULT] agent_cpus';

let online: string | undefined;

/** The host's online CPUs as a list (`0-7`): what a process the agent starts for a guest may use. */
export function onlineCpus(): string {
  if (online === undefined) {
    try {
      online = readFileSync('/sys/devices/system/cpu/online', 'utf8').trim();
    } catch {
      online = `0-${Math.max(0, os.cpus().length - 1)}`;
    }
  }
  return online;
}

/**
 * The CPUs of work `kind` under `[DEFAULT] agent_cpus` (`agentCpus`): a copy no guest waits for runs
 * on them; what a guest waits for on every online CPU (the agent may be pinned, and its children
 * would inherit that). Unset: undefined, no affinity is set.
 */
export function cpusFor(agentCpus: string | undefined, kind: 'background' | 'guest'): string | undefined {
  if (agentCpus === undefined) return undefined;
  return kind === 'background' ? agentCpus : onlineCpus();
}

/** `file args` run on `cpus` (`taskset -c cpus file args`: taskset executes it, same pid); as is without. */
export function onCpus(file: string, args: readonly string[], cpus: string | undefined): [string, string[]] {
  return cpus === undefined ? [file, [...args]] : ['taskset', ['-c', cpus, file, ...args]];
}

/** Pins every thread of process `pid` to `cpus` (threads it starts later inherit it). */
export async function pinProcess(pid: number, cpus: string): Promise<void> {
  const args = ['-a', '-p', '-c', cpus, String(pid)];
  let res;
  try {
    res = await runProgram('taskset', args, { timeoutMs: 10_000, timeoutOption: AGENT_CPUS_OPTION });
  } catch (err) {
    throw new ConfigError(`cannot run the agent on CPUs ${cpus} (${AGENT_CPUS_OPTION}): cannot run taskset: ${(err as Error).message}`, { cause: err });
  }
  if (res.code !== 0) {
    throw new ConfigError(`cannot run the agent on CPUs ${cpus} (${AGENT_CPUS_OPTION}): ${res.stderr.trim() || `taskset exit code ${res.code}`}`);
  }
}
