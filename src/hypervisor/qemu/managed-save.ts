import fs from 'node:fs/promises';
import { QemuProcessError, QmpDisconnected, errorMessage } from '../../errors.js';
import type { Logger } from '../../log.js';
import { fsyncDir } from '../../util/durable-fs.js';
import { faultPoint, faultPointAfterOutput } from '../../util/fault.js';
import type { LaunchHooks, ResumeResult, SaveResult } from '../types.js';
import { invalidState, type QemuGuests, removeFiles } from './guests.js';
import { INCOMING_ARGS } from './launch.js';
import { type InstanceLayout, type ManagedSaveRecord, readManagedSaveRecord, writeJsonAtomic } from './layout.js';
import { cancelMigration, waitForMigration } from './migration.js';
import { MigrationReceiver, sendMigrationStream } from './migration-stream.js';
import { findGuestProcess } from './qemu-process.js';
import { eventTimeMs, type QmpClient } from './qmp.js';

/**
 * Managed save and resume of the qemu backend. A save migrates the guest's RAM and device state into
 * a state file (through a socket the agent listens on), then the process exits; a resume launches a
 * new process waiting for an incoming migration and feeds it the file.
 */

/** Lifts QEMU's default 128 MiB/s migration cap for saves into a file (as libvirt does). */
const UNLIMITED_BANDWIDTH = Number.MAX_SAFE_INTEGER;

type PriorState = SaveResult['priorState'];

export async function managedSave(g: QemuGuests, uuid: string): Promise<SaveResult> {
  const p = await g.probe(uuid);
  if ((p.state !== 'running' && p.state !== 'paused') || p.pid === undefined) throw invalidState(p, 'save');
  const { layout } = p;
  const priorState = p.state;
  const log = g.log.child({ instance_uuid: layout.uuid });
  layout.assertSocketPathsFit();

  const { bytes, vcpusStoppedAt } = await g.withQmp(layout, async (qmp) => {
    const saved = await saveState(g, qmp, layout, priorState, log);
    // The state is on disk: from here the process only has to go.
    await qmp.execute('quit').catch((err: unknown) => {
      if (!(err instanceof QmpDisconnected)) log.warn({ err: errorMessage(err) }, 'quit after managed save failed');
    });
    return saved;
  });
  await g.endProcess(layout, p.pid, 'quit-sent');
  log.info({ prior_state: priorState, bytes }, 'instance managed-saved');
  return vcpusStoppedAt === undefined ? { priorState, bytes } : { priorState, bytes, vcpusStoppedAt };
}

export async function resume(g: QemuGuests, uuid: string, hooks: LaunchHooks): Promise<ResumeResult> {
  const p = await g.probe(uuid);
  if (p.state !== 'saved') throw invalidState(p, 'resume');
  const { layout } = p;
  const log = g.log.child({ instance_uuid: layout.uuid });
  const saved = await readManagedSaveRecord(layout.saveMeta).catch((err: unknown) => {
    throw new QemuProcessError(`cannot resume instance ${layout.uuid}: ${errorMessage(err)}`, { cause: err });
  });
  await hooks.beforeLaunch?.(layout.uuid);
  const pid = await g.launch(layout, p.record, INCOMING_ARGS);
  const progress = { loaded: false };
  let result: ResumeResult;
  try {
    result = await g.withQmp(layout, (qmp) => loadState(g, qmp, layout, saved, progress, log));
  } catch (err) {
    // Once loaded, the new process is the guest: it must not be killed.
    if (progress.loaded) throw err;
    throw await endFailedResume(g, layout, pid, err, log);
  }
  log.info({ state: result.state }, 'instance resumed from managed save');
  return result;
}

/**
 * Migrates the guest's state into the state file, stopping its vCPUs first if they run. On failure
 * the guest is left as it was (undoSave). Resolves with the state's size and when the vCPUs stopped.
 */
async function saveState(
  g: QemuGuests,
  qmp: QmpClient,
  layout: InstanceLayout,
  priorState: PriorState,
  log: Logger,
): Promise<{ bytes: number; vcpusStoppedAt: number | undefined }> {
  // Everything that can be prepared is, before the guest stops: downtime starts at `stop`.
  await removeFiles([layout.saveSocket, layout.saveStatePartial]);
  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': UNLIMITED_BANDWIDTH });
  const receiver = await MigrationReceiver.listen(layout.saveSocket, layout.saveStatePartial);
  let vcpusStoppedAt: number | undefined;
  try {
    if (priorState === 'running') vcpusStoppedAt = await stopVcpus(qmp, log, g.qmpTimeoutMs);
    await qmp.execute('migrate', { uri: `unix:${layout.saveSocket}` });
    await faultPointAfterOutput('managed-save:migrating');
    const [, bytes] = await Promise.all([waitForMigration(qmp, 'save', g.qmpTimeoutMs), receiver.done]);
    await receiver.close();
    // managed-save.json first: a state file never exists without it.
    await writeJsonAtomic(layout.saveMeta, { prior_state: priorState, bytes });
    await fs.rename(layout.saveStatePartial, layout.saveState);
    await fsyncDir(layout.dir);
    return { bytes, vcpusStoppedAt };
  } catch (err) {
    await receiver.close().catch(() => undefined);
    await undoSave(qmp, layout, priorState, log, g.qmpTimeoutMs);
    throw err;
  }
}

/** Leaves a guest whose save failed as it was: partial files removed, vCPUs running again if they were. */
async function undoSave(qmp: QmpClient, layout: InstanceLayout, priorState: PriorState, log: Logger, timeoutMs: number): Promise<void> {
  await cancelMigration(qmp, timeoutMs).catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'migrate_cancel failed'));
  await removeFiles([layout.saveStatePartial, layout.saveState, layout.saveMeta, `${layout.saveMeta}.tmp`, layout.saveSocket]).catch(
    (err: unknown) => log.warn({ err: errorMessage(err) }, 'cannot remove partial managed-save files'),
  );
  if (priorState === 'running') {
    await qmp.execute('cont').catch((err: unknown) => log.error({ err: errorMessage(err) }, 'cannot resume the guest after a failed save'));
  }
}

/**
 * Feeds the saved state to the new process and, once it is loaded, removes the state file and runs
 * the vCPUs again if they ran before the save. Sets `progress.loaded` as soon as the process holds
 * the state. Resolves with the power state restored and when the vCPUs ran again.
 */
async function loadState(
  g: QemuGuests,
  qmp: QmpClient,
  layout: InstanceLayout,
  saved: ManagedSaveRecord,
  progress: { loaded: boolean },
  log: Logger,
): Promise<ResumeResult> {
  await qmp.execute('migrate-incoming', { uri: `unix:${layout.restoreSocket}` });
  faultPoint('resume:loading');
  await sendMigrationStream(layout.restoreSocket, layout.saveState);
  await waitForMigration(qmp, 'restore', g.qmpTimeoutMs);
  progress.loaded = true;
  // The new process holds the state now. Remove the file before the guest runs again: a
  // state file older than the disk must never be resumed later.
  await removeFiles([layout.saveState, layout.saveMeta, layout.restoreSocket]);
  await fsyncDir(layout.dir);
  faultPoint('resume:loaded');
  const vcpusResumedAt = saved.prior_state === 'running' ? await continueVcpus(qmp, log, g.qmpTimeoutMs) : undefined;
  const state = await g.queryPowerState(qmp);
  return vcpusResumedAt === undefined ? { state } : { state, vcpusResumedAt };
}

/**
 * Ends the new process of a resume that failed before the state was loaded; the saved state is
 * kept. Resolves with the error to throw.
 */
async function endFailedResume(g: QemuGuests, layout: InstanceLayout, pid: number, err: unknown, log: Logger): Promise<unknown> {
  const died = (await findGuestProcess(layout.pidFile, layout.uuid)) === undefined;
  log.error({ err: errorMessage(err), qemu_exited: died }, 'resume failed: ending the new process, keeping the saved state');
  await g.endProcess(layout, pid, 'kill').catch((e: unknown) =>
    log.error({ err: errorMessage(e) }, 'cannot end the failed QEMU process'),
  );
  await removeFiles([layout.restoreSocket]);
  if (!died) return err;
  return new QemuProcessError(
    `cannot resume instance ${layout.uuid}: its QEMU exited while loading the saved state ` +
      `(${errorMessage(err)}); the saved state is kept`,
    { cause: err },
  );
}

/** QMP `stop`; resolves with when the vCPUs stopped (the STOP event's time). */
async function stopVcpus(qmp: QmpClient, log: Logger, timeoutMs: number): Promise<number> {
  const stopped = qmp.waitForEvent('STOP', undefined, timeoutMs);
  stopped.catch(() => undefined);
  const sentAt = Date.now();
  await qmp.execute('stop');
  return stopped.then(eventTimeMs, (err: unknown) => {
    // The vCPUs did stop (the command succeeded): the send time bounds it from below.
    log.warn({ err: errorMessage(err) }, 'no STOP event after stop: downtime measured from the command');
    return sentAt;
  });
}

/** QMP `cont`; resolves with when the vCPUs ran again (the RESUME event's time). */
async function continueVcpus(qmp: QmpClient, log: Logger, timeoutMs: number): Promise<number> {
  const resumed = qmp.waitForEvent('RESUME', undefined, timeoutMs);
  resumed.catch(() => undefined);
  await qmp.execute('cont');
  const answeredAt = Date.now();
  return resumed.then(eventTimeMs, (err: unknown) => {
    log.warn({ err: errorMessage(err) }, 'no RESUME event after cont: downtime measured to the reply');
    return answeredAt;
  });
}
