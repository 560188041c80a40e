import type { Command } from 'commander';
import { agentLock, buildServer, requestJournal } from '../service/agent.js';
import type { Runtime } from '../service/runtime.js';
import { recoverAtStart, type RecoveryReport } from '../service/startup-recovery.js';
import { AgentAlreadyRunning, errorMessage, ImageNotFound, InvalidInstanceId } from '../errors.js';
import { processHoldsDisk } from '../hypervisor/types.js';
import type { JournalEntry } from '../messaging/rpc-types.js';
import { instanceUuidOf } from '../messaging/request-context.js';
import { openBus } from '../messaging/transport/open-bus.js';
import { isUuid } from '../util/uuid.js';
import type { RuntimeFactory } from '../service/runtime.js';
import { printJson, printTable } from './output.js';

/** What `cleanup --json` prints. */
interface CleanupReport extends RecoveryReport {
  /** Journaled requests whose operation had been interrupted, now ended (error notification sent). */
  requestsSettled: number;
  /** Why requests were left for the next `serve`, if they were. */
  requestsLeft?: string;
  /** Pending snapshots kept: their guest's QEMU process holds the disk. */
  pendingWaiting: { instance_uuid: string; state: string; snapshots: string[] }[];
}

export function registerCleanupCommand(program: Command, runtime: RuntimeFactory): void {
  program
    .command('cleanup [uuid]')
    .description(
      'recover operations a crash interrupted (guest back to its prior state, image killed, error notification), ' +
        'remove orphaned internal snapshots of ours, delete the pending ones the safety rule allows now',
    )
    .option('--json', 'print JSON')
    .action(async (uuid: string | undefined, opts: { json?: boolean }) => {
      if (uuid !== undefined && !isUuid(uuid)) throw new InvalidInstanceId(uuid);
      const rt = await runtime();
      // Never beside a serving agent: it recovered at its own start, and works on the same guests.
      const lock = agentLock(rt);
      const holder = await lock.acquire();
      if (holder !== undefined) {
        throw new AgentAlreadyRunning(
          `an agent (pid ${holder.pid}) is serving with state_path ${rt.config.DEFAULT.state_path}; it recovers at its own start: stop it to run cleanup`,
        );
      }
      let recovery: RecoveryReport;
      let settled: Pick<CleanupReport, 'requestsSettled' | 'requestsLeft'>;
      try {
        recovery = await recoverAtStart(rt, uuid);
        settled = await settleRequests(rt, uuid);
      } finally {
        await lock.release();
      }
      const pendingWaiting: CleanupReport['pendingWaiting'] = [];
      for (const inst of uuid !== undefined ? [await rt.hv.info(uuid)] : await rt.hv.list()) {
        if (!processHoldsDisk(inst.state)) continue;
        const snapshots = await rt.pending.list(inst.uuid);
        if (snapshots.length > 0) pendingWaiting.push({ instance_uuid: inst.uuid, state: inst.state, snapshots });
      }
      const report: CleanupReport = { ...recovery, ...settled, pendingWaiting };
      if (opts.json) return printJson(report);
      printReport(report);
    });
}

/**
 * Ends the journaled requests whose operation was interrupted (their image exists: recovery has
 * killed it), with the error notification and reply nova expects. Requests never started are left to
 * `serve`, which carries them out. Runs under the agent lock.
 */
async function settleRequests(rt: Runtime, uuid: string | undefined): Promise<Pick<CleanupReport, 'requestsSettled' | 'requestsLeft'>> {
  const { config, log } = rt;
  const interrupted = async (entry: JournalEntry): Promise<boolean> => {
    const { method, args } = entry.request;
    if (method !== 'snapshot_instance' && method !== 'backup_instance') return false;
    if (typeof args.image_id !== 'string' || !isUuid(args.image_id)) return false;
    if (uuid !== undefined && instanceUuidOf(args)?.toLowerCase() !== uuid.toLowerCase()) return false;
    return rt.store.show(args.image_id).then(
      () => true,
      (err: unknown) => {
        if (err instanceof ImageNotFound) return false;
        throw err;
      },
    );
  };
  const journal = requestJournal(rt);
  let candidates = 0;
  for (const entry of await journal.unfinished()) if (await interrupted(entry)) candidates += 1;
  if (candidates === 0) return { requestsSettled: 0 }; // no need to reach the broker
  let bus;
  try {
    bus = await openBus(config.DEFAULT.transport_url, config.oslo_messaging_rabbit, log);
  } catch (err) {
    log.error({ err }, `cannot reach the message broker to settle interrupted requests: ${errorMessage(err)}`);
    return { requestsSettled: 0, requestsLeft: `message broker unreachable (${errorMessage(err)}): the next serve settles them` };
  }
  try {
    const { rpc } = await buildServer(rt, bus, journal);
    return { requestsSettled: await rpc.runJournaled(interrupted) };
  } finally {
    await bus.close().catch(() => undefined);
  }
}

function printReport(r: CleanupReport): void {
  if (r.operations.length > 0) {
    printTable(
      ['interrupted image', 'instance', 'stopped at', 'guest found', 'guest now', 'image', 'actions'],
      r.operations.map((o) => [o.image_id, o.instance_uuid, o.stopped_at, o.guest_found, o.guest_now, o.error ? `FAILED: ${o.error}` : o.image, o.actions.join('; ') || '-']),
    );
  } else {
    process.stdout.write('no interrupted operation\n');
  }
  const { partialsRemoved, tempsRemoved, socketDirsRemoved, imagesKilled } = r.store;
  if (imagesKilled.length > 0) process.stdout.write(`unfinished images with no operation, killed: ${imagesKilled.join(' ')}\n`);
  if (partialsRemoved.length + tempsRemoved.length > 0) {
    process.stdout.write(`leftover files removed from the image store: ${[...partialsRemoved.map((p) => `.partial/${p}`), ...tempsRemoved].join(' ')}\n`);
  }
  if (socketDirsRemoved.length > 0) process.stdout.write(`socket folders of exports whose agent is gone, removed: ${socketDirsRemoved.join(' ')}\n`);
  if (r.orphans.length > 0) printTable(['instance', 'orphaned snapshot', 'action'], r.orphans.map((o) => [o.instance_uuid, o.snapshot, o.action]));
  for (const p of r.pendingDeleted) process.stdout.write(`deleted pending snapshots of ${p.instance_uuid}: ${p.snapshots.join(' ')}\n`);
  for (const p of r.pendingWaiting) {
    process.stdout.write(`pending snapshots of ${p.instance_uuid} wait for its next restart (${p.state}): ${p.snapshots.join(' ')}\n`);
  }
  process.stdout.write(`journaled requests of interrupted operations ended (notified, replied to): ${r.requestsSettled}\n`);
  if (r.requestsLeft !== undefined) process.stdout.write(`requests left: ${r.requestsLeft}\n`);
}
