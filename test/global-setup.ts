import { execFileSync } from 'node:child_process';

/** The CLI tests run the built CLI (dist/): build it once before the suite. */
export default function setup(): void {
  execFileSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.build.json'], { stdio: 'inherit' });
}
