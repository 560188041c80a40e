import fs from 'node:fs/promises';
import path from 'node:path';
import { existsSync } from 'node:fs';
import { dir } from 'tmp-promise';
import { expect } from 'vitest';
import { Lifecycle } from '../../src/snapshot/lifecycle.js';
import type { StrategyName } from '../../src/config/schema.js';
import { SnapshotFailed } from '../../src/errors.js';
import { FakeHypervisor, type FakeGuestAgent, type FakeHypervisorOptions } from '../../src/hypervisor/fake/fake-hypervisor.js';
import type { PowerState } from '../../src/hypervisor/types.js';
import { ImageStore, type StoreHook } from '../../src/image-store/image-store.js';
import { silentLogger, type Logger } from '../../src/log.js';
import { SnapshotEngine } from '../../src/snapshot/engine.js';
import type { GuestWaits } from '../../src/util/guest-waits.js';
import { DEFAULT_QUIESCE, type QuiesceOptions } from '../../src/snapshot/guest-freeze.js';
import { OperationJournal } from '../../src/snapshot/operation-journal.js';
import { PendingSnapshots } from '../../src/snapshot/pending.js';
import type { RecoveryDeps } from '../../src/snapshot/recovery.js';
import type { BeforeStep } from '../../src/snapshot/run-steps.js';
import { SNAPSHOTS_LEFT_MAX } from '../../src/snapshot/strategies.js';

const SHM = existsSync('/dev/shm') ? '/dev/shm' : undefined;

export const PREFIX = 'snapdrv-';

export interface FakeEnvOptions {
  beforeStep?: BeforeStep;
  strategy?: StrategyName;
  /** Overrides of DEFAULT_QUIESCE. */
  quiesce?: Partial<QuiesceOptions>;
  /** Options of the fake hypervisor (its clock, a backup job's startPauseMs). */
  hv?: FakeHypervisorOptions;
  /** Default: silent. */
  log?: Logger;
  /** The image store's test hook. */
  storeHook?: StoreHook;
  /** The host's guests waiting on their snapshots (none: exports never hold back). */
  guestWaits?: GuestWaits;
}

/** A fake hypervisor, a real image store in a temp dir, and the engine wired over them. */
export async function makeFakeEnv(opts: FakeEnvOptions = {}) {
  // In memory where the host has it: these matrices make thousands of small fsynced files, which
  // the real disk's durability adds nothing to (the integration tests and the store's and journal's
  // own unit tests cover that) but minutes.
  const tmp = await dir({ unsafeCleanup: true, ...(SHM !== undefined && { tmpdir: SHM }) });
  const log = opts.log ?? silentLogger();
  const hv = new FakeHypervisor(opts.hv);
  // One process: the store's cross-process image lock (a flock program per change) is left out here;
  // test/unit/store-lock.test.ts and the integration tests run it.
  const store = new ImageStore({ path: path.join(tmp.path, 'images'), reservedSpaceMb: 0, osHashAlgo: 'sha512', lockAcrossProcesses: false, hook: opts.storeHook });
  const pending = new PendingSnapshots(path.join(tmp.path, 'state', 'pending'));
  const lifecycle = new Lifecycle(hv, pending, log);
  const operations = new OperationJournal(path.join(tmp.path, 'state', 'operations'), log);
  let beforeStep: BeforeStep | undefined = opts.beforeStep;
  const engine = new SnapshotEngine({
    hv,
    store,
    lifecycle,
    operations,
    log,
    namePrefix: PREFIX,
    defaultStrategy: opts.strategy ?? 'suspend-create-resume-extract',
    quiesce: { ...DEFAULT_QUIESCE, ...opts.quiesce },
    beforeStep: (step, i) => beforeStep?.(step, i),
    guestWaits: opts.guestWaits,
  });
  return {
    tmp: tmp.path,
    hv,
    store,
    pending,
    lifecycle,
    operations,
    engine,
    /** Set to inject a failure (throw) before a step. */
    set beforeStep(fn: BeforeStep | undefined) {
      beforeStep = fn;
    },
    cleanup: () => tmp.cleanup(),
    /** Our internal snapshots on the guest's disk. */
    async ownSnapshots(uuid: string): Promise<string[]> {
      return (await hv.listInternalSnapshots(uuid)).map((s) => s.name).filter((n) => n.startsWith(PREFIX));
    },
    async partialFiles(): Promise<string[]> {
      return fs.readdir(path.join(tmp.path, 'images', '.partial')).catch(() => []);
    },
  };
}

export type FakeEnv = Awaited<ReturnType<typeof makeFakeEnv>>;

/** Recovery's dependencies on a fake environment (its hypervisor, store, journal), with `over` on top. */
export function fakeRecoveryDeps(
  e: FakeEnv,
  base: Pick<RecoveryDeps, 'strategy' | 'agentTimeoutMs'> & Partial<RecoveryDeps>,
): RecoveryDeps {
  return { hv: e.hv, store: e.store, lifecycle: e.lifecycle, pending: e.pending, operations: e.operations, log: silentLogger(), namePrefix: PREFIX, ...base };
}

/** Creates a guest (with a guest agent unless told otherwise) and brings it to the given power state. */
export async function guestIn(
  env: FakeEnv,
  state: Extract<PowerState, 'running' | 'paused' | 'shutoff' | 'saved'>,
  uuid: string,
  agent: FakeGuestAgent = { present: true },
  diskSizeBytes = 64 * 1024,
) {
  await env.hv.createInstance({ uuid, name: `guest-${state}`, memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes });
  env.hv.setGuestAgent(uuid, agent);
  if (state === 'shutoff') return;
  await env.hv.start(uuid);
  if (state === 'paused') await env.hv.pause(uuid);
  if (state === 'saved') await env.hv.managedSave(uuid);
}

/** Snapshots left allowed after the operation, given the guest's state. */
export function allowedLeft(strategy: StrategyName, state: string): number {
  return state === 'running' || state === 'paused' ? SNAPSHOTS_LEFT_MAX[strategy] : 0;
}

/**
 * Runs one snapshot that should fail (an injected failure) and checks every invariant afterwards:
 * prior state kept, no violation, filesystems thawed, no image data, no partial file, no more
 * internal snapshots than allowed. With `mayComplete` the snapshot may also succeed, unquiesced.
 * Returns the error (undefined if it completed).
 */
export async function expectSafeFailure(
  e: FakeEnv,
  uuid: string,
  state: string,
  strategy: StrategyName,
  imageId: string,
  opts: { mayComplete?: boolean } = {},
): Promise<unknown> {
  const outcome = await e.engine.take({ requestId: 'r', instanceUuid: uuid, imageId }).then(
    (result) => ({ result, err: undefined }),
    (err: unknown) => ({ result: undefined, err }),
  );
  expect((await e.hv.info(uuid)).state).toBe(state);
  expect(e.hv.violations).toEqual([]);
  expect(e.hv.frozen(uuid)).toBe(false);
  expect(await e.partialFiles()).toEqual([]);
  expect((await e.ownSnapshots(uuid)).length).toBeLessThanOrEqual(allowedLeft(strategy, state));
  expect(await e.operations.list()).toEqual([]); // a handled failure leaves nothing to recover
  if (outcome.result !== undefined && opts.mayComplete) {
    expect(outcome.result.quiesced).toBe(false);
    expect((await e.store.verify(imageId)).ok).toBe(true);
    return undefined;
  }
  expect(outcome.err).toBeInstanceOf(Error);
  // A failure before the image record was made leaves no record; after, the record is killed.
  const image = await e.store.show(imageId).catch(() => undefined);
  if (image) {
    expect(outcome.err).toBeInstanceOf(SnapshotFailed);
    expect(image.status).toBe('killed');
  }
  await expect(fs.stat(path.join(e.tmp, 'images', imageId))).rejects.toThrow();
  return outcome.err;
}

/** The SnapshotFailed that `p` rejects with (the test fails if it resolves or rejects otherwise). */
export async function snapshotFailure(p: Promise<unknown>): Promise<SnapshotFailed> {
  const err = await p.then(
    () => undefined,
    (x: unknown) => x,
  );
  expect(err).toBeInstanceOf(SnapshotFailed);
  return err as SnapshotFailed;
}
