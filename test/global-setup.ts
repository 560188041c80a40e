import { execFileSync } from 'node:child_process';

/**
 * Before the suite: the CLI tests run the built CLI (dist/), so it is built once; and the real Linux
 * test guest is built (or found in its cache: under a second), so that no test file races to build it.
 */
export default function setup(): void {
  execFileSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.build.json'], { stdio: 'inherit' });
  execFileSync('bash', ['scripts/guest-image.sh'], { stdio: ['ignore', 'ignore', 'inherit'], timeout: 10 * 60_000 });
}
