/**
 * Issue 5, "20 concurrent snapshot requests over 4 guests, with hard reboots interleaved", on the fake
 * hypervisor (which enforces SPEC §2 and records every violation) with the real parts above it: the
 * RPC server on the in-memory bus with its file journal, the compute manager (per-instance queue,
 * max_concurrent_snapshots = 3), the snapshot engine, the lifecycle and the image store. The requests
 * are casts, sent in one order on one queue, as nova sends them.
 *
 * What is run and when is read back from the log lines (test/helpers/concurrency-log.ts), in the
 * order they were written.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { dir } from 'tmp-promise';
import { afterEach, describe, expect, it } from 'vitest';
import { FileJournal } from '../../src/compute/journal.js';
import { Lifecycle } from '../../src/snapshot/lifecycle.js';
import { ComputeManager, type SnapshotNotifier } from '../../src/compute/manager.js';
import { STRATEGIES, type StrategyName } from '../../src/config/schema.js';
import { FakeHypervisor } from '../../src/hypervisor/fake/fake-hypervisor.js';
import type { BackupJob, ExportOptions, PowerState } from '../../src/hypervisor/types.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { SnapshotEngine } from '../../src/snapshot/engine.js';
import { DEFAULT_QUIESCE } from '../../src/snapshot/guest-freeze.js';
import { OperationJournal } from '../../src/snapshot/operation-journal.js';
import { PendingSnapshots } from '../../src/snapshot/pending.js';
import { SNAPSHOTS_LEFT_MAX } from '../../src/snapshot/strategies.js';
import { expectConcurrencyBound, operationsByInstance, serialProblems, startOrder } from '../helpers/concurrency-log.js';
import { allowedLeft, PREFIX } from '../helpers/fake-env.js';
import { captureLogger, type CapturedLine } from '../helpers/log-capture.js';
import { serveOnMemoryBus } from '../helpers/memory-rpc.js';

const MAX_CONCURRENT = 3;
const HOST = 'concurrency-host';
/** How long each export (and each live backup job's copy) takes: long enough for snapshots to overlap. */
const EXPORT_MS = 10;

/**
 * The fake hypervisor, with exports that take time: each exportDisk call (and each live backup job's
 * wait) is held by the fake's own holdCall, armed for exactly that call (one instance's operations run
 * one at a time, so its next call of that op is this one), for EXPORT_MS and, while `intake` is
 * unsettled, until it settles: so that every request is queued before the first snapshot can end,
 * however slow the machine, and the limit is really contended.
 */
class SlowExportHypervisor extends FakeHypervisor {
  intake: Promise<void> = Promise.resolve();

  private slow(): Promise<unknown> {
    return Promise.all([sleep(EXPORT_MS), this.intake]);
  }

  override exportDisk(uuid: string, opts: ExportOptions): Promise<void> {
    this.holdCall({ op: 'exportDisk', uuid, nth: this.callCount('exportDisk', uuid) + 1, until: this.slow() });
    return super.exportDisk(uuid, opts);
  }

  override async startLiveBackup(uuid: string, dest: string): Promise<BackupJob> {
    const job = await super.startLiveBackup(uuid, dest);
    return {
      startedAt: job.startedAt,
      startPauseMs: job.startPauseMs,
      wait: (onProgress) => {
        this.holdCall({ op: 'backupWait', uuid, nth: this.callCount('backupWait', uuid) + 1, until: this.slow() });
        return job.wait(onProgress);
      },
      cancel: () => job.cancel(),
    };
  }
}

type Msg =
  | { kind: 'snapshot'; requestId: string; uuid: string; imageId: string }
  | { kind: 'reboot'; requestId: string; uuid: string };

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});

async function setup(strategy: StrategyName) {
  const tmp = await dir({ unsafeCleanup: true });
  cleanups.push(() => tmp.cleanup());
  const { log, lines } = captureLogger();
  const hv = new SlowExportHypervisor();
  // One process: the store's cross-process image lock is left out (test/unit/store-lock.test.ts has it).
  const store = new ImageStore({ path: path.join(tmp.path, 'images'), reservedSpaceMb: 0, osHashAlgo: 'sha512', lockAcrossProcesses: false });
  const pending = new PendingSnapshots(path.join(tmp.path, 'state', 'pending'));
  const lifecycle = new Lifecycle(hv, pending, log);
  const operations = new OperationJournal(path.join(tmp.path, 'state', 'operations'), log);
  const engine = new SnapshotEngine({
    hv, store, lifecycle, operations, log, namePrefix: PREFIX, defaultStrategy: strategy, quiesce: DEFAULT_QUIESCE,
  });
  const notified = { start: [] as string[], end: [] as string[], error: [] as string[] };
  const notifier: SnapshotNotifier = {
    snapshotStart: (info) => void notified.start.push(info.imageId),
    snapshotEnd: (info) => void notified.end.push(info.imageId),
    snapshotError: (info) => void notified.error.push(info.imageId),
  };
  const manager = new ComputeManager({
    engine, lifecycle, store, hv, log, maxConcurrentSnapshots: MAX_CONCURRENT, defaultStrategy: strategy, notifier,
  });
  const journal = await new FileJournal({ dir: path.join(tmp.path, 'state', 'journal'), log }).open();
  const { server, client } = await serveOnMemoryBus({ target: manager, journal, host: HOST, log }, cleanups);
  return { hv, store, pending, operations, journal, server, client, lines, notified };
}

/** Resolves once `n` lines match, or fails naming what it saw. No timed assertion: a generous bound against a hang. */
async function waitForLines(lines: CapturedLine[], test: (l: CapturedLine) => boolean, n: number, what: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (lines.filter(test).length < n) {
    if (Date.now() > deadline) {
      throw new Error(`only ${lines.filter(test).length} of ${n} ${what}; last lines:\n${lines.slice(-20).map((l) => JSON.stringify(l)).join('\n')}`);
    }
    await sleep(5);
  }
}

/**
 * 20 snapshots, guest i % 4 for the i-th, and after every second one a HARD reboot: every third
 * message is a reboot (30 messages). The shut-off guest is never rebooted (it stays shut off); the
 * paused one is first rebooted after its second snapshot, so it is snapshotted both paused and running.
 */
function schedule(guests: readonly string[], rebootTargets: readonly number[]): Msg[] {
  const msgs: Msg[] = [];
  let r = 0;
  for (let i = 0; i < 20; i++) {
    msgs.push({ kind: 'snapshot', requestId: `req-snap-${String(i).padStart(2, '0')}`, uuid: guests[i % 4]!, imageId: randomUUID() });
    if (i % 2 === 1) {
      msgs.push({ kind: 'reboot', requestId: `req-reboot-${String(r).padStart(2, '0')}`, uuid: guests[rebootTargets[r]!]! });
      r++;
    }
  }
  return msgs;
}

describe('20 concurrent snapshot casts over 4 guests, hard reboots interleaved, max_concurrent_snapshots = 3', () => {
  it.each(STRATEGIES.map((s) => [s]))('%s: per-guest order kept, no §2 violation, never more than 3 at once', async (strategy) => {
    const e = await setup(strategy);
    const initial: Record<string, PowerState> = {};
    const guests: string[] = [];
    const states = ['running', 'running', 'paused', 'shutoff'] as const;
    for (const [i, state] of states.entries()) {
      const uuid = randomUUID();
      await e.hv.createInstance({ uuid, name: `guest-${i}`, memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: 64 * 1024 });
      // Guest 0 has a guest agent (the live strategy freezes it); the others have none.
      e.hv.setGuestAgent(uuid, { present: i === 0 });
      await e.hv.start(uuid);
      e.hv.guestWrite(uuid, 0, Buffer.alloc(4096, 0x41 + i));
      if (state === 'paused') await e.hv.pause(uuid);
      if (state === 'shutoff') await e.hv.stop(uuid, { graceful: true });
      initial[uuid] = state;
      guests.push(uuid);
    }
    const [A, B, C, D] = guests as [string, string, string, string];
    const rebootTargets = [0, 1, 0, 1, 2, 0, 1, 2, 0, 1]; // never 3: D stays shut off
    const msgs = schedule(guests, rebootTargets);
    expect(msgs.filter((m) => m.kind === 'reboot')).toHaveLength(10);
    expect(msgs.filter((m, i) => m.kind === 'reboot' && i % 3 !== 2)).toEqual([]);
    e.hv.calls.length = 0;

    // The model: the state each snapshot should find, and each guest's state at the end.
    const expectedPrior = new Map<string, PowerState>();
    const model = { ...initial };
    for (const m of msgs) {
      if (m.kind === 'reboot') model[m.uuid] = 'running';
      else expectedPrior.set(m.requestId, model[m.uuid]!);
    }
    expect([...expectedPrior.values()].filter((s) => s === 'paused')).toHaveLength(2);
    expect([...expectedPrior.values()].filter((s) => s === 'shutoff')).toHaveLength(5);

    // Every message cast in order on the `compute` queue, without waiting for any to be carried out;
    // exports wait until all of them are accepted (journaled).
    let intakeDone!: () => void;
    e.hv.intake = new Promise<void>((resolve) => (intakeDone = resolve));
    for (const m of msgs) {
      const context = { request_id: m.requestId, user_id: 'u-1', project_id: 'p-1' };
      if (m.kind === 'snapshot') await e.client.cast('snapshot_instance', { instance: { uuid: m.uuid }, image_id: m.imageId }, { context });
      else await e.client.cast('reboot_instance', { instance: { uuid: m.uuid }, reboot_type: 'HARD' }, { context });
    }
    await waitForLines(e.lines, (l) => l.msg === 'RPC request accepted', msgs.length, 'requests accepted');
    intakeDone();
    const ended = (l: CapturedLine) => l.msg === 'operation end' || String(l.msg).startsWith('operation failed');
    await waitForLines(e.lines, ended, msgs.length, 'operations ended');
    await e.server.idle();

    // Every request ended, successfully, and none is left unfinished in the journal.
    expect(e.lines.filter((l) => String(l.msg).startsWith('operation failed'))).toEqual([]);
    expect(e.lines.filter((l) => l.msg === 'snapshot failed')).toEqual([]);
    expect(e.lines.filter((l) => l.msg === 'RPC request finished')).toHaveLength(msgs.length);
    expect(await e.journal.unfinished()).toEqual([]);
    expect(await e.operations.list()).toEqual([]);

    // No §2 violation, nothing frozen.
    expect(e.hv.violations).toEqual([]);
    for (const g of guests) expect(e.hv.frozen(g)).toBe(false);

    // Per guest: operations started in the order they were sent, one at a time.
    const ops = operationsByInstance(e.lines);
    expect([...ops.keys()].sort()).toEqual([...guests].sort());
    for (const g of guests) {
      expect(startOrder(ops.get(g)!)).toEqual(msgs.filter((m) => m.uuid === g).map((m) => m.requestId));
      expect(serialProblems(ops.get(g)!)).toEqual([]);
    }

    // Each snapshot found the state the model says (a hard reboot leaves a paused guest running).
    const starts = e.lines.filter((l) => l.msg === 'snapshot start');
    expect(starts).toHaveLength(20);
    for (const l of starts) expect({ req: l.request_id, prior: l.prior_state }).toEqual({ req: l.request_id, prior: expectedPrior.get(String(l.request_id)) });

    // Never more than 3 at once, from the manager's slot lines and, independently, the engine's
    // snapshot start/end lines; and the limit was reached (with a snapshot waiting for a slot).
    expectConcurrencyBound(e.lines, MAX_CONCURRENT, 20);

    // The hypervisor's own call log agrees: 3 guests at most, and at some moment 3, inside a snapshot.
    expect(maxGuestsInSnapshot(e.hv.calls)).toBe(MAX_CONCURRENT);

    // All 20 images active and verified, each the disk of its guest at one point in time.
    for (const m of msgs) {
      if (m.kind !== 'snapshot') continue;
      expect((await e.store.show(m.imageId)).status).toBe('active');
      expect((await e.store.verify(m.imageId)).ok).toBe(true);
      expect(e.hv.wasDiskState(m.uuid, await fs.readFile(e.store.dataPath(m.imageId)))).toBe(true);
    }
    expect(await fs.readdir(path.join(e.store.path, '.partial')).catch(() => [])).toEqual([]);
    expect(e.notified.start).toHaveLength(20);
    expect(e.notified.end).toHaveLength(20);
    expect(e.notified.error).toEqual([]);
    if (strategy === 'live') {
      // Guest 0 (running, with an agent) was frozen for each of its backups' start, and thawed since.
      const ends = e.lines.filter((l) => l.msg === 'snapshot end' && l.instance_uuid === A);
      expect(ends.map((l) => l.quiesced)).toEqual([true, true, true, true, true]);
    }

    // Each guest ends as the model says: A, B running; C paused until its reboot, then running; D shut off.
    expect({ A: e.hv.powerState(A), B: e.hv.powerState(B), C: e.hv.powerState(C), D: e.hv.powerState(D) }).toEqual({
      A: 'running', B: 'running', C: 'running', D: 'shutoff',
    });
    for (const g of guests) expect(e.hv.powerState(g)).toBe(model[g]);

    // Internal snapshots within policy, and for deferred-delete the pending record is exactly what is left.
    for (const g of guests) {
      const own = e.hv.snapshotNames(g).filter((n) => n.startsWith(PREFIX));
      expect(own.length).toBeLessThanOrEqual(allowedLeft(strategy, e.hv.powerState(g)));
      expect(own.length).toBeLessThanOrEqual(SNAPSHOTS_LEFT_MAX[strategy]);
      expect((await e.pending.list(g)).sort()).toEqual(strategy === 'deferred-delete' ? own.sort() : []);
    }
    if (strategy === 'deferred-delete') {
      // A running guest keeps its last snapshot pending, unless a hard reboot (a new QEMU process) came after it.
      for (const g of [A, B, C]) {
        const last = msgs.filter((m) => m.uuid === g).at(-1)!;
        const kept = last.kind === 'snapshot' ? [`${PREFIX}${last.imageId}`] : [];
        expect(e.hv.snapshotNames(g).filter((n) => n.startsWith(PREFIX))).toEqual(kept);
      }
      expect(new Set(msgs.filter((m) => m.uuid !== D).map((m) => msgs.filter((x) => x.uuid === m.uuid).at(-1)!.kind))).toEqual(
        new Set(['snapshot', 'reboot']),
      );
    }
  });
});

/**
 * From the fake's call log alone (exact order: each call is logged when it is made): the most guests
 * that were, at one moment, inside a snapshot. A snapshot's span on one guest runs from its
 * `diskInfo` call (the engine makes exactly one per snapshot, first thing; nothing else calls it) to
 * the last `listInternalSnapshots` call before that guest's next `diskInfo` or `stop` (the engine's
 * count of what is left, after every step; a hard reboot starts with `stop`, which no strategy calls).
 */
function maxGuestsInSnapshot(calls: FakeHypervisor['calls']): number {
  const spans: Array<[number, number]> = [];
  const open = new Map<string, { start: number; last?: number }>();
  const close = (uuid: string) => {
    const span = open.get(uuid);
    if (span === undefined) return;
    if (span.last === undefined) throw new Error(`snapshot of ${uuid} from call ${span.start} never counted its internal snapshots`);
    spans.push([span.start, span.last]);
    open.delete(uuid);
  };
  calls.forEach((c, i) => {
    if (c.uuid === undefined) return;
    if (c.op === 'diskInfo' || c.op === 'stop') close(c.uuid);
    if (c.op === 'diskInfo') open.set(c.uuid, { start: i });
    const span = open.get(c.uuid);
    if (c.op === 'listInternalSnapshots' && span !== undefined) span.last = i;
  });
  for (const uuid of [...open.keys()]) close(uuid);
  if (spans.length !== 20) throw new Error(`found ${spans.length} snapshot spans in the call log, expected 20`);
  let max = 0;
  for (const [s] of spans) max = Math.max(max, spans.filter(([a, b]) => a <= s && s <= b).length);
  return max;
}
