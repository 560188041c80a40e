import { readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { dir, type DirectoryResult } from 'tmp-promise';
import {
  GuestAgentError,
  InjectedFault,
  InstanceExists,
  InstanceInvalidState,
  InstanceNotFound,
  InvalidInstanceId,
  QemuImgError,
  QmpError,
  SafetyViolation,
} from '../../src/errors.js';
import { FakeHypervisor } from '../../src/hypervisor/fake/fake-hypervisor.js';
import type { InstanceSpec } from '../../src/hypervisor/types.js';

const A = '11111111-2222-4333-8444-555555555555';
const B = '66666666-7777-4888-9999-aaaaaaaaaaaa';

function spec(uuid: string, extra: Partial<InstanceSpec> = {}): InstanceSpec {
  return { uuid, name: `vm-${uuid.slice(0, 4)}`, memoryMb: 256, vcpus: 1, machine: 'pc', ...extra };
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (err) {
    return err;
  }
  throw new Error('expected the promise to reject, it resolved');
}

function counterOf(disk: Buffer): bigint {
  return disk.readBigUInt64LE(0);
}

let fake: FakeHypervisor;
let tmp: DirectoryResult;

beforeEach(async () => {
  fake = new FakeHypervisor({ now: () => 1_700_000_000_000 });
  tmp = await dir({ unsafeCleanup: true });
});

afterEach(async () => {
  await tmp.cleanup();
});

describe('instances', () => {
  it('creates a shut-off instance with a small disk and lists it', async () => {
    expect(await fake.createInstance(spec(A))).toEqual({ uuid: A, name: 'vm-1111', state: 'shutoff' });
    expect(fake.driver).toBe('fake');
    expect(await fake.list()).toEqual([{ uuid: A, name: 'vm-1111', state: 'shutoff' }]);
    expect(await fake.diskInfo(A)).toEqual({ path: `/fake/${A}/disk`, virtualSize: 64 * 1024, actualSize: 64 * 1024 });
    expect(fake.launches(A)).toBe(0);
  });

  it('uses diskSizeBytes up to 16 MiB and the default above it', async () => {
    await fake.createInstance(spec(A, { diskSizeBytes: 1024 * 1024 }));
    await fake.createInstance(spec(B, { diskSizeBytes: 20 * 1024 ** 3 }));
    expect((await fake.diskInfo(A)).virtualSize).toBe(1024 * 1024);
    expect((await fake.diskInfo(B)).virtualSize).toBe(64 * 1024);
  });

  it('refuses a duplicate uuid, a non-uuid, and unknown instances', async () => {
    await fake.createInstance(spec(A));
    expect(await rejection(fake.createInstance(spec(A)))).toBeInstanceOf(InstanceExists);
    expect(await rejection(fake.createInstance(spec('not-a-uuid')))).toBeInstanceOf(InvalidInstanceId);
    expect(await rejection(fake.info(B))).toBeInstanceOf(InstanceNotFound);
    expect(await rejection(fake.start(B))).toBeInstanceOf(InstanceNotFound);
    expect(() => fake.diskContent(B)).toThrow(InstanceNotFound);
  });

  it('deletes an instance', async () => {
    await fake.createInstance(spec(A));
    await fake.deleteInstance(A);
    expect(await fake.list()).toEqual([]);
    expect(await rejection(fake.deleteInstance(A))).toBeInstanceOf(InstanceNotFound);
  });
});

describe('state machine', () => {
  beforeEach(async () => {
    await fake.createInstance(spec(A));
  });

  it('start, pause, unpause, softReboot, stop', async () => {
    await fake.start(A);
    expect((await fake.info(A)).state).toBe('running');
    expect(fake.launches(A)).toBe(1);
    await fake.pause(A);
    expect(fake.powerState(A)).toBe('paused');
    await fake.softReboot(A);
    expect(fake.powerState(A)).toBe('paused');
    await fake.unpause(A);
    expect(fake.powerState(A)).toBe('running');
    await fake.softReboot(A);
    expect(fake.powerState(A)).toBe('running');
    expect(fake.launches(A)).toBe(1);
    await fake.stop(A, { graceful: true });
    expect(fake.powerState(A)).toBe('shutoff');
    await fake.start(A);
    expect(fake.launches(A)).toBe(2);
  });

  it('starts a crashed guest', async () => {
    await fake.start(A);
    fake.crash(A);
    expect(fake.powerState(A)).toBe('crashed');
    await fake.start(A);
    expect(fake.powerState(A)).toBe('running');
    expect(fake.launches(A)).toBe(2);
  });

  it('managedSave and resume keep a running guest running', async () => {
    await fake.start(A);
    expect(await fake.managedSave(A)).toEqual({ priorState: 'running', bytes: 256 * 1024 * 1024, vcpusStoppedAt: 1_700_000_000_000 });
    expect(fake.powerState(A)).toBe('saved');
    expect(await fake.resume(A)).toEqual({ state: 'running', vcpusResumedAt: 1_700_000_000_000 });
    expect(fake.powerState(A)).toBe('running');
    expect(fake.launches(A)).toBe(2);
  });

  it('managedSave and resume keep a paused guest paused', async () => {
    await fake.start(A);
    await fake.pause(A);
    // The vCPUs were stopped already and stay stopped: no stop or resume time.
    expect(await fake.managedSave(A)).toEqual({ priorState: 'paused', bytes: 256 * 1024 * 1024 });
    expect(await fake.resume(A)).toEqual({ state: 'paused' });
    expect(fake.powerState(A)).toBe('paused');
    expect(fake.launches(A)).toBe(2);
  });

  it('rejects wrong transitions with InstanceInvalidState naming both states', async () => {
    const cases: Array<[() => Promise<unknown>, string, string]> = [
      [() => fake.stop(A, { graceful: false }), 'shutoff', 'running or paused'],
      [() => fake.pause(A), 'shutoff', 'running'],
      [() => fake.unpause(A), 'shutoff', 'paused'],
      [() => fake.softReboot(A), 'shutoff', 'running or paused'],
      [() => fake.managedSave(A), 'shutoff', 'running or paused'],
      [() => fake.resume(A), 'shutoff', 'saved'],
    ];
    for (const [op, current, expected] of cases) {
      const err = await rejection(op());
      expect(err).toBeInstanceOf(InstanceInvalidState);
      expect((err as Error).message).toContain(`it is ${current}`);
      expect((err as Error).message).toContain(`expected ${expected}`);
    }
    await fake.start(A);
    const again = await rejection(fake.start(A));
    expect(again).toBeInstanceOf(InstanceInvalidState);
    expect((again as Error).message).toMatch(/it is running, expected shutoff or crashed/);
    expect(await rejection(fake.unpause(A))).toBeInstanceOf(InstanceInvalidState);
    await fake.managedSave(A);
    expect(await rejection(fake.start(A))).toBeInstanceOf(InstanceInvalidState);
    expect(await rejection(fake.stop(A, { graceful: true }))).toBeInstanceOf(InstanceInvalidState);
    expect(fake.powerState(A)).toBe('saved');
    expect(fake.launches(A)).toBe(1);
    expect(fake.violations).toEqual([]);
  });
});

describe('guest writes', () => {
  beforeEach(async () => {
    await fake.createInstance(spec(A));
  });

  it('a running guest changes its disk at every public call; shut-off and paused guests do not', async () => {
    const before = fake.diskContent(A);
    await fake.list();
    expect(fake.diskContent(A)).toEqual(before);

    await fake.start(A);
    const c0 = counterOf(fake.diskContent(A));
    await fake.info(A);
    const d1 = fake.diskContent(A);
    await fake.listInternalSnapshots(A);
    const d2 = fake.diskContent(A);
    expect(counterOf(d1)).toBe(c0 + 1n);
    expect(counterOf(d2)).toBe(c0 + 2n);
    expect(d1.subarray(8).equals(d2.subarray(8))).toBe(false);

    await fake.pause(A);
    const paused = fake.diskContent(A);
    await fake.info(A);
    await fake.diskInfo(A);
    expect(fake.diskContent(A)).toEqual(paused);
  });

  it('test helpers do not tick the guest', async () => {
    await fake.start(A);
    const d = fake.diskContent(A);
    fake.launches(A);
    fake.powerState(A);
    fake.snapshotNames(A);
    expect(fake.diskContent(A)).toEqual(d);
  });

  it('guestWrite writes at an offset, only while running', async () => {
    expect(() => fake.guestWrite(A, 4096, Buffer.from('x'))).toThrow(InstanceInvalidState);
    await fake.start(A);
    fake.guestWrite(A, 4096, Buffer.from('hello'));
    expect(fake.diskContent(A).subarray(4096, 4101).toString()).toBe('hello');
    expect(() => fake.guestWrite(A, 64 * 1024 - 2, Buffer.from('abc'))).toThrow(RangeError);
  });

  it('remembers every past state of the active layer', async () => {
    await fake.start(A);
    const old = fake.diskContent(A);
    await fake.info(A);
    const torn = Buffer.from(fake.diskContent(A));
    old.copy(torn, 0, 0, 8); // new data with an old counter: never a real state
    expect(fake.wasDiskState(A, old)).toBe(true);
    expect(fake.wasDiskState(A, fake.diskContent(A))).toBe(true);
    expect(fake.wasDiskState(A, torn)).toBe(false);
  });
});

describe('SPEC §2 safety rule', () => {
  beforeEach(async () => {
    await fake.createInstance(spec(A));
    await fake.start(A);
  });

  for (const state of ['running', 'paused'] as const) {
    it(`offline snapshot create/delete and active-layer export are violations while ${state}`, async () => {
      await fake.managedSave(A);
      await fake.offlineSnapshotCreate(A, 'keep');
      await fake.resume(A);
      if (state === 'paused') await fake.pause(A);

      const attempts = [
        fake.offlineSnapshotCreate(A, 'new'),
        fake.offlineSnapshotDelete(A, 'keep'),
        fake.exportDisk(A, { dest: join(tmp.path, 'active.raw') }),
      ];
      for (const p of attempts) expect(await rejection(p)).toBeInstanceOf(SafetyViolation);
      expect(fake.violations).toHaveLength(3);
      expect(fake.violations[0]).toContain(`offlineSnapshotCreate(${A}, "new") while the instance is ${state}`);
      expect(fake.violations[1]).toContain(`offlineSnapshotDelete(${A}, "keep") while the instance is ${state}`);
      expect(fake.violations[2]).toContain(`exportDisk(${A}) of the active layer while the instance is ${state}`);
      // Nothing happened to the disk.
      expect(fake.snapshotNames(A)).toEqual(['keep']);
      await expect(stat(join(tmp.path, 'active.raw'))).rejects.toThrow(/ENOENT/);
    });
  }

  it('records a violation even when the caller swallows the error', async () => {
    await fake.offlineSnapshotCreate(A, 'x').catch(() => undefined);
    expect(fake.violations).toHaveLength(1);
  });

  it('offline operations are allowed when shut off, saved or crashed', async () => {
    await fake.managedSave(A);
    await fake.offlineSnapshotCreate(A, 's1');
    await fake.resume(A);
    fake.crash(A);
    await fake.offlineSnapshotCreate(A, 's2');
    await fake.offlineSnapshotDelete(A, 's1');
    await fake.exportDisk(A, { dest: join(tmp.path, 'crashed.raw') });
    await fake.start(A);
    await fake.stop(A, { graceful: true });
    await fake.offlineSnapshotDelete(A, 's2');
    expect(fake.snapshotNames(A)).toEqual([]);
    expect(fake.violations).toEqual([]);
  });

  it('live snapshot operations need a process (InstanceInvalidState, not a violation)', async () => {
    await fake.liveSnapshotCreate(A, 'live1');
    await fake.pause(A);
    await fake.liveSnapshotCreate(A, 'live2');
    await fake.liveSnapshotDelete(A, 'live1');
    await fake.managedSave(A);
    expect(await rejection(fake.liveSnapshotCreate(A, 'live3'))).toBeInstanceOf(InstanceInvalidState);
    expect(await rejection(fake.liveSnapshotDelete(A, 'live2'))).toBeInstanceOf(InstanceInvalidState);
    expect(fake.snapshotNames(A)).toEqual(['live2']);
    expect(fake.violations).toEqual([]);
  });

  it('launching while an offline operation holds the disk is a violation', async () => {
    await fake.managedSave(A);
    const del = fake.offlineSnapshotCreate(A, 's');
    const res = fake.resume(A);
    expect(await rejection(res)).toBeInstanceOf(SafetyViolation);
    await del;
    expect(fake.powerState(A)).toBe('saved');
    expect(fake.violations[0]).toMatch(/resume\(.*\) launched a QEMU process while an offline disk operation/);
  });

  it('deleting a snapshot while an export reads it is a violation', async () => {
    await fake.liveSnapshotCreate(A, 's');
    const exp = fake.exportDisk(A, { snapshotName: 's', dest: join(tmp.path, 's.raw') });
    expect(await rejection(fake.liveSnapshotDelete(A, 's'))).toBeInstanceOf(SafetyViolation);
    await exp;
    expect(fake.violations).toHaveLength(1);
    expect(fake.snapshotNames(A)).toEqual(['s']);
  });

  it('missing and duplicate snapshot names are clear errors', async () => {
    await fake.liveSnapshotCreate(A, 'dup');
    const liveDup = await rejection(fake.liveSnapshotCreate(A, 'dup'));
    expect(liveDup).toBeInstanceOf(QmpError);
    expect((liveDup as Error).message).toMatch(/already exists/);
    const liveMissing = await rejection(fake.liveSnapshotDelete(A, 'nope'));
    expect(liveMissing).toBeInstanceOf(QmpError);
    expect((liveMissing as Error).message).toMatch(/'nope' does not exist/);
    const exportMissing = await rejection(fake.exportDisk(A, { snapshotName: 'nope', dest: join(tmp.path, 'x') }));
    expect(exportMissing).toBeInstanceOf(QemuImgError);
    expect((exportMissing as Error).message).toMatch(/'nope'.*not found/);

    await fake.stop(A, { graceful: true });
    const offDup = await rejection(fake.offlineSnapshotCreate(A, 'dup'));
    expect(offDup).toBeInstanceOf(QemuImgError);
    expect((offDup as Error).message).toMatch(/'dup'.*already exists/);
    const offMissing = await rejection(fake.offlineSnapshotDelete(A, 'nope'));
    expect(offMissing).toBeInstanceOf(QemuImgError);
    expect((offMissing as Error).message).toMatch(/'nope'.*not found/);
    expect(() => fake.snapshotContent(A, 'nope')).toThrow(/no internal snapshot "nope"/);
    expect(fake.violations).toEqual([]);
  });
});

describe('internal snapshots and export', () => {
  beforeEach(async () => {
    await fake.createInstance(spec(A));
  });

  it('a snapshot freezes the disk at one moment while the running guest keeps writing', async () => {
    await fake.start(A);
    const c0 = counterOf(fake.diskContent(A));
    await fake.liveSnapshotCreate(A, 'snap'); // the guest writes at the start of this call, then the snapshot is taken
    const snap = fake.snapshotContent(A, 'snap');
    expect(counterOf(snap)).toBe(c0 + 1n);
    expect(fake.wasDiskState(A, snap)).toBe(true);

    const dest = join(tmp.path, 'snap.raw');
    const progress: number[] = [];
    await fake.exportDisk(A, { snapshotName: 'snap', dest, onProgress: (f) => progress.push(f) });
    expect(await readFile(dest)).toEqual(snap);
    expect(progress.at(-1)).toBe(1);
    expect(counterOf(fake.diskContent(A))).toBeGreaterThan(c0 + 1n);
    expect(await fake.listInternalSnapshots(A)).toEqual([{ id: '1', name: 'snap', vmStateSize: 0, dateSec: 1_700_000_000 }]);
    expect(await fake.diskInfo(A)).toMatchObject({ virtualSize: 64 * 1024, actualSize: 128 * 1024 });
  });

  it('exports the offline active layer of a saved guest as of the save', async () => {
    await fake.start(A);
    await fake.info(A);
    await fake.managedSave(A); // the last guest write happens at the start of this call
    const atSave = fake.diskContent(A);
    const dest = join(tmp.path, 'cold.raw');
    await fake.exportDisk(A, { dest });
    const exported = await readFile(dest);
    expect(exported).toEqual(atSave);
    expect(fake.wasDiskState(A, exported)).toBe(true);
    await fake.resume(A);
    await fake.info(A);
    expect(fake.diskContent(A)).not.toEqual(exported);
  });

  it('snapshot ids follow qcow2: one more than the highest in use', async () => {
    await fake.offlineSnapshotCreate(A, 'a');
    await fake.offlineSnapshotCreate(A, 'b');
    await fake.offlineSnapshotDelete(A, 'a');
    await fake.offlineSnapshotCreate(A, 'c');
    expect((await fake.listInternalSnapshots(A)).map((s) => [s.id, s.name])).toEqual([
      ['2', 'b'],
      ['3', 'c'],
    ]);
  });
});

describe('launch hooks', () => {
  beforeEach(async () => {
    await fake.createInstance(spec(A));
  });

  it('beforeLaunch of start runs while no process holds the disk', async () => {
    await fake.offlineSnapshotCreate(A, 'pending');
    const seen: string[] = [];
    await fake.start(A, {
      beforeLaunch: async (uuid) => {
        seen.push(`${uuid}:${fake.powerState(uuid)}:${fake.launches(uuid)}`);
        await fake.offlineSnapshotDelete(uuid, 'pending');
      },
    });
    expect(seen).toEqual([`${A}:shutoff:0`]);
    expect(fake.snapshotNames(A)).toEqual([]);
    expect(fake.powerState(A)).toBe('running');
    expect(fake.violations).toEqual([]);
  });

  it('beforeLaunch of resume runs while no process holds the disk', async () => {
    await fake.start(A);
    await fake.pause(A);
    await fake.managedSave(A);
    await fake.offlineSnapshotCreate(A, 'pending');
    let stateInHook = '';
    expect(
      await fake.resume(A, {
        beforeLaunch: async (uuid) => {
          stateInHook = fake.powerState(uuid);
          await fake.offlineSnapshotDelete(uuid, 'pending');
        },
      }),
    ).toEqual({ state: 'paused' });
    expect(stateInHook).toBe('saved');
    expect(fake.snapshotNames(A)).toEqual([]);
    expect(fake.violations).toEqual([]);
  });

  it('a failing hook launches nothing', async () => {
    const err = await rejection(fake.start(A, { beforeLaunch: () => Promise.reject(new Error('hook failed')) }));
    expect((err as Error).message).toBe('hook failed');
    expect(fake.powerState(A)).toBe('shutoff');
    expect(fake.launches(A)).toBe(0);
  });

  it('softReboot runs no hook and launches nothing', async () => {
    await fake.start(A);
    let called = false;
    await fake.softReboot(A);
    await fake.start(A, { beforeLaunch: async () => void (called = true) }).catch(() => undefined);
    expect(called).toBe(false); // start of a running guest is refused before the hook
    expect(fake.launches(A)).toBe(1);
  });
});

describe('fault injection', () => {
  beforeEach(async () => {
    await fake.createInstance(spec(A));
    await fake.createInstance(spec(B));
  });

  it('logs every public call with op, uuid and args', async () => {
    fake.calls.length = 0;
    await fake.start(A);
    await fake.list();
    await fake.offlineSnapshotCreate(B, 'n');
    expect(fake.calls.map((c) => [c.op, c.uuid])).toEqual([
      ['start', A],
      ['list', undefined],
      ['offlineSnapshotCreate', B],
    ]);
    expect(fake.calls[2]?.args).toEqual([B, 'n']);
  });

  it("'before' throws InjectedFault without effect, and is one-shot", async () => {
    fake.injectFault({ op: 'start' });
    const err = await rejection(fake.start(A));
    expect(err).toBeInstanceOf(InjectedFault);
    expect((err as Error).message).toMatch(/start call #1/);
    expect(fake.powerState(A)).toBe('shutoff');
    expect(fake.launches(A)).toBe(0);
    expect(fake.pendingFaults()).toEqual([]);
    await fake.start(A);
    expect(fake.powerState(A)).toBe('running');
  });

  it("'before' on start does not run the hook", async () => {
    fake.injectFault({ op: 'start', when: 'before' });
    let called = false;
    await rejection(fake.start(A, { beforeLaunch: async () => void (called = true) }));
    expect(called).toBe(false);
  });

  it("'after' lets the operation take effect, then throws", async () => {
    await fake.start(A);
    fake.injectFault({ op: 'managedSave', when: 'after' });
    expect(await rejection(fake.managedSave(A))).toBeInstanceOf(InjectedFault);
    expect(fake.powerState(A)).toBe('saved');

    fake.injectFault({ op: 'offlineSnapshotCreate', when: 'after' });
    expect(await rejection(fake.offlineSnapshotCreate(A, 's'))).toBeInstanceOf(InjectedFault);
    expect(fake.snapshotNames(A)).toEqual(['s']);

    const dest = join(tmp.path, 'after.raw');
    fake.injectFault({ op: 'exportDisk', when: 'after' });
    expect(await rejection(fake.exportDisk(A, { dest }))).toBeInstanceOf(InjectedFault);
    expect(await readFile(dest)).toEqual(fake.diskContent(A));
  });

  it('nth counts calls of that op since the fake was created, across instances or for one uuid', async () => {
    await fake.info(A);
    fake.injectFault({ op: 'info', nth: 3 });
    await fake.list();
    await fake.info(B);
    const err1 = await rejection(fake.info(A));
    expect((err1 as Error).message).toBe('injected fault: info call #3 (before)');
    await fake.info(A);
    expect(fake.callCount('info')).toBe(4);
    expect(fake.callCount('info', B)).toBe(1);

    fake.injectFault({ op: 'info', nth: 3, uuid: B });
    await fake.info(B);
    await fake.info(A);
    await fake.info(A);
    const err2 = await rejection(fake.info(B));
    expect((err2 as Error).message).toBe(`injected fault: info call #3 on ${B} (before)`);
    await fake.info(B);
  });

  it('without nth the next matching call fails; an nth already passed is refused', async () => {
    await fake.info(A);
    await fake.info(A);
    fake.injectFault({ op: 'info', uuid: A });
    expect(fake.pendingFaults()).toEqual([{ op: 'info', uuid: A, nth: 3 }]);
    await fake.info(B);
    expect(await rejection(fake.info(A))).toBeInstanceOf(InjectedFault);
    expect(() => fake.injectFault({ op: 'info', nth: 2 })).toThrow(/would never fire/);
    expect(() => fake.injectFault({ op: 'info', nth: 0 })).toThrow(RangeError);
  });

  it('a failed call still counts, and the faulted call is logged', async () => {
    fake.injectFault({ op: 'pause', nth: 2 });
    await rejection(fake.pause(A)); // shut off: InstanceInvalidState, but call #1 all the same
    expect(await rejection(fake.pause(A))).toBeInstanceOf(InjectedFault);
    expect(fake.calls.filter((c) => c.op === 'pause')).toHaveLength(2);
  });

  it('uses a given error, and clearFaults disarms everything', async () => {
    const custom = new Error('disk on fire');
    fake.injectFault({ op: 'pause', error: custom });
    await fake.start(A);
    expect(await rejection(fake.pause(A))).toBe(custom);

    fake.injectFault({ op: 'stop' });
    fake.injectFault({ op: 'unpause', nth: 5 });
    expect(fake.pendingFaults()).toHaveLength(2);
    fake.clearFaults();
    expect(fake.pendingFaults()).toEqual([]);
    await fake.stop(A, { graceful: false });
  });

  it('a recorded clean run can be replayed with a fault at each call in turn', async () => {
    // A toy "cold" strategy: suspend, export, resume.
    const cold = async (h: FakeHypervisor, uuid: string, dest: string) => {
      const save = await h.managedSave(uuid);
      try {
        await h.exportDisk(uuid, { dest });
      } finally {
        await h.resume(uuid);
      }
      return save.priorState;
    };
    const run = async (inject?: (h: FakeHypervisor) => void) => {
      const h = new FakeHypervisor();
      await h.createInstance(spec(A));
      await h.start(A);
      inject?.(h);
      const mark = h.calls.length;
      const outcome = await cold(h, A, join(tmp.path, `x-${Math.random()}.raw`)).then(
        () => 'ok',
        (err: unknown) => (err as Error).name,
      );
      return { h, outcome, ops: h.calls.slice(mark).map((c) => c.op) };
    };
    const clean = await run();
    expect(clean.outcome).toBe('ok');
    expect(clean.ops).toEqual(['managedSave', 'exportDisk', 'resume']);
    for (const op of clean.ops) {
      const faulty = await run((h) => h.injectFault({ op, nth: h.callCount(op) + 1 }));
      expect(faulty.outcome).toBe('InjectedFault');
      expect(faulty.h.violations).toEqual([]);
      // The guest survives a failed export; a failed save or resume leaves it where the fake put it.
      if (op === 'exportDisk') expect(faulty.h.powerState(A)).toBe('running');
    }
  });
});

describe('live backup jobs', () => {
  beforeEach(async () => {
    await fake.createInstance(spec(A));
    await fake.start(A);
  });

  it('copies the disk as of the job start while the running guest keeps writing', async () => {
    const dest = join(tmp.path, 'live.raw');
    const job = await fake.startLiveBackup(A, dest); // the guest writes at the start of this call, then the job starts
    const atStart = fake.diskContent(A);
    expect(job.startedAt).toBe(1_700_000_000_000);
    expect(job.startPauseMs).toBe(0);
    // The target exists at once, the disk's size, still empty (sparse).
    expect((await stat(dest)).size).toBe(64 * 1024);
    expect((await readFile(dest)).equals(Buffer.alloc(64 * 1024))).toBe(true);

    const progress: number[] = [];
    await job.wait((f) => progress.push(f));
    const image = await readFile(dest);
    expect(image.equals(atStart)).toBe(true);
    expect(fake.liveBackups(A)).toEqual([
      { uuid: A, dest, startedAt: 1_700_000_000_000, pointInTime: atStart, status: 'completed' },
    ]);
    // The guest wrote during the copy, yet the image is the disk as of the start.
    expect(counterOf(fake.diskContent(A))).toBeGreaterThan(counterOf(atStart) + 1n);
    expect(progress.at(-1)).toBe(1);
    expect([...progress].sort((a, b) => a - b)).toEqual(progress);
    expect(fake.calls.map((c) => c.op).slice(-2)).toEqual(['startLiveBackup', 'backupWait']);
    // A second wait and a late cancel are harmless.
    await job.wait();
    await job.cancel();
    expect((await readFile(dest)).equals(atStart)).toBe(true);
    expect(fake.snapshotNames(A)).toEqual([]);
    expect(fake.violations).toEqual([]);
  });

  it('works on a paused guest, and reports the configured startPauseMs', async () => {
    const slow = new FakeHypervisor({ now: () => 5, backupStartPauseMs: 3 });
    await slow.createInstance(spec(A));
    await slow.start(A);
    await slow.pause(A);
    const before = slow.diskContent(A);
    const job = await slow.startLiveBackup(A, join(tmp.path, 'p.raw'));
    expect([job.startedAt, job.startPauseMs]).toEqual([5, 3]);
    await job.wait();
    expect((await readFile(join(tmp.path, 'p.raw'))).equals(before)).toBe(true);
    expect(slow.powerState(A)).toBe('paused');
  });

  it('needs a QEMU process: InstanceInvalidState when shut off or saved, not a violation', async () => {
    await fake.managedSave(A);
    expect(await rejection(fake.startLiveBackup(A, join(tmp.path, 's.raw')))).toBeInstanceOf(InstanceInvalidState);
    await fake.resume(A);
    await fake.stop(A, { graceful: false });
    expect(await rejection(fake.startLiveBackup(A, join(tmp.path, 'o.raw')))).toBeInstanceOf(InstanceInvalidState);
    await expect(stat(join(tmp.path, 'o.raw'))).rejects.toThrow(/ENOENT/);
    expect(fake.liveBackups(A)).toEqual([]);
    expect(fake.violations).toEqual([]);
  });

  it('cancel before wait: wait then rejects and nothing is copied', async () => {
    const dest = join(tmp.path, 'c.raw');
    const job = await fake.startLiveBackup(A, dest);
    await job.cancel();
    await job.cancel();
    expect(await rejection(job.wait())).toBeInstanceOf(QmpError);
    expect(fake.liveBackups(A)[0]?.status).toBe('cancelled');
    expect((await readFile(dest)).equals(Buffer.alloc(64 * 1024))).toBe(true);
  });

  it('cancel during wait stops the copy; wait rejects', async () => {
    const job = await fake.startLiveBackup(A, join(tmp.path, 'd.raw'));
    const waiting = rejection(job.wait());
    await job.cancel();
    const err = await waiting;
    expect(err).toBeInstanceOf(QmpError);
    expect((err as Error).message).toMatch(/cancelled/);
  });

  it('a removed target is not brought back (QEMU holds it open)', async () => {
    const dest = join(tmp.path, 'gone.raw');
    const job = await fake.startLiveBackup(A, dest);
    await rm(dest);
    expect(await rejection(job.wait())).toMatchObject({ code: 'ENOENT' });
    await expect(stat(dest)).rejects.toThrow(/ENOENT/);
    expect(fake.liveBackups(A)[0]?.status).toBe('failed');
  });

  it('the job dies with its QEMU process', async () => {
    const job = await fake.startLiveBackup(A, join(tmp.path, 'x.raw'));
    await fake.managedSave(A);
    await fake.resume(A); // a new process: the job was in the old one
    const err = await rejection(job.wait());
    expect((err as Error).message).toMatch(/QEMU process running the backup job .* is gone/);
  });

  it('start, wait and cancel take injected faults', async () => {
    const dest = join(tmp.path, 'f.raw');
    fake.injectFault({ op: 'startLiveBackup' });
    expect(await rejection(fake.startLiveBackup(A, dest))).toBeInstanceOf(InjectedFault);
    await expect(stat(dest)).rejects.toThrow(/ENOENT/);
    fake.injectFault({ op: 'startLiveBackup', when: 'after' });
    expect(await rejection(fake.startLiveBackup(A, dest))).toBeInstanceOf(InjectedFault);
    expect(fake.liveBackups(A).map((b) => b.status)).toEqual(['running']); // started, its handle lost

    const job = await fake.startLiveBackup(A, join(tmp.path, 'g.raw'));
    fake.injectFault({ op: 'backupWait' });
    expect(await rejection(job.wait())).toBeInstanceOf(InjectedFault);
    expect(fake.liveBackups(A)[1]?.status).toBe('running');
    fake.injectFault({ op: 'backupWait', when: 'after' });
    expect(await rejection(job.wait())).toBeInstanceOf(InjectedFault);
    expect(fake.liveBackups(A)[1]?.status).toBe('completed');

    const other = await fake.startLiveBackup(A, join(tmp.path, 'h.raw'));
    fake.injectFault({ op: 'backupCancel', when: 'after' });
    expect(await rejection(other.cancel())).toBeInstanceOf(InjectedFault);
    expect(fake.liveBackups(A)[2]?.status).toBe('cancelled');
  });

  it('holdCall holds a call back until released, counted like faults', async () => {
    let release!: () => void;
    fake.holdCall({ op: 'info', nth: fake.callCount('info') + 2, until: new Promise<void>((r) => (release = r)) });
    await fake.info(A);
    const order: string[] = [];
    const held = fake.info(A).then(() => order.push('held'));
    await fake.list().then(() => order.push('list'));
    expect(order).toEqual(['list']);
    release();
    await held;
    expect(order).toEqual(['list', 'held']);
    expect(fake.pendingFaults()).toEqual([]);
  });
});

describe('guest agent', () => {
  beforeEach(async () => {
    await fake.createInstance(spec(A));
    await fake.start(A);
  });

  it('none by default: not available, and freeze fails', async () => {
    expect(await fake.guestAgentAvailable(A, 1000)).toBe(false);
    expect(await rejection(fake.freezeFilesystems(A, 1000))).toBeInstanceOf(GuestAgentError);
    expect(fake.frozen(A)).toBe(false);
  });

  it('freeze stops the guest writing; thaw resumes it; thaw when thawed answers 0', async () => {
    fake.setGuestAgent(A, { present: true });
    expect(await fake.guestAgentAvailable(A, 1000)).toBe(true);
    expect(await fake.freezeFilesystems(A, 1000)).toBe(2);
    expect(fake.frozen(A)).toBe(true);
    const frozenDisk = fake.diskContent(A);
    await fake.info(A);
    await fake.list();
    expect(fake.diskContent(A)).toEqual(frozenDisk);
    expect(await rejection(fake.freezeFilesystems(A, 1000))).toBeInstanceOf(GuestAgentError); // frozen already
    expect(await fake.thawFilesystems(A, 1000)).toBe(2);
    expect(fake.frozen(A)).toBe(false);
    expect(await fake.thawFilesystems(A, 1000)).toBe(0);
    await fake.info(A);
    expect(fake.diskContent(A)).not.toEqual(frozenDisk);
  });

  it('stopping a frozen guest is a violation and does not happen; a managed save keeps the freeze through the resume', async () => {
    fake.setGuestAgent(A, { present: true });
    await fake.freezeFilesystems(A, 1000);
    expect(await rejection(fake.stop(A, { graceful: true }))).toBeInstanceOf(SafetyViolation);
    expect(fake.powerState(A)).toBe('running');
    expect(fake.violations).toHaveLength(1);
    expect(fake.violations[0]).toMatch(/stop\(.*\) while the guest's filesystems are frozen/);
    // SPEC §3 freezes right before the save: the freeze is in the guest's RAM, saved and restored.
    await fake.managedSave(A);
    expect(fake.frozen(A)).toBe(true);
    expect(await rejection(fake.thawFilesystems(A, 1000))).toBeInstanceOf(InstanceInvalidState);
    await fake.resume(A);
    expect(fake.frozen(A)).toBe(true);
    expect(await fake.thawFilesystems(A, 1000)).toBe(2);
    await fake.stop(A, { graceful: true });
    expect(fake.violations).toHaveLength(1);
  });

  it('only a running guest with a process answers; a crash ends the freeze', async () => {
    fake.setGuestAgent(A, { present: true });
    await fake.pause(A);
    expect(await fake.guestAgentAvailable(A, 5)).toBe(false); // a paused guest cannot answer
    expect(await rejection(fake.freezeFilesystems(A, 5))).toBeInstanceOf(GuestAgentError);
    await fake.unpause(A);
    await fake.freezeFilesystems(A, 1000);
    fake.crash(A);
    expect(fake.frozen(A)).toBe(false);
    expect(await fake.guestAgentAvailable(A, 1000)).toBe(false);
    expect(await rejection(fake.thawFilesystems(A, 1000))).toBeInstanceOf(InstanceInvalidState);
  });

  it('freezeFails and thawFails (always, or n times)', async () => {
    fake.setGuestAgent(A, { present: true, freezeFails: true });
    expect(await rejection(fake.freezeFilesystems(A, 1000))).toBeInstanceOf(GuestAgentError);
    expect(fake.frozen(A)).toBe(false);

    fake.setGuestAgent(A, { present: true, thawFails: 1 });
    await fake.freezeFilesystems(A, 1000);
    expect(await rejection(fake.thawFilesystems(A, 1000))).toBeInstanceOf(GuestAgentError);
    expect(fake.frozen(A)).toBe(true);
    expect(await fake.thawFilesystems(A, 1000)).toBe(2);

    fake.setGuestAgent(A, { present: true, thawFails: true });
    await fake.freezeFilesystems(A, 1000);
    for (let i = 0; i < 3; i++) expect(await rejection(fake.thawFilesystems(A, 1000))).toBeInstanceOf(GuestAgentError);
    expect(fake.frozen(A)).toBe(true);
  });

  it('hangs: no answer within the timeout', async () => {
    fake.setGuestAgent(A, { present: true, hangs: true });
    expect(await fake.guestAgentAvailable(A, 5)).toBe(false);
    expect((await rejection(fake.freezeFilesystems(A, 5)) as Error).message).toMatch(/no answer within 5 ms/);
    expect(fake.frozen(A)).toBe(false);

    fake.setGuestAgent(A, { present: true, hangs: 'freeze' });
    expect(await fake.guestAgentAvailable(A, 5)).toBe(true);
    expect(await rejection(fake.freezeFilesystems(A, 5))).toBeInstanceOf(GuestAgentError);
    expect(fake.frozen(A)).toBe(true); // the freeze happened; only its answer was lost
    await fake.thawFilesystems(A, 5);

    fake.setGuestAgent(A, { present: true, hangs: 'thaw' });
    await fake.freezeFilesystems(A, 5);
    expect(await rejection(fake.thawFilesystems(A, 5))).toBeInstanceOf(GuestAgentError);
    expect(fake.frozen(A)).toBe(true);
  });
});

describe('a cont that fails, a save that fails half-way, a foreign lock on the disk', () => {
  beforeEach(async () => {
    await fake.createInstance(spec(A));
    await fake.start(A);
  });

  it("a fault on cont fails a running guest's resume after its state is loaded: left paused, the state gone", async () => {
    await fake.managedSave(A);
    fake.injectFault({ op: 'cont', uuid: A });
    expect(await rejection(fake.resume(A))).toBeInstanceOf(InjectedFault);
    expect(fake.powerState(A)).toBe('paused');
    expect(fake.launches(A)).toBe(2);
    // The state was loaded: there is no saved state to resume any more.
    expect(await rejection(fake.resume(A))).toBeInstanceOf(InstanceInvalidState);
    await fake.unpause(A);
    expect(fake.powerState(A)).toBe('running');
    expect(fake.callCount('cont', A)).toBe(2);
  });

  it('a paused guest resumes with no cont, so a cont fault does not touch it', async () => {
    await fake.pause(A);
    await fake.managedSave(A);
    fake.injectFault({ op: 'cont', uuid: A });
    expect(await fake.resume(A)).toEqual({ state: 'paused' });
    expect(fake.callCount('cont', A)).toBe(0);
    expect(fake.pendingFaults()).toHaveLength(1);
  });

  it('a save that fails half-way is undone: a running guest runs again, no saved state', async () => {
    fake.injectFault({ op: 'saveMigration', uuid: A });
    expect(await rejection(fake.managedSave(A))).toBeInstanceOf(InjectedFault);
    expect(fake.powerState(A)).toBe('running');
    expect(fake.callCount('cont', A)).toBe(1);
    expect(await rejection(fake.resume(A))).toBeInstanceOf(InstanceInvalidState);
    // A paused guest is left paused, with no cont.
    await fake.pause(A);
    fake.injectFault({ op: 'saveMigration', uuid: A });
    expect(await rejection(fake.managedSave(A))).toBeInstanceOf(InjectedFault);
    expect(fake.powerState(A)).toBe('paused');
    expect(fake.callCount('cont', A)).toBe(1);
  });

  it("a save that fails half-way whose undo's cont fails too leaves the guest paused, throwing the save's error", async () => {
    const saveError = new Error('migration failed: Broken pipe');
    fake.injectFault({ op: 'saveMigration', uuid: A, error: saveError });
    fake.injectFault({ op: 'cont', uuid: A });
    expect(await rejection(fake.managedSave(A))).toBe(saveError);
    expect(fake.powerState(A)).toBe('paused');
    await fake.unpause(A);
    expect(fake.powerState(A)).toBe('running');
  });

  it('a foreign write lock: cannot be taken while the QEMU holds the disk; a resume loads, its cont fails until the lock goes', async () => {
    expect(() => fake.holdDiskLock(A)).toThrow(/Failed to get "write" lock/);
    await fake.liveSnapshotCreate(A, 's1');
    await fake.managedSave(A);
    fake.holdDiskLock(A);
    // Nothing may open the disk meanwhile.
    expect(await rejection(fake.offlineSnapshotDelete(A, 's1'))).toBeInstanceOf(QemuImgError);
    const err = await rejection(fake.resume(A));
    expect(err).toBeInstanceOf(QmpError);
    expect((err as QmpError).message).toBe('QMP cont failed: GenericError: Failed to get "write" lock');
    expect(fake.powerState(A)).toBe('paused');
    // The disk is inactive: no internal snapshot through the monitor; unpause (cont) fails as long as the lock is held.
    expect(await rejection(fake.liveSnapshotDelete(A, 's1'))).toBeInstanceOf(QmpError);
    expect(await rejection(fake.unpause(A))).toBeInstanceOf(QmpError);
    expect(fake.powerState(A)).toBe('paused');
    fake.releaseDiskLock(A);
    await fake.unpause(A);
    expect(fake.powerState(A)).toBe('running');
    await fake.liveSnapshotDelete(A, 's1');
    expect(fake.snapshotNames(A)).toEqual([]);
    expect(() => fake.holdDiskLock(A)).toThrow(/write/);
    expect(fake.violations).toEqual([]);
  });

  it('a foreign write lock fails a start', async () => {
    await fake.stop(A, { graceful: false });
    fake.holdDiskLock(A);
    expect(String(await rejection(fake.start(A)))).toMatch(/Failed to get "write" lock/);
    expect(fake.powerState(A)).toBe('shutoff');
    fake.releaseDiskLock(A);
    await fake.start(A);
    expect(fake.powerState(A)).toBe('running');
  });
});
