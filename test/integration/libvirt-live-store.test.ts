/**
 * Issue 11 on the libvirt backend: `live` never makes the guest pay for a full image store (SPEC §3).
 * The pull backup's scratch file lies beside the domain's disk and QEMU never opens the store's
 * file: only our qemu-img writes it. So a store that fills during the copy fails that copy, and the
 * snapshot, cleanly; the guest (the real Linux guest, its writer fsyncing a record every 10 ms)
 * never sees an error or a stop, and libvirt is left with no job, no scratch file, no socket.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SnapshotFailed } from '../../src/errors.js';
import { PROBE_NOISE_MS } from '../../src/guest-check/console.js';
import { observeRunningGuest } from '../../src/guest-check/observe.js';
import type { Runtime } from '../../src/service/runtime.js';
import { report } from '../helpers/guest-downtime.js';
import { libvirtView, makeLibvirtBench, type LibvirtBench, type TestDomain } from '../helpers/libvirt.js';
import { writerPasses } from '../helpers/linux-guest.js';
import { mountSmallFs, type SmallFs } from '../helpers/small-fs.js';
import { localStore } from '../../src/image-store/image-store.js';

const MiB = 2 ** 20;
const STORE_MB = 64;
/** What the filler leaves free in the store once the copy is about to begin: far less than the image. */
const LEFT_FREE = 1 * MiB;
const NO_SPACE = /No space left on device|ENOSPC/;

let bench: LibvirtBench;
let small: SmallFs | undefined;
let rt: Runtime;
let dom: TestDomain;

beforeAll(async () => {
  bench = await makeLibvirtBench({ quiesce: 'off' });
  small = await mountSmallFs(path.join(bench.base, 'small-store'), STORE_MB);
  const store = small;
  // Right before the first copy begins (the backup job started), the store is filled up to LEFT_FREE.
  let filled = false;
  rt = bench.runtimeWith(
    {},
    {
      storePath: store.path,
      beforeStep: async (step) => {
        if (step.name !== 'wait-backup' || filled) return;
        filled = true;
        const free = await store.freeBytes();
        await fs.writeFile(path.join(store.path, 'filler'), Buffer.alloc(Math.max(0, free - LEFT_FREE), 0x5a));
      },
    },
  );
  dom = await bench.domain({ guest: 'linux' });
});

afterAll(async () => {
  // The store's mount first: the bench removes its folders, the mount point among them.
  await small?.cleanup();
  await bench?.cleanup();
});

describe('live on libvirt: the image store fills during the copy', () => {
  it('the snapshot fails naming the cause, nothing partial or left in libvirt; the guest never saw an error or a stop and writes on', async () => {
    const imageId = randomUUID();
    const obs = await observeRunningGuest(dom.console, () =>
      rt.engine.take({ requestId: 'full-store', instanceUuid: dom.uuid, imageId, strategy: 'live' }).then(
        () => undefined,
        (err: unknown) => err,
      ),
    );
    report('live', 'libvirt store fills', { error: String(obs.result), observed: obs.guest });
    expect(obs.result).toBeInstanceOf(SnapshotFailed);
    expect(String((obs.result as Error).message)).toMatch(NO_SPACE);
    expect((await rt.store.show(imageId)).status).toBe('killed');
    await expect(fs.stat(rt.store.partialPath(imageId))).rejects.toMatchObject({ code: 'ENOENT' });
    await expect(fs.stat(localStore(rt.store).dataPath(imageId))).rejects.toMatchObject({ code: 'ENOENT' });

    // The guest: no write error, no stop; it runs and writes on.
    expect(obs.guest.writerErrors).toEqual([]);
    expect(obs.guest.stops.filter((ms) => ms >= PROBE_NOISE_MS)).toEqual([]);
    expect((await rt.hv.info(dom.uuid)).state).toBe('running');
    expect(await libvirtView(dom.uuid)).toEqual({ state: expect.stringMatching(/^running/), managedSave: false, job: 'None' });
    expect((await fs.readdir(dom.dir)).filter((n) => n.startsWith('snapdrv-scratch-'))).toEqual([]);
    expect(await writerPasses({ console: dom.console, uuid: dom.uuid, agentSocket: '' }, obs.fsyncedAfter)).toBeGreaterThan(obs.fsyncedAfter);

    // Space again: the next live snapshot of the same guest succeeds.
    await fs.rm(path.join(small!.path, 'filler'));
    const next = await rt.engine.take({ requestId: 'after', instanceUuid: dom.uuid, imageId: randomUUID(), strategy: 'live' });
    expect(next.status).toBe('active');
  });
});
