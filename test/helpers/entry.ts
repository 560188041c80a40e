import path from 'node:path';

/** The agent's entry point as operators run it (`npm run build`; test/global-setup.ts builds it). */
export const CLI_ENTRY = path.resolve(import.meta.dirname, '../../dist/snapshot-driver.mjs');
