import { defineConfig } from 'vitest/config';
import { SlowestFirstSequencer } from './test/slow-first-sequencer.js';

/** Files that stop and start the shared RabbitMQ: they run after the main group, one at a time. */
const BROKER_RESTARTS = [
  'test/integration/bus-contract.test.ts',
  'test/integration/agent-crash.test.ts',
];
/**
 * Files that restart the host's one libvirtd: after the main group too, beside the broker restarts
 * (they share neither daemon: the two groups run at the same time).
 */
const LIBVIRTD_RESTARTS = ['test/integration/libvirt-restart.test.ts'];

export default defineConfig({
  test: {
    globalSetup: ['test/global-setup.ts'],
    pool: 'forks',
    sequence: { sequencer: SlowestFirstSequencer },
    testTimeout: 120_000,
    hookTimeout: 120_000,
    projects: [
      {
        extends: true,
        test: {
          name: 'main',
          include: ['test/**/*.test.ts'],
          exclude: [...BROKER_RESTARTS, ...LIBVIRTD_RESTARTS],
          // Real QEMU guests are heavy on a 2-core machine: two test files at a time.
          maxWorkers: 2,
          sequence: { groupOrder: 0 },
        },
      },
      {
        extends: true,
        test: {
          name: 'broker-restarts',
          include: BROKER_RESTARTS,
          fileParallelism: false,
          sequence: { groupOrder: 1 },
        },
      },
      {
        extends: true,
        test: {
          name: 'libvirtd-restarts',
          include: LIBVIRTD_RESTARTS,
          fileParallelism: false,
          sequence: { groupOrder: 1 },
        },
      },
    ],
  },
});
