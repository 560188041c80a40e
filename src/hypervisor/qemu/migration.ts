import { QemuProcessError } from '../../errors.js';
import type { QmpClient } from './qmp.js';

/**
 * Following and cancelling a QEMU migration over QMP (`query-migrate`, `migrate_cancel`): a managed
 * save is a migration into a file, a resume one out of it. (The stream's file ends are in
 * migration-stream.ts.)
 */

const MIGRATION_POLL_MS = 10;

/** `query-migrate` reply (the fields used here). */
export interface MigrateInfo {
  status?: string;
  'error-desc'?: string;
}

/** Polls `query-migrate` until the migration completed; throws if it failed. */
export async function waitForMigration(qmp: QmpClient, what: 'save' | 'restore', timeoutMs: number): Promise<void> {
  const startedAt = Date.now();
  for (;;) {
    const info = await qmp.execute<MigrateInfo>('query-migrate');
    switch (info.status) {
      case 'completed':
        return;
      case 'failed':
      case 'cancelled':
        throw new QemuProcessError(
          `${what} migration ${info.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`,
        );
      case undefined:
        // Not begun yet; it must begin soon.
        if (Date.now() - startedAt > timeoutMs) {
          throw new QemuProcessError(`${what} migration did not begin within ${timeoutMs} ms`);
        }
    }
    await new Promise((r) => setTimeout(r, MIGRATION_POLL_MS));
  }
}

/** Cancels an outgoing migration still in progress and waits (at most `timeoutMs`) until it has stopped. */
export async function cancelMigration(qmp: QmpClient, timeoutMs: number): Promise<void> {
  const info = await qmp.execute<MigrateInfo>('query-migrate');
  const active = (s?: string) => s !== undefined && !['completed', 'failed', 'cancelled'].includes(s);
  if (!active(info.status)) return;
  await qmp.execute('migrate_cancel');
  const deadline = Date.now() + timeoutMs;
  while (active((await qmp.execute<MigrateInfo>('query-migrate')).status) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, MIGRATION_POLL_MS));
  }
}
