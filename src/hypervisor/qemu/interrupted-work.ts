import { QmpDisconnected } from '../../errors.js';
import type { Logger } from '../../log.js';
import { pathExists } from '../../util/durable-fs.js';
import { type QemuGuests, removeFiles } from './guests.js';
import type { InstanceLayout } from './layout.js';
import { cancelOurBackupJobs, endOrphanedBackups } from './live-backup.js';
import { cancelMigration, type MigrateInfo } from './migration.js';
import type { QmpClient } from './qmp.js';

/**
 * Ending what an agent that died in the middle of an operation left going in a guest's QEMU (the
 * Hypervisor's endInterruptedWork): a managed save under way, our live backups (their copy, their
 * fleecing), a resume that never finished loading, and the files of an unfinished managed save.
 */

/** What the dead agent left in the guest's process, as found over QMP. */
type Leftover =
  /** A process still waiting for (or loading) the saved state. */
  | { kind: 'unfinished-resume' }
  /** A managed save complete and in place, whose process had not gone yet (QMP quit is sent). */
  | { kind: 'completed-save' }
  /** Anything else; what was cancelled. */
  | { kind: 'other'; done: string[] };

export async function endInterruptedWork(g: QemuGuests, uuid: string): Promise<string[]> {
  const { layout, pid } = await g.probeProcess(uuid);
  const log = g.log.child({ instance_uuid: layout.uuid });
  const done: string[] = [];
  if (pid !== undefined) done.push(...(await endWorkOfProcess(g, layout, pid, log)));
  // A live backup's copy may outlive both its agent and the guest's QEMU; its files stay behind.
  else done.push(...(await endOrphanedBackups(layout.dir)));
  if (!(await pathExists(layout.saveState))) done.push(...(await removeUnfinishedSave(layout)));
  if (done.length > 0) log.warn({ actions: done }, 'settled what an interrupted operation left');
  return done;
}

/** Ends what the guest's live process was left doing; resolves with what was done. */
async function endWorkOfProcess(g: QemuGuests, layout: InstanceLayout, pid: number, log: Logger): Promise<string[]> {
  const left = await g.withQmp(layout, (qmp) => findLeftover(g, qmp, layout, log));
  switch (left.kind) {
    case 'completed-save':
      await g.endProcess(layout, pid, 'quit-sent');
      return ['ended the process of a completed managed save'];
    case 'unfinished-resume':
      await g.endProcess(layout, pid, 'kill');
      return ['ended a resume that had not finished loading the saved state (the state is kept)'];
    case 'other':
      return left.done;
  }
}

/**
 * Tells what the process was left doing. A completed save's process is sent QMP quit; a managed save
 * under way is cancelled (the guest is left paused), and our live backups are ended (their copy killed,
 * their fleecing undone).
 */
async function findLeftover(g: QemuGuests, qmp: QmpClient, layout: InstanceLayout, log: Logger): Promise<Leftover> {
  // A process still waiting for (or loading) the saved state is a resume that never finished:
  // the state file is kept until a load completes, so ending the process leaves the guest saved.
  if ((await qmp.execute<{ status: string }>('query-status')).status === 'inmigrate') return { kind: 'unfinished-resume' };
  const done: string[] = [];
  const mig = await qmp.execute<MigrateInfo>('query-migrate');
  if (mig.status === 'completed' && (await pathExists(layout.saveState))) {
    // The save was complete and in place; only the process had not gone yet.
    await qmp.execute('quit').catch((err: unknown) => {
      if (!(err instanceof QmpDisconnected)) throw err;
    });
    return { kind: 'completed-save' };
  }
  if (mig.status !== undefined && !['none', 'completed', 'failed', 'cancelled'].includes(mig.status)) {
    await cancelMigration(qmp, g.qmpTimeoutMs);
    done.push(`cancelled a managed save left ${mig.status}`);
  }
  done.push(...(await cancelOurBackupJobs(qmp, { log, timeoutMs: g.qmpTimeoutMs, instanceDir: layout.dir })));
  return { kind: 'other', done };
}

/** Removes the files of a managed save that never completed; resolves with what was done. */
async function removeUnfinishedSave(layout: InstanceLayout): Promise<string[]> {
  // A state file is valid only once renamed into place (with its record written first).
  const leftovers = [layout.saveStatePartial, layout.saveMeta, `${layout.saveMeta}.tmp`, layout.saveSocket];
  const present = (await Promise.all(leftovers.map(pathExists))).some(Boolean);
  await removeFiles(leftovers);
  return present ? ['removed the files of an unfinished managed save'] : [];
}
