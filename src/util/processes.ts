import { readFileSync } from 'node:fs';
import fs from 'node:fs/promises';

/** A process of this host and its argument vector, as /proc shows them. */
export interface HostProcess {
  pid: number;
  argv: string[];
}

/**
 * Every other process of this host (this one left out) whose argv `match` accepts. Processes that
 * end while being read are skipped.
 */
export async function processesWhere(match: (argv: readonly string[]) => boolean): Promise<HostProcess[]> {
  const out: HostProcess[] = [];
  for (const entry of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid === process.pid) continue;
    const cmdline = await fs.readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
    const argv = cmdline.split('\0').filter((a) => a !== '');
    if (argv.length > 0 && match(argv)) out.push({ pid, argv });
  }
  return out;
}

/** A process as /proc shows it: pid and start time (which tells a reused pid apart). */
export interface ProcRef {
  pid: number;
  start: string;
}

/** `root` and every process descending from it (empty if `root` is gone). */
export async function processTree(root: number): Promise<ProcRef[]> {
  const byParent = new Map<number, ProcRef[]>();
  let rootRef: ProcRef | undefined;
  for (const entry of await fs.readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await readStat(Number(entry));
    if (!stat) continue;
    if (stat.pid === root) rootRef = stat;
    const list = byParent.get(stat.ppid) ?? [];
    list.push(stat);
    byParent.set(stat.ppid, list);
  }
  if (!rootRef) return [];
  const out: ProcRef[] = [rootRef];
  for (let i = 0; i < out.length; i++) out.push(...(byParent.get(out[i]!.pid) ?? []));
  return out;
}

async function readStat(pid: number): Promise<(ProcRef & { ppid: number; state: string }) | undefined> {
  const text = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  if (text === '') return undefined;
  // "pid (comm) S ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime
  // cstime priority nice threads itrealvalue starttime ...": comm may hold spaces and parentheses.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return { pid, state: fields[0] ?? '', ppid: Number(fields[1]), start: fields[19] ?? '' };
}

/** Whether any of these processes (the same ones: not a reused pid) is still there, not a zombie. */
export async function anyAlive(tree: readonly ProcRef[]): Promise<boolean> {
  for (const p of tree) {
    const s = await readStat(p.pid);
    if (s && s.start === p.start && s.state !== 'Z' && s.state !== 'X') return true;
  }
  return false;
}

/** Sends `signal` to the process if its pid still names the same process. */
export function signalIfSame(p: ProcRef, signal: NodeJS.Signals): void {
  // Checked synchronously right before the signal: not another process that got the pid meanwhile.
  let text: string;
  try {
    text = readFileSync(`/proc/${p.pid}/stat`, 'utf8');
  } catch {
    return;
  }
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  if (fields[19] !== p.start) return;
  try {
    process.kill(p.pid, signal);
  } catch {
    // Gone meanwhile.
  }
}
