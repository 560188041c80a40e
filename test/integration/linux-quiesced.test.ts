/**
 * Issue 9 on the real Linux guest, quiesce = required: for every strategy, on a running guest whose
 * writer appends fsynced, checksummed records, the exported image is an ext4 that mounts without a
 * journal replay, its records are intact up to one the guest had fsynced before the point in time,
 * it boots and its writer goes on from there; the downtime reported is the pause the guest's own
 * probe saw; the guest keeps running and writing.
 */
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { STRATEGIES } from '../../src/config/schema.js';
import { checkGuestImage } from '../../src/guest-check/ext4.js';
import { observeRunningGuest } from '../../src/guest-check/observe.js';
import { createLinuxGuest, makeLinuxBench, writerPasses, type LinuxBench, type LinuxGuest } from '../helpers/linux-guest.js';
import { expectDowntimeAsObserved, HOST_STALL_ALLOWANCE_MS, report } from '../helpers/guest-downtime.js';
import { localStore } from '../../src/image-store/image-store.js';

let bench: LinuxBench;

beforeAll(async () => {
  bench = await makeLinuxBench({ quiesce: 'required' });
});

afterAll(async () => {
  await bench?.cleanup();
});

describe('every strategy on one running Linux guest, quiesce = required', () => {
  let guest: LinuxGuest;
  beforeAll(async () => {
    guest = await createLinuxGuest(bench.hv, { name: 'quiesced' });
  });

  it.each(STRATEGIES)('%s: image clean without replay, records intact to the point in time, it boots and goes on; downtime as the guest saw it', async (strategy) => {
    const { hv, rt } = bench;
    const imageId = randomUUID();
    const pendingBefore = (await rt.lifecycle.pending.list(guest.uuid)).length;
    const obs = await observeRunningGuest(guest.console, () =>
      rt.engine.take({ requestId: `req-${strategy}`, instanceUuid: guest.uuid, imageId, strategy }),
    );
    const result = obs.result;
    // deferred-delete's snapshot stays pending until the guest's next restart (the strategies after
    // it see it); every other strategy leaves none of its own.
    const left = strategy === 'deferred-delete' ? 1 : pendingBefore;
    expect(result).toMatchObject({ status: 'active', strategy, quiesced: true, internal_snapshots: left });
    expect((await hv.info(guest.uuid)).state).toBe('running');

    const image = localStore(rt.store).dataPath(imageId);
    const fs = await checkGuestImage(image, path.join(bench.base, `check-${imageId}`));
    report(strategy, 'quiesced', { ...result, boot_ms: guest.bootMs, observed: obs.guest, image: fs });
    expect(fs.needsRecovery).toBe(false);
    expect(fs.cleanWithoutReplay).toBe(true);
    expect(fs.records.problems).toEqual([]);
    const last = Number(fs.records.last);
    expect(last).toBeGreaterThanOrEqual(obs.fsyncedBefore);
    expect(last).toBeLessThanOrEqual(obs.fsyncedAfter);

    // What the guest felt: its vCPU stops, and how long its writes were held.
    expect(obs.guest.writerErrors).toEqual([]);
    expectDowntimeAsObserved(result, obs.guest);
    // The guest's writes were held no longer than the freeze the agent reports; with one managed
    // save inside the freeze, not longer than the freeze less that stop (the guest's clock does not
    // run while it is stopped). A write held by the freeze still has its own write+fsync to do after
    // the thaw, on a host that may be busy: HOST_STALL_ALLOWANCE_MS for that. live's writes after the
    // thaw also go through copy-before-write while its copy runs on the same 2-core host (711 and
    // 757 ms seen beside the other test files against a 400 ms freeze): what that costs is bounded
    // against the idle guest by qemu-live-store-trouble and measured by bench:downtime, not here.
    if (strategy !== 'live') {
      const stoppedInFreeze = strategy === 'double-suspend' ? 0 : obs.guest.stoppedMs;
      expect(obs.guest.writerMaxMs).toBeLessThanOrEqual(result.freeze_ms - stoppedInFreeze + HOST_STALL_ALLOWANCE_MS);
    }

    // The guest goes on writing after the snapshot.
    expect(await writerPasses(guest, obs.fsyncedAfter)).toBeGreaterThan(obs.fsyncedAfter);

    // The image boots as the base of a new instance: its agent answers, its writer continues the sequence.
    const booted = await createLinuxGuest(hv, { name: `boot-${strategy}`, baseImage: image, baseFormat: 'raw' });
    const start = await booted.console.waitFor(0, 'writer start', 30_000, (ev) => ev.find((e) => e.kind === 'writer-start'));
    expect(start).toMatchObject({ seq: last + 1, boot: fs.records.boots.at(-1)! + 1 });
    await hv.deleteInstance(booted.uuid);
  });
});
