/**
 * Issue 9 on the real Linux guest, quiesce = off: for every strategy, the image of a running guest
 * is crash-consistent (clean after a journal replay on a copy), its records intact up to one the guest
 * had fsynced before the point in time; the downtime reported is the pause the guest saw. Then the
 * same guest paused: it stays paused through the snapshot and writes again once unpaused.
 */
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { STRATEGIES } from '../../src/config/schema.js';
import { checkGuestImage } from '../../src/guest-check/ext4.js';
import { observeRunningGuest } from '../../src/guest-check/observe.js';
import { createLinuxGuest, makeLinuxBench, writerPasses, type LinuxBench, type LinuxGuest } from '../helpers/linux-guest.js';
import { expectDowntimeAsObserved, report } from '../helpers/guest-downtime.js';
import { localStore } from '../../src/image-store/image-store.js';

let bench: LinuxBench;

beforeAll(async () => {
  bench = await makeLinuxBench({ quiesce: 'off' });
});

afterAll(async () => {
  await bench?.cleanup();
});

describe('every strategy on one Linux guest, quiesce = off', () => {
  let guest: LinuxGuest;
  beforeAll(async () => {
    guest = await createLinuxGuest(bench.hv, { name: 'unquiesced' });
  });

  it.each(STRATEGIES)('%s: running: clean after a journal replay, records intact to the point in time, downtime as seen; paused: stays paused, writes once unpaused', async (strategy) => {
    const { hv, rt } = bench;
    const imageId = randomUUID();
    const obs = await observeRunningGuest(guest.console, () =>
      rt.engine.take({ requestId: `req-${strategy}`, instanceUuid: guest.uuid, imageId, strategy }),
    );
    expect(obs.result).toMatchObject({ status: 'active', quiesced: false, freeze_ms: 0 });
    expect((await hv.info(guest.uuid)).state).toBe('running');
    const fs = await checkGuestImage(localStore(rt.store).dataPath(imageId), path.join(bench.base, `check-${imageId}`));
    report(strategy, 'unquiesced', { ...obs.result, observed: obs.guest, image: fs });
    expect(fs.cleanAfterReplay).toBe(true);
    expect(fs.records.problems).toEqual([]);
    const last = Number(fs.records.last);
    expect(last).toBeGreaterThanOrEqual(obs.fsyncedBefore);
    expect(last).toBeLessThanOrEqual(obs.fsyncedAfter);
    expect(obs.guest.writerErrors).toEqual([]);
    expectDowntimeAsObserved(obs.result, obs.guest);

    // Paused: no pause of ours to see, and it stays paused.
    const beforePause = await guest.console.mark();
    await hv.pause(guest.uuid);
    const paused = await rt.engine.take({ requestId: `req-${strategy}-p`, instanceUuid: guest.uuid, imageId: randomUUID(), strategy });
    expect(paused).toMatchObject({ status: 'active', downtime_ms: 0, quiesced: false });
    expect((await hv.info(guest.uuid)).state).toBe('paused');
    await hv.unpause(guest.uuid);
    // The probe reports that pause a tick or two after it ended: wait for it, so that the next
    // strategy's window does not take it for its own.
    const pauseSeen = await guest.console.waitFor(beforePause, 'the probe reporting the pause', 30_000, (ev) => ev.find((e) => e.kind === 'probe-stop'));
    expect(pauseSeen).toMatchObject({ kind: 'probe-stop' });
    expect(await writerPasses(guest, obs.fsyncedAfter)).toBeGreaterThan(obs.fsyncedAfter);
  });
});
