import fs from 'node:fs/promises';

/**
 * Finding and ending a guest's daemonized QEMU process. QEMU is not our child (it daemonizes), so
 * we cannot wait() for it: liveness is read from /proc, and a pid counts as the guest's QEMU only
 * if its command line carries the instance uuid (a pidfile may outlive its process, and pids are
 * reused).
 */

/** The pid in a QEMU pidfile, or undefined when the file is missing or empty. */
export async function readPidFile(file: string): Promise<number | undefined> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  const pid = Number.parseInt(text.trim(), 10);
  return Number.isInteger(pid) && pid > 0 ? pid : undefined;
}

/** True if `pid` is a live (not zombie) process whose argv contains `uuid`. */
export async function isGuestProcess(pid: number, uuid: string): Promise<boolean> {
  let cmdline: string;
  try {
    cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8');
  } catch {
    return false;
  }
  // A zombie has an empty cmdline.
  return cmdline.split('\0').includes(uuid);
}

/** The guest's QEMU pid if its process is alive, else undefined. */
export async function findGuestProcess(pidFile: string, uuid: string): Promise<number | undefined> {
  const pid = await readPidFile(pidFile);
  if (pid === undefined) return undefined;
  return (await isGuestProcess(pid, uuid)) ? pid : undefined;
}

const POLL_MS = 20;

/**
 * True once the process has exited far enough that its files, and so its image locks, are released.
 * Its command line empties when its memory is released, which the kernel does BEFORE it closes the
 * files: a new QEMU launched at that moment fails to get the disk's "write" lock. So the process
 * counts as gone only when /proc has no entry for it, or it is a zombie (files closed), or its pid
 * now belongs to another program.
 */
export async function hasExited(pid: number, uuid: string): Promise<boolean> {
  let stat: string;
  try {
    stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return true;
  }
  // "pid (comm) S ...": the state follows the last ')' (comm may itself contain parentheses).
  const state = stat.charAt(stat.lastIndexOf(')') + 2);
  if (state === 'Z' || state === 'X') return true;
  const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  if (cmdline === '') return false; // still exiting
  return !cmdline.split('\0').includes(uuid);
}

/** Resolves true once the process is gone (its files closed), false if not after `timeoutMs`. */
export async function waitForGuestExit(pid: number, uuid: string, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await hasExited(pid, uuid)) return true;
    if (Date.now() >= deadline) return false;
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

/** Sends SIGKILL to the guest's process (if it still is one). */
export async function killGuest(pid: number, uuid: string): Promise<void> {
  if (!(await isGuestProcess(pid, uuid))) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}
