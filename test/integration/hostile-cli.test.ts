/**
 * The config and command-line part of the hostile-input corpus (test/hostile/corpus.ts), against the
 * built CLI (`node dist/snapshot-driver.mjs`, built by test/global-setup.ts).
 *
 * Layout: `<tmp>/sandbox/{instances,state,images}` is the agent's world (the sandbox config points
 * every folder there), `<tmp>/outside/` holds canary files at the paths a `../../` traversal from
 * the store or the instances folder would reach, `<tmp>/conf/` the config files of the cases. The
 * CLI runs with its working directory in `<tmp>/sandbox/images`. Each case must exit with the
 * expected code, print nothing on stdout, and name what is wrong on stderr; afterwards the whole
 * `<tmp>` tree (paths, types, sizes, modes, mtimes, ctimes, file contents) and /etc/passwd are
 * exactly as before. Nothing here needs a guest: every command must fail before touching one.
 */
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir } from 'tmp-promise';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI_CASES, CONFIG_CASES, SANDBOX_INI, UNKNOWN_UUID, assertUniqueIds, type CliCase, type ConfigCase } from '../hostile/corpus.js';
import { CLI_ENTRY } from '../helpers/entry.js';

/** A case that has not exited by then is a hang: killed, and the case fails. */
const HANG_MS = 20_000;

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  hung: boolean;
}

/** Runs the built CLI with an argument vector (no shell) in `cwd`. */
function runCli(args: readonly string[], cwd: string): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI_ENTRY, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, SNAPSHOT_DRIVER_LOG_LEVEL: 'info' } });
    let stdout = '';
    let stderr = '';
    let hung = false;
    const guard = setTimeout(() => {
      hung = true;
      child.kill('SIGKILL');
    }, HANG_MS);
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(guard);
      resolve({ code, signal, stdout, stderr, hung });
    });
  });
}

interface Entry {
  type: string;
  size: number;
  mode: number;
  mtimeMs: number;
  ctimeMs: number;
  sha256?: string;
}

async function sha256(file: string): Promise<string> {
  return createHash('sha256').update(await fs.readFile(file)).digest('hex');
}

/** Every path under `root` with its type, size, mode, times and (regular files) content hash. */
async function snapshotTree(root: string): Promise<Record<string, Entry>> {
  const out: Record<string, Entry> = {};
  const walk = async (d: string): Promise<void> => {
    for (const name of (await fs.readdir(d)).sort()) {
      const p = path.join(d, name);
      const st = await fs.lstat(p);
      const type = st.isDirectory() ? 'dir' : st.isFile() ? 'file' : st.isFIFO() ? 'fifo' : st.isSymbolicLink() ? 'symlink' : 'other';
      out[path.relative(root, p)] = {
        type,
        size: st.isDirectory() ? 0 : st.size,
        mode: st.mode,
        mtimeMs: st.mtimeMs,
        ctimeMs: st.ctimeMs,
        ...(type === 'file' && { sha256: await sha256(p) }),
      };
      if (type === 'dir') await walk(p);
    }
  };
  await walk(root);
  return out;
}

async function etcPasswd(): Promise<{ mtimeMs: number; sha256: string }> {
  return { mtimeMs: (await fs.stat('/etc/passwd')).mtimeMs, sha256: await sha256('/etc/passwd') };
}

let base: string;
let sandboxConf: string;
let cwd: string;
let before: Record<string, Entry>;
let passwdBefore: { mtimeMs: number; sha256: string };
let cleanup: (() => Promise<void>) | undefined;

function configPath(c: ConfigCase): string {
  const f = c.input.file;
  if (f && 'path' in f) return path.isAbsolute(f.path) ? f.path : path.join(base, f.path);
  return path.join(base, 'conf', `${c.id}.conf`);
}

beforeAll(async () => {
  assertUniqueIds();
  await fs.access(CLI_ENTRY); // built by the global setup
  const tmp = await dir({ prefix: 'hostile-cli-', unsafeCleanup: true });
  cleanup = () => tmp.cleanup();
  base = tmp.path;
  for (const d of ['sandbox/instances', 'sandbox/state', 'sandbox/images', 'outside', 'conf']) await fs.mkdir(path.join(base, d), { recursive: true });
  cwd = path.join(base, 'sandbox', 'images');

  // Canaries where traversals from the store (<tmp>/sandbox/images) and the instances folder lead.
  await fs.writeFile(path.join(base, 'outside', 'passwd'), 'root:x:0:0:canary:/root:/bin/sh\n', { mode: 0o644 });
  await fs.writeFile(path.join(base, 'outside', 'passwd.json'), '{"canary":true}\n', { mode: 0o640 });
  await fs.writeFile(path.join(base, 'outside', 'canary.txt'), 'do not touch\n', { mode: 0o600 });
  await fs.mkdir(path.join(base, 'outside', 'new'));
  await fs.mkdir(path.join(base, 'outside', UNKNOWN_UUID));
  await fs.writeFile(path.join(base, 'outside', UNKNOWN_UUID, 'disk'), 'not a disk\n');

  sandboxConf = path.join(base, 'conf', 'sandbox.conf');
  await fs.writeFile(sandboxConf, SANDBOX_INI);
  for (const c of CONFIG_CASES) {
    const file = configPath(c);
    const special = c.input.file && 'special' in c.input.file ? c.input.file.special : undefined;
    if (special === 'directory') await fs.mkdir(file);
    else if (special === 'fifo') execFileSync('mkfifo', [file]);
    else if (c.input.ini !== undefined) await fs.writeFile(file, c.input.ini);
  }
  // The sandbox config works: the harmless command the config cases run succeeds with it.
  const ok = await runCli(['--config-file', sandboxConf, 'instances', 'list', '--json'], cwd);
  expect(ok.stderr).toBe('');
  expect(ok.code).toBe(0);
  expect(JSON.parse(ok.stdout)).toEqual([]);

  before = await snapshotTree(base);
  passwdBefore = await etcPasswd();
});

afterAll(async () => {
  await cleanup?.();
});

function checkOutcome(r: Run, expected: CliCase['expect']): void {
  expect(r.hung, 'the CLI hung').toBe(false);
  expect(r.signal).toBeNull();
  if (expected.class === 'CommanderError') {
    expect(r.stderr).toMatch(/^error: /);
  } else {
    expect(r.stderr).toContain(`snapshot-driver: ${expected.class}: `);
  }
  expect(r.stderr).toMatch(expected.message);
  if (expected.absent) expect(r.stderr).not.toMatch(expected.absent);
  expect(r.stdout).toBe('');
  expect(r.code).toBe(expected.exitCode);
}

describe('hostile config files: exit 2, naming the file, line, section and option', () => {
  it.concurrent.each(CONFIG_CASES.map((c) => [c.id, c] as const))('%s', async (_id, c) => {
    const r = await runCli(['--config-file', configPath(c), ...(c.input.command ?? ['instances', 'list'])], cwd);
    checkOutcome(r, c.expect);
  });
});

describe('hostile command lines: a clear error and the right exit code', () => {
  it.concurrent.each(CLI_CASES.map((c) => [c.id, c] as const))('%s', async (_id, c) => {
    const r = await runCli(c.input.noConfig ? c.input.argv : ['--config-file', sandboxConf, ...c.input.argv], cwd);
    checkOutcome(r, c.expect);
  });
});

describe('after the corpus', () => {
  it('nothing under the test folder (sandbox, canaries, config files) and not /etc/passwd was touched', async () => {
    expect(await snapshotTree(base)).toEqual(before);
    expect(await etcPasswd()).toEqual(passwdBefore);
  });
});
