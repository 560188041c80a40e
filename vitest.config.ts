import { defineConfig } from 'vitest/config';

/** Files that stop and start the shared RabbitMQ or libvirtd: they run last, one at a time, alone. */
const BROKER_RESTARTS = ['test/integration/bus-contract.test.ts', 'test/integration/agent-crash.test.ts', 'test/integration/libvirt-restart.test.ts'];

export default defineConfig({
  test: {
    globalSetup: ['test/global-setup.ts'],
    pool: 'forks',
    testTimeout: 120_000,
    hookTimeout: 120_000,
    projects: [
      {
        extends: true,
        test: {
          name: 'main',
          include: ['test/**/*.test.ts'],
          exclude: BROKER_RESTARTS,
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
    ],
  },
});
