import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const ENTRY = 'dist/snapshot-driver.mjs';
/** What the built entry point is made from. */
const SOURCES = ['src', 'scripts/bundle.mjs', 'tsconfig.json', 'tsconfig.build.json', 'package-lock.json'];

/** The newest modification time among the files under `p`. */
function newest(p: string): number {
  const st = fs.statSync(p);
  if (!st.isDirectory()) return st.mtimeMs;
  return Math.max(st.mtimeMs, ...fs.readdirSync(p).map((name) => newest(path.join(p, name))));
}

/**
 * Before the suite: the CLI tests run the built CLI (dist/), so it is built once, unless it is newer
 * than everything it is made from (scripts/test.sh has just built it through scripts/setup.sh); and
 * the real Linux test guest is built (or found in its cache: under a second), so that no test file
 * races to build it.
 */
export default function setup(): void {
  const built = fs.existsSync(ENTRY) ? fs.statSync(ENTRY).mtimeMs : 0;
  if (built <= Math.max(...SOURCES.map(newest))) {
    execFileSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.build.json'], { stdio: 'inherit', timeout: 5 * 60_000 });
    execFileSync(process.execPath, ['scripts/bundle.mjs'], { stdio: 'inherit', timeout: 5 * 60_000 });
  }
  execFileSync('bash', ['scripts/guest-image.sh'], { stdio: ['ignore', 'ignore', 'inherit'], timeout: 10 * 60_000 });
}
