import fs from 'node:fs/promises';
import path from 'node:path';
import { dir } from 'tmp-promise';
import { Lifecycle } from '../../src/compute/lifecycle.js';
import type { StrategyName } from '../../src/config/schema.js';
import { FakeHypervisor } from '../../src/hypervisor/fake/fake-hypervisor.js';
import type { PowerState } from '../../src/hypervisor/types.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { silentLogger } from '../../src/log.js';
import { SnapshotEngine } from '../../src/snapshot/engine.js';
import { PendingSnapshots } from '../../src/snapshot/pending.js';
import type { BeforeStep } from '../../src/snapshot/run-steps.js';

export const PREFIX = 'snapdrv-';

/** A fake hypervisor, a real image store in a temp dir, and the engine wired over them. */
export async function makeFakeEnv(opts: { beforeStep?: BeforeStep; strategy?: StrategyName } = {}) {
  const tmp = await dir({ unsafeCleanup: true });
  const log = silentLogger();
  const hv = new FakeHypervisor();
  const store = new ImageStore({ path: path.join(tmp.path, 'images'), reservedSpaceMb: 0, osHashAlgo: 'sha512' });
  const pending = new PendingSnapshots(path.join(tmp.path, 'state', 'pending'));
  const lifecycle = new Lifecycle(hv, pending, log);
  let beforeStep: BeforeStep | undefined = opts.beforeStep;
  const engine = new SnapshotEngine({
    hv,
    store,
    lifecycle,
    log,
    namePrefix: PREFIX,
    defaultStrategy: opts.strategy ?? 'suspend-create-resume-extract',
    beforeStep: (step, i) => beforeStep?.(step, i),
  });
  return {
    tmp: tmp.path,
    hv,
    store,
    pending,
    lifecycle,
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

/** Creates a guest and brings it to the given power state. */
export async function guestIn(env: FakeEnv, state: Extract<PowerState, 'running' | 'paused' | 'shutoff' | 'saved'>, uuid: string) {
  await env.hv.createInstance({ uuid, name: `guest-${state}`, memoryMb: 128, vcpus: 1, machine: 'pc', diskSizeBytes: 64 * 1024 });
  if (state === 'shutoff') return;
  await env.hv.start(uuid);
  if (state === 'paused') await env.hv.pause(uuid);
  if (state === 'saved') await env.hv.managedSave(uuid);
}
