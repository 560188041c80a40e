import { spawn } from 'node:child_process';
import { CLI_ENTRY } from './entry.js';

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** How long one command may run before the test fails naming it (a snapshot of a test guest takes seconds). */
const CLI_TIMEOUT_MS = 300_000;

/** Runs the built CLI (test/global-setup.ts builds it) with an argument vector, bounded in time. */
export function runCli(args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI_ENTRY, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`snapshot-driver ${args.join(' ')} did not end within ${CLI_TIMEOUT_MS / 1000} s (killed)\n${stderr.slice(-2000)}`));
    }, CLI_TIMEOUT_MS);
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

/** Runs the CLI with `--json` against a config file; expects exit code 0 and returns the parsed output. */
export async function cliJson(configFile: string, args: readonly string[]): Promise<unknown> {
  const res = await runCli(['--config-file', configFile, ...args, '--json']);
  if (res.code !== 0) throw new Error(`snapshot-driver ${args.join(' ')} exited ${res.code}: ${res.stderr}`);
  return JSON.parse(res.stdout) as unknown;
}
