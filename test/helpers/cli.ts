import { spawn } from 'node:child_process';
import { CLI_ENTRY } from './entry.js';

const CLI = CLI_ENTRY;

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the built CLI (test/global-setup.ts builds it) with an argument vector. */
export function runCli(args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

/** Runs the CLI with `--json` against a config file; expects exit code 0 and returns the parsed output. */
export async function cliJson(configFile: string, args: readonly string[]): Promise<unknown> {
  const res = await runCli(['--config-file', configFile, ...args, '--json']);
  if (res.code !== 0) throw new Error(`snapshot-driver ${args.join(' ')} exited ${res.code}: ${res.stderr}`);
  return JSON.parse(res.stdout) as unknown;
}
