/**
 * etc/snapshot-driver.service is a unit systemd accepts as it is: `systemd-analyze verify` (from
 * Debian's systemd package, which scripts/setup.sh installs; no systemd need run) finds nothing to
 * say about it. verify also checks that ExecStart's program exists and is executable: the copy
 * verified here runs the repository's own entry point (node dist/snapshot-driver.mjs) instead of
 * /usr/local/bin/snapshot-driver, every other line as shipped. Without systemd-analyze the test
 * fails, saying so.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultConfig } from '../../src/config/schema.js';
import { runProgram } from '../../src/util/exec.js';
import { CLI_ENTRY } from '../helpers/entry.js';

const UNIT = fileURLToPath(new URL('../../etc/snapshot-driver.service', import.meta.url));
const ENTRY = CLI_ENTRY;
const SHIPPED_PROGRAM = '/usr/local/bin/snapshot-driver';
const VERIFY_TIMEOUT_MS = 60_000;

let tmp: DirectoryResult;
let text: string;

beforeAll(async () => {
  const version = await runProgram('systemd-analyze', ['--version'], { timeoutMs: VERIFY_TIMEOUT_MS }).catch((err: Error) => {
    throw new Error(`systemd-analyze is required by this test and cannot run (${err.message}): install the Debian package systemd (scripts/setup.sh does)`);
  });
  if (version.code !== 0) throw new Error(`systemd-analyze --version failed: ${version.stderr}`);
  await fs.access(ENTRY); // dist/ is built by the global setup
  tmp = await dir({ unsafeCleanup: true });
  text = await fs.readFile(UNIT, 'utf8');
});

afterAll(async () => {
  await tmp?.cleanup();
});

/** `systemd-analyze verify` of `unit` written as <tmp>/<name>. */
async function verify(unit: string, name = 'snapshot-driver.service') {
  const file = path.join(tmp.path, name);
  await fs.writeFile(file, unit);
  // Its findings on stderr whatever the environment (not to a journal: JOURNAL_STREAM), for the checks below.
  return runProgram('systemd-analyze', ['verify', '--man=no', file], { timeoutMs: VERIFY_TIMEOUT_MS, env: { ...process.env, SYSTEMD_LOG_TARGET: 'console' } });
}

/** `unit` with its one line `from` (a whole line, not a comment's words) replaced by `to`. */
function replaceLine(unit: string, from: string, to: string): string {
  const lines = unit.split('\n');
  expect(lines.filter((l) => l === from)).toHaveLength(1);
  return lines.map((l) => (l === from ? to : l)).join('\n');
}

const SHIPPED_EXEC_START = `ExecStart=${SHIPPED_PROGRAM} --config-file /etc/snapshot-driver/snapshot-driver.conf serve`;

/** The unit as shipped, but for ExecStart's program: the repository's entry point run by this node. */
function withRepoEntry(unit: string): string {
  return replaceLine(unit, SHIPPED_EXEC_START, SHIPPED_EXEC_START.replace(SHIPPED_PROGRAM, `${process.execPath} ${ENTRY}`));
}

/** The value of `key=` in the unit (its last assignment, as systemd reads it). */
function directive(unit: string, key: string): string | undefined {
  return unit
    .split('\n')
    .filter((l) => l.startsWith(`${key}=`))
    .map((l) => l.slice(key.length + 1))
    .at(-1);
}

describe('etc/snapshot-driver.service', () => {
  it('systemd-analyze verify accepts it, without a warning', async () => {
    const res = await verify(withRepoEntry(text));
    expect({ code: res.code, stdout: res.stdout, stderr: res.stderr }).toEqual({ code: 0, stdout: '', stderr: '' });
  });

  it('and the check can fail: a mistyped option, or a program that is not there, is reported', async () => {
    const typo = await verify(replaceLine(withRepoEntry(text), 'KillMode=process', 'KillMode=proces'), 'typo.service');
    expect(typo.stderr).toMatch(/typo\.service:\d+: Failed to parse kill mode specification, ignoring: proces/);
    const unknown = await verify(replaceLine(withRepoEntry(text), 'Restart=on-failure', 'Restrat=on-failure'), 'unknown.service');
    expect(unknown.stderr).toMatch(/Unknown key '?Restrat'? in section \[Service\]/);
    const missing = await verify(replaceLine(text, SHIPPED_EXEC_START, SHIPPED_EXEC_START.replace(SHIPPED_PROGRAM, `${tmp.path}/no-such-program`)), 'missing.service');
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toMatch(/no-such-program.*(not executable|No such file)/);
  });

  it('runs serve with the config in /etc, restarts on failure, stops with SIGTERM to the agent alone, given time to finish', () => {
    expect(directive(text, 'ExecStart')).toBe(`${SHIPPED_PROGRAM} --config-file /etc/snapshot-driver/snapshot-driver.conf serve`);
    expect(directive(text, 'Restart')).toBe('on-failure');
    expect(directive(text, 'KillSignal')).toBe('SIGTERM');
    // Guests of the qemu backend are in this cgroup: only the main process is signalled, nothing is killed after it.
    expect(directive(text, 'KillMode')).toBe('process');
    expect(directive(text, 'OOMPolicy')).toBe('continue');
    // Longer than one snapshot can take with the default bounds: its copy, and four hypervisor jobs
    // (managed save, restore, and an internal snapshot created and deleted).
    const { export_timeout: exportS, job_timeout: jobS } = defaultConfig().hypervisor;
    const stop = /^(\d+)h$/.exec(directive(text, 'TimeoutStopSec') ?? '');
    expect(stop).not.toBeNull();
    expect(Number(stop![1]) * 3600).toBeGreaterThan(exportS + 4 * jobS);
  });
});
