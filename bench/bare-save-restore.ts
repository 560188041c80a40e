/**
 * The baseline of a managed save: bare QEMU saving and restoring the same guest, as the issue
 * defines it. QMP `stop`, an uncapped `migrate` to `exec:cat > <file>`, `quit`; the same command
 * line again with `-S -incoming defer`, `migrate-incoming exec:cat <file>`, `cont`. Its downtime is
 * the STOP event to the RESUME event, as QEMU stamped them (the agent measures its own the same way).
 * The guest runs on in the new process, on the same files, so the agent's backend finds it as before.
 * (QEMU runs `exec:` through /bin/sh: fine for a benchmark of our own temporary paths, not for the agent.)
 */
import fs from 'node:fs/promises';
import { launchDaemonized } from '../src/hypervisor/qemu/launch.js';
import { waitForGuestExit } from '../src/hypervisor/qemu/qemu-process.js';
import { eventTimeMs, QmpClient, type QmpEvent } from '../src/hypervisor/qemu/qmp.js';

const QMP_TIMEOUT_MS = 60_000;
const MIGRATION_TIMEOUT_MS = 30 * 60_000;

export interface BareFigures {
  downtimeMs: number;
  /** `stop` to the save's migration completed. */
  saveMs: number;
  /** The save's migration completed to the process gone. */
  exitMs: number;
  /** The new process launched to its restore completed. */
  restoreMs: number;
  bytes: number;
}

export async function bareSaveRestore(paths: { qmpSocket: string; pidFile: string; qemuLog: string; stateFile: string }): Promise<BareFigures> {
  const pid = Number((await fs.readFile(paths.pidFile, 'utf8')).trim());
  const [binary, ...argv] = (await fs.readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').filter((a) => a !== '');
  if (binary === undefined || !argv.includes('-daemonize')) throw new Error(`bare save: unexpected command line of QEMU ${pid}`);
  if (/[\s'"$`\\;&|<>]/.test(paths.stateFile)) throw new Error(`bare save: ${paths.stateFile} would need quoting in exec:`);

  const qmp = await QmpClient.connect(paths.qmpSocket, { timeoutMs: QMP_TIMEOUT_MS });
  let stop: QmpEvent;
  let savedAt: number;
  try {
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': Number.MAX_SAFE_INTEGER });
    const stopped = qmp.waitForEvent('STOP', undefined, QMP_TIMEOUT_MS);
    await qmp.execute('stop');
    stop = await stopped;
    const saved = migrationEnd(qmp);
    await qmp.execute('migrate', { uri: `exec:cat > ${paths.stateFile}` });
    savedAt = eventTimeMs(await saved);
    await qmp.execute('quit').catch(() => undefined);
  } finally {
    await qmp.close();
  }
  // Gone as the agent judges it (a zombie waiting for its reaper counts as gone).
  const uuidAt = argv.indexOf('-uuid');
  const uuid = uuidAt < 0 ? undefined : argv[uuidAt + 1];
  if (uuid === undefined || !(await waitForGuestExit(pid, uuid, QMP_TIMEOUT_MS))) throw new Error(`bare save: QEMU ${pid} did not exit after quit`);

  const exitMs = Math.round(Date.now() - savedAt);
  const launchedAt = Date.now();
  await launchDaemonized(binary, [...argv, '-S', '-incoming', 'defer'], paths.qemuLog, 'QEMU', QMP_TIMEOUT_MS);
  const next = await QmpClient.connect(paths.qmpSocket, { timeoutMs: QMP_TIMEOUT_MS });
  try {
    await next.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    const loaded = migrationEnd(next);
    await next.execute('migrate-incoming', { uri: `exec:cat ${paths.stateFile}` });
    const restoredAt = eventTimeMs(await loaded);
    const resumed = next.waitForEvent('RESUME', undefined, QMP_TIMEOUT_MS);
    await next.execute('cont');
    const resume = await resumed;
    const bytes = (await fs.stat(paths.stateFile)).size;
    await fs.rm(paths.stateFile);
    return {
      downtimeMs: Math.round(eventTimeMs(resume) - eventTimeMs(stop)),
      saveMs: Math.round(savedAt - eventTimeMs(stop)),
      exitMs,
      restoreMs: Math.round(restoredAt - launchedAt),
      bytes,
    };
  } finally {
    await next.close();
  }
}

/** The MIGRATION event that ends a migration: resolves when completed, rejects when it failed. */
function migrationEnd(qmp: QmpClient): Promise<QmpEvent> {
  const ended = qmp.waitForEvent('MIGRATION', (ev) => ['completed', 'failed', 'cancelled'].includes(String(ev.data?.status)), MIGRATION_TIMEOUT_MS);
  return ended.then((ev) => {
    if (ev.data?.status !== 'completed') throw new Error(`bare migration ${String(ev.data?.status)}`);
    return ev;
  });
}
