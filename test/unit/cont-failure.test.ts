import { randomUUID } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import type { StrategyName } from '../../src/config/schema.js';
import { GuestLeftPaused, InjectedFault, QemuImgError, SnapshotFailed } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { recoverOperations, type RecoveryDeps } from '../../src/snapshot/recovery.js';
import { disposeOfFailedSnapshot } from '../../src/snapshot/steps.js';
import { STRATEGY_STEPS, USES_MANAGED_SAVE } from '../../src/snapshot/strategies.js';
import { expectSafeFailure, fakeRecoveryDeps, guestIn, makeFakeEnv, PREFIX, snapshotFailure, type FakeEnv } from '../helpers/fake-env.js';

/**
 * Issue 12 items 1 and 9 on the fake hypervisor:
 * - a managed save or resume whose final `cont` fails (a one-shot fault; or, as on real QEMU, another
 *   process holding the disk's write lock, which the `cont` after an incoming migration must take)
 *   leaves a guest that ran paused: the operation runs it again, and when it cannot, records an undo
 *   error so that its record stays in the journal and recovery runs the guest later;
 * - a guest paused before the operation is never unpaused;
 * - one rule for a failed (or interrupted) operation's internal snapshot, undo and recovery alike.
 */

const SAVE_STRATEGIES = (Object.keys(STRATEGY_STEPS) as StrategyName[]).filter((s) => USES_MANAGED_SAVE[s]);
/** No guest agent: a paused guest's agent would be waited for (agent timeouts), and freezes are not the point here. */
const NO_AGENT = { present: false } as const;

let envs: FakeEnv[] = [];
afterEach(async () => {
  await Promise.all(envs.map((e) => e.cleanup()));
  envs = [];
});

async function env(strategy: StrategyName): Promise<FakeEnv> {
  const e = await makeFakeEnv({ strategy });
  envs.push(e);
  return e;
}

function recoveryDeps(e: FakeEnv, strategy: StrategyName, ownerAlive = false): RecoveryDeps {
  return fakeRecoveryDeps(e, { strategy, agentTimeoutMs: 50, ownerRunning: async () => ownerAlive });
}


describe.each(SAVE_STRATEGIES)('%s: a cont that fails', (strategy) => {
  it('once, at the end of the resume (state loaded, guest paused): the guest is unpaused and the snapshot completes', async () => {
    const e = await env(strategy);
    const uuid = randomUUID();
    await guestIn(e, 'running', uuid, NO_AGENT);
    e.hv.injectFault({ op: 'cont', uuid, nth: e.hv.callCount('cont', uuid) + 1 });
    const mark = e.hv.calls.length;
    const imageId = randomUUID();
    const result = await e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId });
    expect(e.hv.pendingFaults()).toEqual([]); // the fault did fire
    expect(result.status).toBe('active');
    expect((await e.store.verify(imageId)).ok).toBe(true);
    expect(e.hv.powerState(uuid)).toBe('running');
    const ops = e.hv.calls.slice(mark).map((c) => c.op);
    expect(ops.indexOf('unpause')).toBeGreaterThan(ops.indexOf('resume'));
    expect(await e.operations.list()).toEqual([]);
    expect(e.hv.violations).toEqual([]);
  });

  it('for good (another process holds the disk\'s write lock): an undo error keeps the record; recovery runs the guest once the lock is gone', async () => {
    const e = await env(strategy);
    const uuid = randomUUID();
    await guestIn(e, 'running', uuid, NO_AGENT);
    let locked = false;
    e.beforeStep = (step) => {
      if (step.name === 'resume' && !locked) {
        locked = true;
        e.hv.holdDiskLock(uuid); // the guest is saved: no process holds the disk
      }
    };
    const imageId = randomUUID();
    const err = await snapshotFailure(e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId }));
    expect(locked).toBe(true);
    expect(err.message).toMatch(/resume.*Failed to get "write" lock/);
    expect(err.undoErrors.some((u) => u instanceof GuestLeftPaused)).toBe(true);
    expect(e.hv.powerState(uuid)).toBe('paused');
    // Asked again (the resume step, the suspend's undo), never given up silently.
    expect(e.hv.callCount('unpause', uuid)).toBeGreaterThanOrEqual(1);
    const records = await e.operations.list();
    expect(records).toHaveLength(1);
    // Abandoned: recovery takes it although its owner (this process, as a serving agent) lives on.
    expect(records[0]).toMatchObject({ image_id: imageId, prior_state: 'running', strategy, abandoned: true });
    expect((await e.store.show(imageId)).status).toBe('killed');

    // Recovery while the lock is still held cannot run the guest: it says so and keeps the record.
    const [early] = await recoverOperations(recoveryDeps(e, strategy, true));
    expect(early!.error).toMatch(/write" lock/);
    expect(await e.operations.list()).toHaveLength(1);
    expect(e.hv.powerState(uuid)).toBe('paused');

    e.hv.releaseDiskLock(uuid);
    const [res] = await recoverOperations(recoveryDeps(e, strategy, true));
    expect(res!.error).toBeUndefined();
    expect(res).toMatchObject({ image_id: imageId, guest_found: 'paused', guest_now: 'running', image: 'killed' });
    expect(e.hv.powerState(uuid)).toBe('running');
    expect(await e.operations.list()).toEqual([]);
    // Its snapshot (if it made one) is gone too, recorded pending by the undo or not.
    expect(await e.ownSnapshots(uuid)).toEqual([]);
    expect(await e.pending.list(uuid)).toEqual([]);
    expect(e.hv.violations).toEqual([]);
  });

  it("once, in the undo of a save that failed half-way: the guest is unpaused, a clean failure", async () => {
    const e = await env(strategy);
    const uuid = randomUUID();
    await guestIn(e, 'running', uuid, NO_AGENT);
    e.hv.injectFault({ op: 'saveMigration', uuid });
    e.hv.injectFault({ op: 'cont', uuid, nth: e.hv.callCount('cont', uuid) + 1 });
    const err = await expectSafeFailure(e, uuid, 'running', strategy, randomUUID());
    expect((err as SnapshotFailed).cause).toBeInstanceOf(InjectedFault);
    expect(e.hv.pendingFaults()).toEqual([]);
    expect(e.hv.callCount('unpause', uuid)).toBe(1);
  });

  it('every time after a save that failed half-way: the record stays, recovery runs the guest', async () => {
    const e = await env(strategy);
    const uuid = randomUUID();
    await guestIn(e, 'running', uuid, NO_AGENT);
    e.hv.injectFault({ op: 'saveMigration', uuid });
    const c = e.hv.callCount('cont', uuid);
    for (let k = 1; k <= 5; k++) e.hv.injectFault({ op: 'cont', uuid, nth: c + k });
    const imageId = randomUUID();
    const err = await snapshotFailure(e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId }));
    expect(err.undoErrors.some((u) => u instanceof GuestLeftPaused)).toBe(true);
    expect(e.hv.powerState(uuid)).toBe('paused');
    expect(await e.operations.list()).toHaveLength(1);
    e.hv.clearFaults();
    const [res] = await recoverOperations(recoveryDeps(e, strategy));
    expect(res).toMatchObject({ guest_now: 'running', image: 'killed' });
    expect(res!.error).toBeUndefined();
    expect(res!.actions.join('; ')).toMatch(/run again/);
    expect(e.hv.powerState(uuid)).toBe('running');
    expect(await e.operations.list()).toEqual([]);
    expect(e.hv.violations).toEqual([]);
  });

  it('a guest paused before the operation is never unpaused: a save that failed half-way', async () => {
    const e = await env(strategy);
    const uuid = randomUUID();
    await guestIn(e, 'paused', uuid, NO_AGENT);
    e.hv.injectFault({ op: 'saveMigration', uuid });
    await expectSafeFailure(e, uuid, 'paused', strategy, randomUUID());
    expect(e.hv.callCount('unpause', uuid)).toBe(0);
    expect(e.hv.callCount('cont', uuid)).toBe(0);
  });
});

describe('a guest paused before the operation', () => {
  it('resumed under a foreign lock (its disk left inactive) is left paused, never unpaused (cold completes)', async () => {
    const e = await env('cold');
    const uuid = randomUUID();
    await guestIn(e, 'paused', uuid, NO_AGENT);
    e.beforeStep = (step) => {
      if (step.name === 'resume') e.hv.holdDiskLock(uuid);
    };
    const result = await e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId: randomUUID() });
    expect(result.status).toBe('active');
    expect(e.hv.powerState(uuid)).toBe('paused');
    expect(e.hv.callCount('unpause', uuid)).toBe(0);
    expect(e.hv.callCount('cont', uuid)).toBe(0);
    expect(await e.operations.list()).toEqual([]);
  });
});

describe("one rule for a failed operation's internal snapshot (disposeOfFailedSnapshot)", () => {
  const NAME = `${PREFIX}${randomUUID()}`;

  async function guestWithSnapshot(state: 'running' | 'paused' | 'shutoff' | 'saved') {
    const e = await env('deferred-delete');
    const uuid = randomUUID();
    await guestIn(e, state, uuid, NO_AGENT);
    if (state === 'running' || state === 'paused') await e.hv.liveSnapshotCreate(uuid, NAME);
    else await e.hv.offlineSnapshotCreate(uuid, NAME);
    e.hv.calls.length = 0;
    return { e, uuid, d: { hv: e.hv, pending: e.pending, log: silentLogger() } };
  }

  it.each(['shutoff', 'saved'] as const)('no process holds the disk (%s): deleted with qemu-img', async (state) => {
    const { e, uuid, d } = await guestWithSnapshot(state);
    expect(await disposeOfFailedSnapshot(d, uuid, NAME)).toBe('deleted');
    expect(e.hv.calls.filter((c) => c.op === 'offlineSnapshotDelete').map((c) => c.args)).toEqual([[uuid, NAME]]);
    expect(e.hv.snapshotNames(uuid)).toEqual([]);
    expect(await e.pending.list(uuid)).toEqual([]);
  });

  it.each(['running', 'paused'] as const)('a process holds the disk (%s): deleted through its monitor, deferred-delete or not', async (state) => {
    const { e, uuid, d } = await guestWithSnapshot(state);
    await e.pending.add(uuid, NAME); // e.g. keep-as-pending had run
    expect(await disposeOfFailedSnapshot(d, uuid, NAME)).toBe('deleted');
    expect(e.hv.calls.filter((c) => c.op === 'liveSnapshotDelete').map((c) => c.args)).toEqual([[uuid, NAME]]);
    expect(e.hv.snapshotNames(uuid)).toEqual([]);
    expect(await e.pending.list(uuid)).toEqual([]);
    expect(e.hv.powerState(uuid)).toBe(state);
  });

  it("the process cannot delete it: recorded pending, deleted at the guest's next restart", async () => {
    const { e, uuid, d } = await guestWithSnapshot('running');
    e.hv.injectFault({ op: 'liveSnapshotDelete', uuid });
    expect(await disposeOfFailedSnapshot(d, uuid, NAME)).toBe('pending');
    expect(e.hv.snapshotNames(uuid)).toEqual([NAME]);
    expect(await e.pending.list(uuid)).toEqual([NAME]);
    await e.lifecycle.hardReboot(uuid);
    expect(e.hv.snapshotNames(uuid)).toEqual([]);
    expect(await e.pending.list(uuid)).toEqual([]);
    expect(e.hv.violations).toEqual([]);
  });

  it('qemu-img fails with no process: thrown, not made pending (the next launch would fail on it)', async () => {
    const { e, uuid, d } = await guestWithSnapshot('shutoff');
    e.hv.holdDiskLock(uuid);
    await expect(disposeOfFailedSnapshot(d, uuid, NAME)).rejects.toBeInstanceOf(QemuImgError);
    expect(await e.pending.list(uuid)).toEqual([]);
    expect(e.hv.snapshotNames(uuid)).toEqual([NAME]);
  });

  it('already gone: nothing to do, and it is no longer pending', async () => {
    const { e, uuid, d } = await guestWithSnapshot('running');
    await e.hv.liveSnapshotDelete(uuid, NAME);
    await e.pending.add(uuid, NAME);
    expect(await disposeOfFailedSnapshot(d, uuid, NAME)).toBe('absent');
    expect(await e.pending.list(uuid)).toEqual([]);
  });

  /** deferred-delete on a running guest, failing (or dying) at export-snapshot: its snapshot exists, the guest runs. */
  const EXPORT = STRATEGY_STEPS['deferred-delete'].findIndex((s) => s.name === 'export-snapshot');

  it.each(['undo', 'crash'] as const)(
    'deferred-delete failing at export-snapshot, running guest (%s): its snapshot is deleted through the monitor, not left pending',
    async (how) => {
      const e = await env('deferred-delete');
      const uuid = randomUUID();
      await guestIn(e, 'running', uuid, NO_AGENT);
      const imageId = randomUUID();
      const name = `${PREFIX}${imageId}`;
      if (how === 'undo') {
        e.beforeStep = (_step, i) => {
          if (i === EXPORT) throw new InjectedFault('export fails');
        };
        await expectSafeFailure(e, uuid, 'running', 'deferred-delete', imageId);
      } else {
        let reached!: () => void;
        const hung = new Promise<void>((r) => (reached = r));
        e.beforeStep = (_step, i) => {
          if (i !== EXPORT) return;
          reached();
          return new Promise<never>(() => undefined); // the agent dies here
        };
        e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId }).catch(() => undefined);
        await hung;
        expect(e.hv.snapshotNames(uuid)).toContain(name);
        const [res] = await recoverOperations(recoveryDeps(e, 'deferred-delete'));
        expect(res!.error).toBeUndefined();
        expect(res!.actions).toContain(`deleted internal snapshot ${name} through the guest's monitor`);
      }
      expect(e.hv.calls.filter((c) => c.op === 'liveSnapshotDelete').map((c) => c.args)).toEqual([[uuid, name]]);
      expect(e.hv.snapshotNames(uuid)).toEqual([]);
      expect(await e.pending.list(uuid)).toEqual([]);
      expect(e.hv.powerState(uuid)).toBe('running');
      expect(e.hv.violations).toEqual([]);
    },
  );
});
