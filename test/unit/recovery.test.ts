import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { StrategyName } from '../../src/config/schema.js';
import { ImageNotFound, InjectedFault } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { SnapshotEngine } from '../../src/snapshot/engine.js';
import { DEFAULT_QUIESCE } from '../../src/snapshot/guest-freeze.js';
import type { OperationRecord } from '../../src/snapshot/operation-journal.js';
import { recoverOperations, scanOrphans, type RecoveryDeps } from '../../src/snapshot/recovery.js';
import type { BeforeStep } from '../../src/snapshot/run-steps.js';
import { STRATEGY_STEPS } from '../../src/snapshot/strategies.js';
import { allowedLeft, guestIn, makeFakeEnv, PREFIX, type FakeEnv } from '../helpers/fake-env.js';

/**
 * Start-up recovery on the fake hypervisor. A crash is simulated by an operation that hangs forever
 * at a chosen point (its journal record written, the next act never made): as far as the guest, the
 * disk, the store and the journal can tell, its process died there. recoverOperations is then run as
 * a new agent would, told that the record's owner is gone.
 */

const STRATEGIES = Object.keys(STRATEGY_STEPS) as StrategyName[];
const PRIOR_STATES = ['running', 'paused', 'shutoff', 'saved'] as const;
type Prior = (typeof PRIOR_STATES)[number];
const OPERATOR_SNAP = 'operator-snap';
/** Long enough that a hung operation's freeze deadline never thaws the guest during a test. */
const NO_DEADLINE_MS = 3_600_000;
const AGENT_TIMEOUT_MS = 50;

let envs: FakeEnv[] = [];
afterEach(async () => {
  await Promise.all(envs.map((e) => e.cleanup()));
  envs = [];
});

/** Never settles: the operation stops there, as if its process had died. */
const never = (): Promise<never> => new Promise<never>(() => undefined);

function signal() {
  let fire!: () => void;
  const reached = new Promise<void>((r) => (fire = r));
  return { reached, fire };
}

interface Rig {
  e: FakeEnv;
  strategy: StrategyName;
  /** An engine over the env's parts, with the hooks the test sets. */
  engine: SnapshotEngine;
  hooks: { beforeStep?: BeforeStep; faultPoint?: (point: string) => void | Promise<void> };
  deps: (over?: Partial<RecoveryDeps>) => RecoveryDeps;
}

async function rig(strategy: StrategyName): Promise<Rig> {
  const e = await makeFakeEnv({ strategy });
  envs.push(e);
  const hooks: Rig['hooks'] = {};
  const log = silentLogger();
  const engine = new SnapshotEngine({
    hv: e.hv,
    store: e.store,
    lifecycle: e.lifecycle,
    operations: e.operations,
    log,
    namePrefix: PREFIX,
    defaultStrategy: strategy,
    quiesce: { ...DEFAULT_QUIESCE, maxFreezeMs: NO_DEADLINE_MS, agentTimeoutMs: AGENT_TIMEOUT_MS },
    beforeStep: (step, i) => hooks.beforeStep?.(step, i),
    faultPoint: (point) => hooks.faultPoint?.(point),
  });
  const deps = (over: Partial<RecoveryDeps> = {}): RecoveryDeps => ({
    hv: e.hv,
    store: e.store,
    lifecycle: e.lifecycle,
    pending: e.pending,
    operations: e.operations,
    log,
    namePrefix: PREFIX,
    strategy,
    agentTimeoutMs: AGENT_TIMEOUT_MS,
    ownerRunning: async () => false,
    ...over,
  });
  return { e, strategy, engine, hooks, deps };
}

/** A guest in `state` with an operator's own internal snapshot on its disk (not ours: never to be touched). */
async function guestWithOperatorSnapshot(e: FakeEnv, state: Prior, uuid = randomUUID()): Promise<string> {
  await guestIn(e, state, uuid);
  if (state === 'running' || state === 'paused') await e.hv.liveSnapshotCreate(uuid, OPERATOR_SNAP);
  else await e.hv.offlineSnapshotCreate(uuid, OPERATOR_SNAP);
  return uuid;
}

/** Starts a snapshot (never awaited: it hangs) and resolves once it has reached its hang. */
async function startHung(r: Rig, uuid: string, imageId: string, reached: Promise<void>): Promise<void> {
  r.engine.take({ requestId: `req-${imageId}`, instanceUuid: uuid, imageId }).catch(() => undefined);
  await reached;
}

type Hang =
  | { at: 'point'; point: 'operation-recorded' | 'commit' }
  | { at: 'step'; index: number }
  | { at: 'undo'; failAt: number; undoIndex: number };

/** Arms the hang; resolves (via `reached`) when the operation has stopped there. */
function armHang(r: Rig, hang: Hang): Promise<void> {
  const { reached, fire } = signal();
  if (hang.at === 'point') {
    r.hooks.faultPoint = (point) => {
      if (point !== hang.point) return;
      fire();
      return never();
    };
  } else if (hang.at === 'step') {
    r.hooks.beforeStep = (_step, i) => {
      if (i !== hang.index) return;
      fire();
      return never();
    };
  } else {
    r.hooks.beforeStep = (step, i) => {
      if (i === hang.failAt) throw new InjectedFault(`injected failure before ${step.name}`);
    };
    // The undo's record is written, then the process "dies" before the undo acts.
    const write = r.e.operations.write.bind(r.e.operations);
    r.e.operations.write = async (rec: OperationRecord) => {
      await write(rec);
      if (rec.phase === 'undo' && rec.step_index === hang.undoIndex) {
        fire();
        await never();
      }
    };
  }
  return reached;
}

function disarm(r: Rig): void {
  r.hooks.beforeStep = undefined;
  r.hooks.faultPoint = undefined;
}

function expectedRecord(strategy: StrategyName, hang: Hang): Pick<OperationRecord, 'phase' | 'step_index'> {
  const n = STRATEGY_STEPS[strategy].length;
  if (hang.at === 'point') return hang.point === 'commit' ? { phase: 'commit', step_index: n } : { phase: 'setup', step_index: -1 };
  if (hang.at === 'step') return { phase: 'run', step_index: hang.index };
  return { phase: 'undo', step_index: hang.undoIndex };
}

function stoppedAt(strategy: StrategyName, hang: Hang): string {
  const steps = STRATEGY_STEPS[strategy];
  if (hang.at === 'point') return hang.point === 'commit' ? 'commit' : 'setup';
  if (hang.at === 'step') return `step ${hang.index + 1} (${steps[hang.index]!.name})`;
  return `undo of step ${hang.undoIndex + 1} (${steps[hang.undoIndex]!.name})`;
}

/**
 * Crash at `hang`, recover, and check every invariant of SPEC §2 and issue 5; then take a new
 * snapshot of the same guest to show the system is usable again.
 */
async function crashAndRecover(strategy: StrategyName, prior: Prior, hang: Hang): Promise<void> {
  const r = await rig(strategy);
  const { e } = r;
  const uuid = await guestWithOperatorSnapshot(e, prior);
  const imageId = randomUUID();
  const reached = armHang(r, hang);
  await startHung(r, uuid, imageId, reached);

  // The record says where it stopped, written before the act it stopped at.
  const records = await e.operations.list();
  expect(records).toHaveLength(1);
  expect(records[0]).toMatchObject({
    image_id: imageId,
    instance_uuid: uuid,
    strategy,
    prior_state: prior,
    snapshot_name: `${PREFIX}${imageId}`,
    steps: STRATEGY_STEPS[strategy].map((s) => s.name),
    ...expectedRecord(strategy, hang),
  });
  const found = e.hv.powerState(uuid);

  const results = await recoverOperations(r.deps());
  expect(results).toHaveLength(1);
  const res = results[0]!;
  expect(res.error).toBeUndefined();
  expect(res).toMatchObject({ image_id: imageId, instance_uuid: uuid, strategy, stopped_at: stoppedAt(strategy, hang), guest_found: found, guest_now: prior });

  // The guest as before, nothing broken, nothing left behind.
  expect((await e.hv.info(uuid)).state).toBe(prior);
  expect(e.hv.violations).toEqual([]);
  expect(e.hv.frozen(uuid)).toBe(false);
  expect(await e.partialFiles()).toEqual([]);
  const ours = await e.ownSnapshots(uuid);
  expect(ours.length).toBeLessThanOrEqual(allowedLeft(strategy, prior));
  // What is left of ours is explained (pending), so it is no orphan.
  for (const name of ours) expect(await e.pending.list(uuid)).toContain(name);
  expect(e.hv.snapshotNames(uuid)).toContain(OPERATOR_SNAP);
  expect(await e.operations.list()).toEqual([]);
  await expect(fs.stat(path.join(e.tmp, 'images', imageId))).rejects.toThrow();
  if (hang.at === 'point' && hang.point === 'operation-recorded') {
    expect(res.image).toBe('discarded');
    await expect(e.store.show(imageId)).rejects.toBeInstanceOf(ImageNotFound);
  } else {
    expect(res.image).toBe('killed');
    const image = await e.store.show(imageId);
    expect(image.status).toBe('killed');
    expect(image.properties.kill_reason).toContain(`stopped at ${stoppedAt(strategy, hang)} of ${strategy}`);
  }
  // A second recovery and an orphan scan find nothing more to do.
  expect(await recoverOperations(r.deps())).toEqual([]);
  expect(await scanOrphans(r.deps())).toEqual([]);

  // Usable again: a new snapshot of the same guest completes.
  disarm(r);
  const next = randomUUID();
  const result = await r.engine.take({ requestId: 'req-after', instanceUuid: uuid, imageId: next });
  expect(result.status).toBe('active');
  expect((await e.store.verify(next)).ok).toBe(true);
  expect((await e.hv.info(uuid)).state).toBe(prior);
  expect(e.hv.violations).toEqual([]);
  expect((await e.ownSnapshots(uuid)).length).toBeLessThanOrEqual(allowedLeft(strategy, prior));
  expect(e.hv.snapshotNames(uuid)).toContain(OPERATOR_SNAP);
  expect(await e.operations.list()).toEqual([]);
}

function hangName(strategy: StrategyName, hang: Hang): string {
  if (hang.at === 'point') return `fault point ${hang.point}`;
  const steps = STRATEGY_STEPS[strategy];
  if (hang.at === 'step') return `step ${hang.index} (${steps[hang.index]!.name})`;
  return `undo of ${hang.undoIndex} (${steps[hang.undoIndex]!.name}) after a failure at ${hang.failAt} (${steps[hang.failAt]!.name})`;
}

const RUN_CASES: Array<[string, StrategyName, Prior, Hang]> = [];
const UNDO_CASES: Array<[string, StrategyName, Prior, Hang]> = [];
for (const strategy of STRATEGIES) {
  const steps = STRATEGY_STEPS[strategy];
  const hangs: Hang[] = [
    { at: 'point', point: 'operation-recorded' },
    ...steps.map((_s, index): Hang => ({ at: 'step', index })),
    { at: 'point', point: 'commit' },
  ];
  const undos: Hang[] = [];
  for (let failAt = 0; failAt < steps.length; failAt++) {
    // The order runSteps undoes in: the failed step, then those done, last first; only those with an undo.
    const order = [failAt, ...Array.from({ length: failAt }, (_x, k) => failAt - 1 - k)].filter((k) => steps[k]!.undo !== undefined);
    for (const undoIndex of order) undos.push({ at: 'undo', failAt, undoIndex });
  }
  for (const prior of PRIOR_STATES) {
    for (const hang of hangs) RUN_CASES.push([`${strategy}, ${prior}, ${hangName(strategy, hang)}`, strategy, prior, hang]);
    // Undo paths differ by whether a QEMU process holds the disk: one prior state of each kind (file time).
    if (prior === 'running' || prior === 'shutoff') {
      for (const hang of undos) UNDO_CASES.push([`${strategy}, ${prior}, ${hangName(strategy, hang)}`, strategy, prior, hang]);
    }
  }
}

describe('recoverOperations: a crash before each step of each strategy, from each prior state', () => {
  it('covers every strategy, every step and every prior state', () => {
    const steps = STRATEGIES.reduce((n, s) => n + STRATEGY_STEPS[s].length, 0);
    expect(RUN_CASES).toHaveLength((steps + 2 * STRATEGIES.length) * PRIOR_STATES.length);
  });
  it.each(RUN_CASES)('%s', async (_name, strategy, prior, hang) => {
    await crashAndRecover(strategy, prior, hang);
  });
});

describe('recoverOperations: a crash while undoing a failed step', () => {
  it.each(UNDO_CASES)('%s', async (_name, strategy, prior, hang) => {
    await crashAndRecover(strategy, prior, hang);
  });
});

/** One crashed operation of `strategy` on a guest in `prior`, hung at step `index`. */
async function crashedAt(strategy: StrategyName, prior: Prior, index: number | 'commit', opts: { uuid?: string } = {}) {
  const r = await rig(strategy);
  const uuid = opts.uuid ?? randomUUID();
  await guestIn(r.e, prior, uuid);
  const imageId = randomUUID();
  const reached = armHang(r, index === 'commit' ? { at: 'point', point: 'commit' } : { at: 'step', index });
  await startHung(r, uuid, imageId, reached);
  disarm(r);
  return { ...r, uuid, imageId };
}

function stepIndex(strategy: StrategyName, name: string): number {
  const i = STRATEGY_STEPS[strategy].findIndex((s) => s.name === name);
  expect(i).toBeGreaterThanOrEqual(0);
  return i;
}

describe('recoverOperations: which records, and failures', () => {
  it('leaves alone the record of an operation whose owner still runs (injected, and the real /proc check)', async () => {
    const r = await crashedAt('suspend-create-resume-extract', 'running', 2);
    const { e, uuid, imageId } = r;
    const before = await e.operations.list();
    const calls = e.hv.calls.length;
    expect(await recoverOperations(r.deps({ ownerRunning: async () => true }))).toEqual([]);
    // Without the override, /proc says the owner (this very process) runs.
    expect(await recoverOperations(r.deps({ ownerRunning: undefined }))).toEqual([]);
    expect(await e.operations.list()).toEqual(before);
    expect(e.hv.calls.length).toBe(calls); // not even a look at the guest
    expect(e.hv.powerState(uuid)).toBe('saved');
    expect((await e.store.show(imageId)).status).toBe('queued');
    // Once its owner is gone, it is recovered.
    const [res] = await recoverOperations(r.deps());
    expect(res).toMatchObject({ image: 'killed', guest_now: 'running' });
    expect(e.hv.violations).toEqual([]);
  });

  it('only recovers the instance asked for, when one is given', async () => {
    const r = await crashedAt('cold', 'running', 1);
    const { e, uuid, imageId } = r;
    const other = randomUUID();
    await guestIn(e, 'running', other);
    expect(await recoverOperations(r.deps(), other)).toEqual([]);
    expect(await e.operations.has(imageId)).toBe(true);
    const results = await recoverOperations(r.deps(), uuid.toUpperCase());
    expect(results.map((x) => x.image_id)).toEqual([imageId]);
    expect(e.hv.powerState(uuid)).toBe('running');
  });

  it('moves a corrupt record aside as .corrupt and recovers the rest', async () => {
    const r = await crashedAt('double-suspend', 'running', 2);
    const { e, uuid, imageId } = r;
    const badId = randomUUID();
    const bad = path.join(e.operations.dir, `${badId}.json`);
    await fs.writeFile(bad, '{"version": 1, "image_id": "trunc');
    const results = await recoverOperations(r.deps());
    expect(results.map((x) => [x.image_id, x.image, x.error])).toEqual([[imageId, 'killed', undefined]]);
    expect(await fs.readFile(`${bad}.corrupt`, 'utf8')).toBe('{"version": 1, "image_id": "trunc');
    await expect(fs.stat(bad)).rejects.toThrow();
    expect((await fs.readdir(e.operations.dir)).sort()).toEqual([`${badId}.json.corrupt`]);
    expect(e.hv.powerState(uuid)).toBe('running');
    expect(await e.ownSnapshots(uuid)).toEqual([]);
    expect(e.hv.violations).toEqual([]);
  });

  it('a record for an instance that no longer exists: image killed, record removed', async () => {
    const r = await crashedAt('suspend-create-resume-extract', 'running', 5);
    const { e, uuid, imageId } = r;
    await e.hv.deleteInstance(uuid);
    const [res] = await recoverOperations(r.deps());
    expect(res).toMatchObject({ image_id: imageId, guest_found: 'missing', guest_now: 'missing', image: 'killed', actions: [] });
    expect(res!.error).toBeUndefined();
    const image = await e.store.show(imageId);
    expect(image.status).toBe('killed');
    expect(image.properties.kill_reason).toContain('step 6 (export-snapshot)');
    expect(await e.operations.list()).toEqual([]);
    expect(e.hv.violations).toEqual([]);
  });

  it('recovery that cannot bring the guest back keeps the record and reports the error; the next run completes it', async () => {
    const r = await crashedAt('suspend-create-resume-extract', 'running', stepIndex('suspend-create-resume-extract', 'resume'));
    const { e, uuid, imageId } = r;
    expect(e.hv.powerState(uuid)).toBe('saved');
    e.hv.injectFault({ op: 'resume', uuid });
    const [first] = await recoverOperations(r.deps());
    expect(first!.error).toMatch(/injected fault: resume/);
    expect(first!.guest_found).toBe('saved');
    expect(await e.operations.has(imageId)).toBe(true);
    expect(e.hv.powerState(uuid)).toBe('saved');
    // Its snapshot went while no process held the disk; the image is settled anyway, naming the failure.
    expect(await e.ownSnapshots(uuid)).toEqual([]);
    const image = await e.store.show(imageId);
    expect(image.status).toBe('killed');
    expect(image.properties.kill_reason).toMatch(/could not be brought back: .*injected fault: resume/);

    const [second] = await recoverOperations(r.deps());
    expect(second!.error).toBeUndefined();
    expect(second).toMatchObject({ guest_found: 'saved', guest_now: 'running', image: 'killed' });
    expect(e.hv.powerState(uuid)).toBe('running');
    expect(await e.operations.list()).toEqual([]);
    expect(e.hv.violations).toEqual([]);
  });

  it('the live backup job left running (hang at wait-backup) is cancelled before the partial file is removed', async () => {
    const r = await crashedAt('live', 'running', stepIndex('live', 'wait-backup'));
    const { e, uuid, imageId } = r;
    const partial = e.store.partialPath(imageId);
    expect(e.hv.liveBackups(uuid).map((b) => b.status)).toEqual(['running']);
    await fs.stat(partial); // the job's target
    let partialAtSettle: boolean | undefined;
    const settle = e.hv.endInterruptedWork.bind(e.hv);
    e.hv.endInterruptedWork = async (id) => {
      partialAtSettle = await fs.stat(partial).then(() => true, () => false);
      return settle(id);
    };
    const [res] = await recoverOperations(r.deps());
    expect(partialAtSettle).toBe(true);
    expect(e.hv.liveBackups(uuid).map((b) => b.status)).toEqual(['cancelled']);
    expect(res!.actions).toContain('cancelled 1 backup job(s)');
    await expect(fs.stat(partial)).rejects.toThrow();
    expect(res).toMatchObject({ image: 'killed', guest_now: 'running' });
    expect(e.hv.violations).toEqual([]);
  });

  it.each(['start-backup', 'thaw'])('a live operation hung at %s, after its freeze, is thawed', async (step) => {
    const r = await crashedAt('live', 'running', stepIndex('live', step));
    const { e, uuid } = r;
    expect(e.hv.frozen(uuid)).toBe(true);
    const [res] = await recoverOperations(r.deps());
    expect(e.hv.frozen(uuid)).toBe(false);
    expect(res!.actions).toContain('thawed 2 filesystem(s)');
    expect(res).toMatchObject({ image: 'killed', guest_now: 'running' });
    expect(e.hv.calls.filter((c) => c.op === 'thawFilesystems')).toHaveLength(1);
    expect(e.hv.violations).toEqual([]);
  });

  it('a guest left paused by a save the dead agent did not finish runs again', async () => {
    const r = await crashedAt('suspend-create-resume-extract', 'running', 0);
    const { e, uuid } = r;
    await e.hv.pause(uuid); // what endInterruptedWork leaves of a managed save under way (qemu backend)
    const [res] = await recoverOperations(r.deps());
    expect(res).toMatchObject({ guest_found: 'paused', guest_now: 'running' });
    expect(e.hv.powerState(uuid)).toBe('running');
    expect(e.hv.violations).toEqual([]);
  });

  it.each(['running', 'paused'] as const)('a %s guest whose QEMU died during the crashed operation is started again, snapshot deleted offline first', async (prior) => {
    const strategy = 'suspend-create-resume-extract';
    const r = await crashedAt(strategy, prior, stepIndex(strategy, 'export-snapshot'));
    const { e, uuid, imageId } = r;
    expect(await e.ownSnapshots(uuid)).toEqual([`${PREFIX}${imageId}`]);
    e.hv.crash(uuid);
    const launches = e.hv.launches(uuid);
    const [res] = await recoverOperations(r.deps());
    expect(res!.error).toBeUndefined();
    expect(res).toMatchObject({ guest_found: 'crashed', guest_now: prior, image: 'killed' });
    expect(e.hv.powerState(uuid)).toBe(prior);
    expect(e.hv.launches(uuid)).toBe(launches + 1);
    expect(await e.ownSnapshots(uuid)).toEqual([]);
    const ops = e.hv.calls.map((c) => c.op);
    expect(ops.lastIndexOf('offlineSnapshotDelete')).toBeLessThan(ops.lastIndexOf('start'));
    expect(e.hv.violations).toEqual([]);
  });

  it('a live thaw that fails during recovery keeps the record; the next run thaws and completes', async () => {
    const r = await crashedAt('live', 'running', stepIndex('live', 'thaw'));
    const { e, uuid, imageId } = r;
    e.hv.setGuestAgent(uuid, { present: true, thawFails: 1 });
    const [first] = await recoverOperations(r.deps());
    expect(first!.error).toMatch(/guest-fsfreeze-thaw failed/);
    expect(await e.operations.has(imageId)).toBe(true);
    const [second] = await recoverOperations(r.deps());
    expect(second!.error).toBeUndefined();
    expect(second!.actions).toContain('thawed 2 filesystem(s)');
    expect(e.hv.frozen(uuid)).toBe(false);
    expect(await e.operations.list()).toEqual([]);
    expect((await e.store.show(imageId)).status).toBe('killed');
    expect(e.hv.violations).toEqual([]);
  });

  it('an image the operator deleted meanwhile is reported missing; the guest is still put right', async () => {
    const r = await crashedAt('cold', 'paused', stepIndex('cold', 'resume'));
    const { e, uuid, imageId } = r;
    await e.store.delete(imageId);
    const [res] = await recoverOperations(r.deps());
    expect(res).toMatchObject({ image: 'missing', guest_found: 'saved', guest_now: 'paused' });
    expect(res!.error).toBeUndefined();
    expect(await e.partialFiles()).toEqual([]);
    expect(await e.operations.list()).toEqual([]);
    expect(e.hv.powerState(uuid)).toBe('paused');
  });

  it.each(['running', 'shutoff'] as const)(
    'an operation that had completed (%s guest; crash after the commit, before its record went): the image stays active',
    async (prior) => {
      const strategy = 'deferred-delete';
      const r = await rig(strategy);
      const { e } = r;
      const uuid = await guestWithOperatorSnapshot(e, prior);
      const imageId = randomUUID();
      await r.engine.take({ requestId: 'req-done', instanceUuid: uuid, imageId });
      const left = await e.ownSnapshots(uuid);
      const op = await e.operations.begin({
        image_id: imageId,
        instance_uuid: uuid,
        request_id: 'req-done',
        strategy,
        snapshot_name: `${PREFIX}${imageId}`,
        prior_state: prior,
        steps: STRATEGY_STEPS[strategy].map((s) => s.name),
      });
      await op.commit();
      const [res] = await recoverOperations(r.deps());
      expect(res).toMatchObject({ stopped_at: 'commit', image: 'active', guest_now: prior });
      expect(res!.error).toBeUndefined();
      expect((await e.store.verify(imageId)).ok).toBe(true);
      expect(await e.ownSnapshots(uuid)).toEqual(left);
      expect(await e.pending.list(uuid)).toEqual(left);
      expect(await e.operations.list()).toEqual([]);
      expect(e.hv.powerState(uuid)).toBe(prior);
      expect(e.hv.violations).toEqual([]);
    },
  );

  it('recovers several interrupted operations, oldest first', async () => {
    const r = await rig('cold');
    const { e } = r;
    const a = randomUUID();
    const b = randomUUID();
    await guestIn(e, 'running', a);
    await guestIn(e, 'paused', b);
    const ia = randomUUID();
    const ib = randomUUID();
    const reachedA = armHang(r, { at: 'step', index: 1 });
    await startHung(r, a, ia, reachedA);
    const reachedB = armHang(r, { at: 'step', index: 2 });
    await startHung(r, b, ib, reachedB);
    const results = await recoverOperations(r.deps());
    expect(results.map((x) => x.image_id)).toEqual([ia, ib]);
    expect(results.every((x) => x.error === undefined && x.image === 'killed')).toBe(true);
    expect(e.hv.powerState(a)).toBe('running');
    expect(e.hv.powerState(b)).toBe('paused');
    expect(e.hv.violations).toEqual([]);
  });
});

describe('scanOrphans', () => {
  async function withGuest(strategy: StrategyName, state: Prior) {
    const r = await rig(strategy);
    const uuid = await guestWithOperatorSnapshot(r.e, state);
    return { ...r, uuid };
  }
  async function addSnapshot(r: Rig, uuid: string, name: string): Promise<void> {
    const s = r.e.hv.powerState(uuid);
    if (s === 'running' || s === 'paused') await r.e.hv.liveSnapshotCreate(uuid, name);
    else await r.e.hv.offlineSnapshotCreate(uuid, name);
  }

  it.each(['shutoff', 'saved'] as const)('an orphan of ours on a %s guest is deleted offline', async (state) => {
    const r = await withGuest('suspend-create-resume-extract', state);
    const orphan = `${PREFIX}${randomUUID()}`;
    await addSnapshot(r, r.uuid, orphan);
    const calls = r.e.hv.calls.length;
    expect(await scanOrphans(r.deps())).toEqual([{ instance_uuid: r.uuid, snapshot: orphan, action: 'deleted' }]);
    expect(r.e.hv.calls.slice(calls).map((c) => c.op)).toContain('offlineSnapshotDelete');
    expect(r.e.hv.snapshotNames(r.uuid)).toEqual([OPERATOR_SNAP]);
    expect(r.e.hv.powerState(r.uuid)).toBe(state);
    expect(r.e.hv.violations).toEqual([]);
  });

  it.each(['running', 'paused'] as const)(
    'an orphan on a %s guest under deferred-delete is recorded pending, and deleted at the next hard reboot',
    async (state) => {
      const r = await withGuest('deferred-delete', state);
      const orphan = `${PREFIX}${randomUUID()}`;
      await addSnapshot(r, r.uuid, orphan);
      expect(await scanOrphans(r.deps())).toEqual([{ instance_uuid: r.uuid, snapshot: orphan, action: 'pending' }]);
      expect(r.e.hv.snapshotNames(r.uuid)).toContain(orphan);
      expect(await r.e.pending.list(r.uuid)).toEqual([orphan]);
      expect(r.e.hv.calls.some((c) => c.op === 'liveSnapshotDelete')).toBe(false);
      // Now explained (pending): a second scan leaves it.
      expect(await scanOrphans(r.deps())).toEqual([]);
      await r.e.lifecycle.hardReboot(r.uuid);
      expect(r.e.hv.snapshotNames(r.uuid)).toEqual([OPERATOR_SNAP]);
      expect(await r.e.pending.list(r.uuid)).toEqual([]);
      expect(r.e.hv.violations).toEqual([]);
    },
  );

  it.each(STRATEGIES.filter((s) => s !== 'deferred-delete').flatMap((s) => [[s, 'running'] as const, [s, 'paused'] as const]))(
    'an orphan on a guest under %s that is %s is deleted through the monitor',
    async (strategy, state) => {
      const r = await withGuest(strategy, state);
      const orphan = `${PREFIX}${randomUUID()}`;
      await addSnapshot(r, r.uuid, orphan);
      const calls = r.e.hv.calls.length;
      expect(await scanOrphans(r.deps())).toEqual([{ instance_uuid: r.uuid, snapshot: orphan, action: 'deleted' }]);
      expect(r.e.hv.calls.slice(calls).filter((c) => c.op === 'liveSnapshotDelete').map((c) => c.args)).toEqual([[r.uuid, orphan]]);
      expect(r.e.hv.snapshotNames(r.uuid)).toEqual([OPERATOR_SNAP]);
      expect(r.e.hv.powerState(r.uuid)).toBe(state);
      expect(await r.e.pending.list(r.uuid)).toEqual([]);
      expect(r.e.hv.violations).toEqual([]);
    },
  );

  it('a pending snapshot is not an orphan', async () => {
    const r = await withGuest('deferred-delete', 'running');
    const name = `${PREFIX}${randomUUID()}`;
    await addSnapshot(r, r.uuid, name);
    await r.e.pending.add(r.uuid, name);
    expect(await scanOrphans(r.deps())).toEqual([]);
    // Not even on a shut-off guest under another strategy.
    await r.e.hv.stop(r.uuid, { graceful: true });
    expect(await scanOrphans(r.deps({ strategy: 'suspend-create-resume-extract' }))).toEqual([]);
    expect(r.e.hv.snapshotNames(r.uuid)).toContain(name);
  });

  it("the snapshot of an operation in the journal is not an orphan", async () => {
    for (const state of PRIOR_STATES) {
      const r = await withGuest('suspend-create-resume-extract', state);
      const imageId = randomUUID();
      const name = `${PREFIX}${imageId}`;
      await addSnapshot(r, r.uuid, name);
      await r.e.operations.begin({
        image_id: imageId,
        instance_uuid: r.uuid,
        request_id: 'req-busy',
        strategy: 'suspend-create-resume-extract',
        snapshot_name: name,
        prior_state: state,
        steps: STRATEGY_STEPS['suspend-create-resume-extract'].map((s) => s.name),
      });
      expect(await scanOrphans(r.deps())).toEqual([]);
      expect(r.e.hv.snapshotNames(r.uuid)).toContain(name);
    }
  });

  it('a snapshot without our prefix is never touched, in any state under any strategy', async () => {
    const foreign = [OPERATOR_SNAP, PREFIX.slice(0, -1), `x${PREFIX}${randomUUID()}`, PREFIX.toUpperCase() + randomUUID(), `${PREFIX.slice(0, -1)}_${randomUUID()}`];
    for (const strategy of STRATEGIES) {
      for (const state of PRIOR_STATES) {
        const r = await withGuest(strategy, state);
        for (const name of foreign.slice(1)) await addSnapshot(r, r.uuid, name);
        const calls = r.e.hv.calls.length;
        expect(await scanOrphans(r.deps())).toEqual([]);
        expect(r.e.hv.calls.slice(calls).map((c) => c.op)).not.toContainEqual(expect.stringMatching(/Delete/));
        expect(r.e.hv.snapshotNames(r.uuid)).toEqual(foreign);
        expect(r.e.hv.powerState(r.uuid)).toBe(state);
      }
    }
  });

  it('goes over every instance, or only the one given', async () => {
    const r = await rig('suspend-create-resume-extract');
    const a = await guestWithOperatorSnapshot(r.e, 'shutoff');
    const b = await guestWithOperatorSnapshot(r.e, 'running');
    const oa = `${PREFIX}${randomUUID()}`;
    const ob = `${PREFIX}${randomUUID()}`;
    await addSnapshot(r, a, oa);
    await addSnapshot(r, b, ob);
    expect(await scanOrphans(r.deps(), b)).toEqual([{ instance_uuid: b, snapshot: ob, action: 'deleted' }]);
    expect(r.e.hv.snapshotNames(a)).toContain(oa);
    expect(await scanOrphans(r.deps())).toEqual([{ instance_uuid: a, snapshot: oa, action: 'deleted' }]);
    expect(r.e.hv.violations).toEqual([]);
  });
});
