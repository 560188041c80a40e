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
