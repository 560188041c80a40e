import { constants as fsConstants } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { runProgram } from '../util/exec.js';
import { checkRecords, type RecordsSummary } from './records.js';

/**
 * Checks of an exported raw image of the test guest's ext4 root, with e2fsprogs (read-only on the
 * image itself; a journal replay happens on a copy): is the filesystem clean as it is, clean after a
 * replay, and are the writer's records in it intact.
 */

/** Where the guest's writer keeps its records. */
export const WRITER_DIR = '/var/lib/writer';
/** Bound of every e2fsprogs run (a 256 MiB filesystem takes well under a second). */
const TOOL_TIMEOUT_MS = 120_000;

/** e2fsprogs lives in /usr/sbin or /sbin, which a non-root PATH may lack. */
async function tool(name: string): Promise<string> {
  for (const dir of ['/usr/sbin', '/sbin']) {
    const file = path.join(dir, name);
    if (await fs.access(file, fsConstants.X_OK).then(() => true, () => false)) return file;
  }
  return name;
}

async function run(name: string, args: string[]): Promise<{ code: number; out: string }> {
  const bin = await tool(name);
  const res = await runProgram(bin, args, { timeoutMs: TOOL_TIMEOUT_MS }).catch((err: Error) => {
    throw new Error(`cannot run ${bin} (Debian package e2fsprogs): ${err.message}`);
  });
  return { code: res.code, out: `${res.stdout}${res.stderr}`.trim() };
}

/** The superblock's feature list and state (`dumpe2fs -h`). */
export async function superblock(image: string): Promise<{ features: string[]; state: string }> {
  const { code, out } = await run('dumpe2fs', ['-h', image]);
  const features = /^Filesystem features:\s*(.*)$/m.exec(out)?.[1];
  const state = /^Filesystem state:\s*(.*)$/m.exec(out)?.[1];
  if (code !== 0 || features === undefined || state === undefined) throw new Error(`dumpe2fs -h ${image} failed (exit ${code}): ${out.slice(0, 500)}`);
  return { features: features.trim().split(/\s+/), state: state.trim() };
}

/** `e2fsck -fn`: true when it finds nothing wrong (exit 0). Its exit code ignores a journal to replay. */
export async function fsckClean(image: string): Promise<{ clean: boolean; output: string }> {
  const { code, out } = await run('e2fsck', ['-fn', image]);
  if (code >= 8) throw new Error(`e2fsck -fn ${image} could not check it (exit ${code}): ${out.slice(0, 500)}`);
  return { clean: code === 0, output: out };
}

/** Replays the journal in place (a copy!) and nothing else. */
async function replayJournal(image: string): Promise<void> {
  const { code, out } = await run('e2fsck', ['-y', '-E', 'journal_only', image]);
  if (code >= 4) throw new Error(`journal replay on ${image} failed (exit ${code}): ${out.slice(0, 500)}`);
}

/** Copies the files of the guest folder `dir` out of the filesystem (`debugfs rdump`, read-only). */
async function readGuestDir(image: string, dir: string, dest: string): Promise<Array<[string, Buffer]>> {
  await fs.mkdir(dest, { recursive: true });
  const { code, out } = await run('debugfs', ['-R', `rdump ${dir} ${dest}`, image]);
  const copied = path.join(dest, path.basename(dir));
  const names = await fs.readdir(copied).catch(() => {
    throw new Error(`debugfs could not copy ${dir} out of ${image} (exit ${code}): ${out.slice(0, 500)}`);
  });
  return Promise.all(names.map(async (n): Promise<[string, Buffer]> => [n, await fs.readFile(path.join(copied, n))]));
}

export interface GuestImageReport {
  /** The superblock says the journal needs replaying (the filesystem was not quiesced). */
  needsRecovery: boolean;
  /** Mountable as it is: no journal to replay and e2fsck -fn finds nothing. */
  cleanWithoutReplay: boolean;
  /** After a journal replay (on a copy, when one is needed) e2fsck -fn finds nothing. */
  cleanAfterReplay: boolean;
  /** e2fsck's output when it found something. */
  fsckOutput?: string;
  /** The writer's records, read after the replay. */
  records: RecordsSummary;
}

/** Checks an exported raw image of the test guest; `workDir` holds the copy and the records read out. */
export async function checkGuestImage(image: string, workDir: string): Promise<GuestImageReport> {
  await fs.mkdir(workDir, { recursive: true });
  const needsRecovery = (await superblock(image)).features.includes('needs_recovery');
  const asIs = await fsckClean(image);
  let replayed = image;
  if (needsRecovery) {
    replayed = path.join(workDir, 'replayed.raw');
    const cp = await runProgram('cp', ['--sparse=always', image, replayed], { timeoutMs: TOOL_TIMEOUT_MS });
    if (cp.code !== 0) throw new Error(`cannot copy ${image}: ${cp.stderr.trim()}`);
    await replayJournal(replayed);
  }
  const after = needsRecovery ? await fsckClean(replayed) : asIs;
  const stillNeeds = needsRecovery && (await superblock(replayed)).features.includes('needs_recovery');
  const files = await readGuestDir(replayed, WRITER_DIR, path.join(workDir, 'records'));
  if (replayed !== image) await fs.rm(replayed, { force: true });
  const report: GuestImageReport = {
    needsRecovery,
    cleanWithoutReplay: !needsRecovery && asIs.clean,
    cleanAfterReplay: after.clean && !stillNeeds,
    records: checkRecords(files),
  };
  if (!after.clean) report.fsckOutput = after.output;
  else if (!asIs.clean) report.fsckOutput = asIs.output;
  return report;
}
