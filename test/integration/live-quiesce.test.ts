import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Lifecycle } from '../../src/snapshot/lifecycle.js';
import { GuestAgentError, SnapshotFailed } from '../../src/errors.js';
import type { QemuHypervisor } from '../../src/hypervisor/qemu/qemu-hypervisor.js';
import { ImageStore } from '../../src/image-store/image-store.js';
import { silentLogger } from '../../src/log.js';
import type { QuiesceMode } from '../../src/config/schema.js';
import { SnapshotEngine } from '../../src/snapshot/engine.js';
import { OperationJournal } from '../../src/snapshot/operation-journal.js';
import { PendingSnapshots } from '../../src/snapshot/pending.js';
import { GuestAgentResponder } from '../helpers/guest-agent-responder.js';
import { MiB, createGuest, guestWrite, makeQemuEnv, watchQmpEvents, type QemuEnv } from '../helpers/qemu-guest.js';

/**
 * The engine's `live` strategy on a real QEMU guest, quiesced through a guest agent: the test
 * guest has no OS, so the agent is the test responder, reached through the hypervisor's
 * `guestAgentSocket` hook; "no agent" is the guest's real (unanswered) channel.
 */
describe('live strategy with guest-agent quiesce on a real QEMU guest', () => {
  let env: QemuEnv;
  let responder: GuestAgentResponder;
  let uuid: string;
  let store: ImageStore;

  beforeAll(async () => {
    env = await makeQemuEnv();
    responder = await GuestAgentResponder.listen(path.join(env.tmpPath, 'fake-qga.sock'), { filesystems: 3 });
    store = new ImageStore({ path: path.join(env.tmpPath, 'images'), reservedSpaceMb: 0, osHashAlgo: 'sha512' });
    uuid = await createGuest(env.hv, { diskSizeBytes: 64 * MiB });
    await guestWrite(env.hv, uuid, 0x3c, 0, 4 * MiB);
  });

  afterAll(async () => {
    await responder?.close();
    await env?.cleanup();
  });

  function engineFor(hv: QemuHypervisor, mode: QuiesceMode): SnapshotEngine {
    const log = silentLogger();
    const pending = new PendingSnapshots(path.join(env.tmpPath, 'state', 'pending'));
    return new SnapshotEngine({
      hv,
      store,
      lifecycle: new Lifecycle(hv, pending, log),
      operations: new OperationJournal(path.join(env.tmpPath, 'state', 'operations'), log),
      log,
      namePrefix: 'snapdrv-',
      defaultStrategy: 'live',
      quiesce: { mode, maxFreezeMs: 10_000, agentTimeoutMs: 1_000 },
    });
  }

  it('quiesce = auto with an agent: frozen around the job start, then thawed; the image is active', async () => {
    const hv = env.newHypervisor({ guestAgentSocket: () => responder.socketPath });
    const result = await engineFor(hv, 'auto').take({ requestId: 'req-auto', instanceUuid: uuid, imageId: randomUUID(), strategy: 'live' });

    expect(result.status).toBe('active');
    expect(result.strategy).toBe('live');
    expect(result.quiesced).toBe(true);
    expect(result.freeze_ms).toBeGreaterThan(0);
    expect(result.internal_snapshots).toBe(0);
    expect(responder.frozen).toBe(false);
    const fsCommands = responder.received.filter((c) => c.startsWith('guest-fsfreeze-'));
    expect(fsCommands).toEqual(['guest-fsfreeze-freeze', 'guest-fsfreeze-thaw']);
    expect((await hv.info(uuid)).state).toBe('running');
    expect((await store.verify(result.image_id)).ok).toBe(true);
  });

  it('quiesce = required with no agent: GuestAgentError, the vCPUs never stopped, guest running, no active image', async () => {
    const hv = env.newHypervisor(); // the guest's own channel: nothing in the guest answers
    const before = (await store.list()).map((i) => i.id);
    const watch = await watchQmpEvents(hv, uuid);
    let err: unknown;
    let duringAttempt: string[];
    try {
      err = await engineFor(hv, 'required')
        .take({ requestId: 'req-required', instanceUuid: uuid, imageId: randomUUID(), strategy: 'live' })
        .then(
          () => undefined,
          (e: unknown) => e,
        );
      duringAttempt = watch.events.map((e) => e.event);
      // The watch does see a stop of the vCPUs (the check below is not vacuous).
      await hv.pause(uuid);
      await hv.unpause(uuid);
    } finally {
      await watch.stop();
    }

    expect(err).toBeInstanceOf(SnapshotFailed);
    expect((err as Error).cause).toBeInstanceOf(GuestAgentError);
    expect((err as Error).message).toContain('quiesce = required');
    expect(duringAttempt).not.toContain('STOP');
    expect(watch.events.slice(duringAttempt.length).map((e) => e.event)).toEqual(['STOP', 'RESUME']);
    expect((await hv.info(uuid)).state).toBe('running');
    const after = await store.list();
    expect(after.filter((i) => !before.includes(i.id) && i.status === 'active')).toEqual([]);
    // No backup job was started either.
    expect(await hv.qmp<unknown[]>(uuid, 'query-block-jobs')).toEqual([]);
  });
});
