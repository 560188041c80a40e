import { MigrationTimeout, QemuProcessError } from '../../errors.js';
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

/** How long a migration may take. */
export interface MigrationBounds {
  /** It must have begun (`query-migrate` reports a status) within this many ms (a command timeout). */
  beginTimeoutMs: number;
  /** It must have completed within this many ms of the wait's start (`[hypervisor] job_timeout`). */
  jobTimeoutMs: number;
}

/**
 * Polls `query-migrate` until the migration completed; throws if it failed, and MigrationTimeout if
 * it has not completed within `bounds.jobTimeoutMs` (e.g. its destination stalls). The caller cancels it.
 */
export async function waitForMigration(qmp: QmpClient, what: 'save' | 'restore', bounds: MigrationBounds): Promise<void> {
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
        if (Date.now() - startedAt > bounds.beginTimeoutMs) {
          throw new QemuProcessError(`${what} migration did not begin within ${bounds.beginTimeoutMs} ms`);
        }
    }
    if (Date.now() - startedAt > bounds.jobTimeoutMs) throw migrationTimeout(what, bounds.jobTimeoutMs, info.status);
    await new Promise((r) => setTimeout(r, MIGRATION_POLL_MS));
  }
}

function migrationTimeout(what: 'save' | 'restore', jobTimeoutMs: number, status: string | undefined): MigrationTimeout {
  return new MigrationTimeout(
    `${what} migration did not complete within ${jobTimeoutMs} ms ([hypervisor] job_timeout)${status !== undefined ? `: still ${status}` : ''}`,
  );
}

/**
 * Settles as `work` does, or rejects with MigrationTimeout once `jobTimeoutMs` have passed since
 * `startedAt` (Date.now() ms): for the parts of a migration QEMU cannot report on, our own end of its
 * stream (a receiver that stalls after QEMU sent everything, a sender QEMU stops reading from).
 */
export async function withinJobTimeout<T>(work: Promise<T>, what: 'save' | 'restore', jobTimeoutMs: number, startedAt: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(migrationTimeout(what, jobTimeoutMs, undefined)), Math.max(0, startedAt + jobTimeoutMs - Date.now()));
  });
  try {
    return await Promise.race([work, expired]);
  } finally {
    clearTimeout(timer);
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
