import { randomUUID } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { GuestWaits } from '../../src/util/guest-waits.js';
import { guestIn, makeFakeEnv, type FakeEnv } from '../helpers/fake-env.js';
import { captureLogger } from '../helpers/log-capture.js';
import { holdAtStep } from '../helpers/hold-at-step.js';

const HOUR_MS = 3_600_000;

/** Settles to 'pending' if `p` has not settled after `ms` (it must not, whatever the timing). */
function stillPending(p: Promise<unknown>, ms: number): Promise<unknown> {
  return Promise.race([p.then((v) => ({ settled: v })), new Promise((r) => setTimeout(() => r('pending'), ms))]);
}

describe('GuestWaits: background exports hold back while another guest waits', () => {
  it('no other operation, or another whose guest does not wait: the gate passes at once', async () => {
    const w = new GuestWaits(HOUR_MS);
    const self = w.watch(() => true); // its own guest waiting never holds its own export
    await expect(self.gate()()).resolves.toBe(0);
    const other = w.watch(() => false);
    await expect(self.gate()()).resolves.toBe(0);
    other.end();
    self.end();
  });

  it("holds while another operation's guest waits, and lets go once it does not (or its operation ended)", async () => {
    const w = new GuestWaits(HOUR_MS);
    const self = w.watch(() => false);
    let waits = true;
    const other = w.watch(() => waits);
    const gate = self.gate();
    const held = gate();
    expect(await stillPending(held, 50)).toBe('pending');
    waits = false;
    expect(await held).toBeGreaterThan(0);
    waits = true;
    const again = gate();
    expect(await stillPending(again, 50)).toBe('pending');
    other.end();
    expect(await again).toBeGreaterThan(0);
    self.end();
  });

  it('holds at most maxHoldMs, then lets the export through until no guest waits; 0 never holds', async () => {
    const w = new GuestWaits(30);
    const self = w.watch(() => false);
    let waits = true;
    w.watch(() => waits);
    const gate = self.gate();
    expect(await gate()).toBeGreaterThanOrEqual(30);
    await expect(gate()).resolves.toBe(0); // the same wait: not held again
    waits = false;
    await expect(gate()).resolves.toBe(0);
    waits = true; // a new wait holds it again
    expect(await gate()).toBeGreaterThanOrEqual(30);

    const never = new GuestWaits(0);
    never.watch(() => true);
    await expect(never.watch(() => false).gate()()).resolves.toBe(0);
  });
});

describe('two snapshots on one host', () => {
  let envs: FakeEnv[] = [];
  afterEach(async () => {
    await Promise.all(envs.map((e) => e.cleanup()));
    envs = [];
  });

  it("a monitor-snapshot's export waits while another guest is down in its managed save, and goes on once it runs", async () => {
    const { log, lines } = captureLogger();
    const e = await makeFakeEnv({ guestWaits: new GuestWaits(HOUR_MS), log });
    envs.push(e);
    const [a, b] = [randomUUID(), randomUUID()];
    await guestIn(e, 'running', a);
    await guestIn(e, 'running', b);
    // B (suspend-create-resume-extract) is held down, saved, before its snapshot is made.
    const bHeld = holdAtStep('create-snapshot');
    e.beforeStep = bHeld.hook;
    const bDone = e.engine.take({ requestId: 'req-b', instanceUuid: b, imageId: randomUUID() });
    await bHeld.reached;
    expect((await e.hv.info(b)).state).toBe('saved');

    const aImage = randomUUID();
    const aDone = e.engine.take({ requestId: 'req-a', instanceUuid: a, imageId: aImage, strategy: 'monitor-snapshot' });
    expect(await stillPending(aDone, 300)).toBe('pending');
    expect(e.hv.calls.filter((c) => c.op === 'exportDisk' && c.uuid === a)).toHaveLength(1); // it is exporting
    expect(await e.partialFiles()).toHaveLength(1); // A's, still receiving

    bHeld.release();
    await expect(bDone).resolves.toMatchObject({ status: 'active' });
    await expect(aDone).resolves.toMatchObject({ status: 'active', strategy: 'monitor-snapshot' });
    expect((await e.store.verify(aImage)).ok).toBe(true);
    const heldBack = lines.filter((l) => l.msg === 'the export held back while other guests of this host waited on their snapshots');
    expect(heldBack).toHaveLength(1);
    expect(heldBack[0]).toMatchObject({ request_id: 'req-a', instance_uuid: a });
    expect(Number(heldBack[0]!.held_back_ms)).toBeGreaterThan(0);
    expect((await e.hv.info(a)).state).toBe('running');
    expect((await e.hv.info(b)).state).toBe('running');
  });
});
