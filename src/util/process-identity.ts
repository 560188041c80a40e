import { readFile } from 'node:fs/promises';

/**
 * Who a process is, in a way that survives pid reuse: its pid, its start time (clock ticks since
 * boot, field 22 of /proc/<pid>/stat) and the kernel's boot id. A record written by a process
 * names it so; a later process can tell whether the writer is still running.
 */
export interface ProcessIdentity {
  pid: number;
  /** /proc/<pid>/stat starttime; null where /proc cannot tell. */
  start: string | null;
  /** /proc/sys/kernel/random/boot_id; null where /proc cannot tell. */
  boot: string | null;
}

let self: Promise<ProcessIdentity> | undefined;

/** This process's identity (read once). */
export function selfIdentity(): Promise<ProcessIdentity> {
  self ??= (async () => ({ pid: process.pid, start: await startTime(process.pid), boot: await bootId() }))();
  return self;
}

/** True while the process `id` names is running (the same process, not a later one with its pid). */
export async function isRunning(id: ProcessIdentity): Promise<boolean> {
  // kill(0) and kill(-n) signal process groups: only a positive pid names one process.
  if (!Number.isSafeInteger(id.pid) || id.pid <= 0) return false;
  if (id.boot !== null && id.boot !== (await bootId())) return false; // the host rebooted since
  try {
    process.kill(id.pid, 0);
  } catch (err) {
    // EPERM: it exists but belongs to another user.
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  if (id.start === null) return true;
  const now = await startTime(id.pid);
  return now === null || now === id.start;
}

async function startTime(pid: number): Promise<string | null> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')' only.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const state = fields[0];
    if (state === 'Z' || state === 'X') return 'gone'; // a zombie is no longer running
    return fields[19] ?? null;
  } catch {
    return null;
  }
}

async function bootId(): Promise<string | null> {
  try {
    return (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
  } catch {
    return null;
  }
}
