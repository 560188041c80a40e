/**
 * Issue 9, check 4: quiesce with the real guest agent (qemu-ga freezing the real ext4). The guest is
 * thawed afterwards on every path: when the snapshot fails after the freeze, when the agent is killed
 * while the guest is frozen (recovery thaws, also after resuming a guest saved frozen), and when the
 * freeze outlasts max_freeze_seconds (thawed by the deadline while the operation waits).
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SnapshotFailed } from '../../src/errors.js';
import { observeRunningGuest } from '../../src/guest-check/observe.js';
import type { Step } from '../../src/snapshot/context.js';
import { cliJson, runCli } from '../helpers/cli.js';
import { HOST_STALL_ALLOWANCE_MS, report } from '../helpers/guest-downtime.js';
import { createLinuxGuest, freezeStatus, makeLinuxBench, writerPasses, type LinuxBench, type LinuxGuest } from '../helpers/linux-guest.js';

let bench: LinuxBench;

beforeAll(async () => {
  bench = await makeLinuxBench({ quiesce: 'required' });
});

afterAll(async () => {
  await bench?.cleanup();
});

/** The guest is thawed and its writer goes on. */
async function expectThawedAndWriting(guest: LinuxGuest): Promise<void> {
  expect(await freezeStatus(guest)).toBe('thawed');
  const seq = await guest.console.waitForFsynced(await guest.console.mark());
  expect(await writerPasses(guest, seq)).toBeGreaterThan(seq);
}

/** Polls the agent until the guest is thawed; resolves with how long that took (ms). */
async function waitUntilThawed(guest: LinuxGuest, timeoutMs: number): Promise<number> {
  const started = performance.now();
  while ((await freezeStatus(guest)) !== 'thawed') {
    if (performance.now() - started > timeoutMs) throw new Error(`still frozen after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 200));
  }
  return performance.now() - started;
}

describe('quiesce with the real guest agent', () => {
  it('max_freeze_seconds: a freeze held past it is thawed by its deadline; auto then goes on unquiesced', async () => {
    const guest = await createLinuxGuest(bench.hv, { name: 'max-freeze' });
    let waitedMs: number | undefined;
    // Hold the operation right after the freeze until the guest's own agent says it is thawed.
    const beforeStep = async (step: Step) => {
      if (step.name === 'start-backup') waitedMs = await waitUntilThawed(guest, 15_000);
    };
    const rt = bench.runtimeWith({ quiesce: 'auto', max_freeze_seconds: 1 }, { beforeStep });
    const obs = await observeRunningGuest(guest.console, () =>
      rt.engine.take({ requestId: 'max-freeze', instanceUuid: guest.uuid, imageId: randomUUID(), strategy: 'live' }),
    );
    report('live', 'max_freeze_seconds=1', { ...obs.result, waited_for_thaw_ms: waitedMs, observed: obs.guest });
    expect(waitedMs).toBeDefined();
    expect(obs.result).toMatchObject({ status: 'active', quiesced: false });
    // Frozen from the freeze until the deadline's thaw answered: 1 s and the thaw's round trip.
    expect(obs.result.freeze_ms).toBeGreaterThanOrEqual(1000);
    expect(obs.result.freeze_ms).toBeLessThan(2000);
    // The guest's writer was held about that long, never longer (but for the held write's own
    // write+fsync after the thaw).
    expect(obs.guest.writerMaxMs).toBeGreaterThan(500);
    expect(obs.guest.writerMaxMs).toBeLessThanOrEqual(obs.result.freeze_ms + HOST_STALL_ALLOWANCE_MS);
    await expectThawedAndWriting(guest);
    await bench.hv.stop(guest.uuid, { graceful: false });
  });

  it.each([
    ['suspend-create-resume-extract', 'create-snapshot'],
    ['live', 'start-backup'],
  ] as const)('%s failing at %s, after the freeze: undone, the guest thawed and writing', async (strategy, failAt) => {
    const guest = await createLinuxGuest(bench.hv, { name: `fail-${strategy}` });
    const rt = bench.runtimeWith(
      { quiesce: 'required' },
      {
        beforeStep: (step) => {
          if (step.name === failAt) throw new Error(`injected failure at ${failAt}`);
        },
      },
    );
    const imageId = randomUUID();
    const err = await rt.engine.take({ requestId: 'fail', instanceUuid: guest.uuid, imageId, strategy }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(SnapshotFailed);
    expect((err as Error).message).toContain(`injected failure at ${failAt}`);
    expect((await bench.hv.info(guest.uuid)).state).toBe('running');
    expect((await rt.store.show(imageId)).status).toBe('killed');
    await expectThawedAndWriting(guest);
    await bench.hv.stop(guest.uuid, { graceful: false });
  });

  it.each([
    ['live', 'step:2:start-backup', 'running'],
    ['suspend-create-resume-extract', 'step:3:resume', 'saved'],
  ] as const)('%s: the agent killed at %s with the guest frozen; cleanup thaws it', async (strategy, point, left) => {
    const guest = await createLinuxGuest(bench.hv, { name: `kill-${strategy}` });
    const conf = await bench.configFile({ strategy, quiesce: 'required' });
    const imageId = randomUUID();
    const killed = await runCli(['--config-file', conf, 'snapshot', guest.uuid, '--image-id', imageId], { SNAPSHOT_DRIVER_FAULT: `kill:${point}` });
    expect(killed.code).toBe(-1); // killed by a signal
    expect((await bench.hv.info(guest.uuid)).state).toBe(left);
    if (left === 'running') expect(await freezeStatus(guest)).toBe('frozen');

    const recovered = (await cliJson(conf, ['cleanup'])) as { operations: Array<{ image_id: string; actions: string[]; guest_now: string }> };
    expect(recovered.operations).toEqual([expect.objectContaining({ image_id: imageId, guest_now: 'running' })]);
    expect(recovered.operations[0]!.actions).toEqual(expect.arrayContaining([expect.stringMatching(/^thawed [1-9]\d* filesystem\(s\)$/)]));
    await expectThawedAndWriting(guest);
    await bench.hv.stop(guest.uuid, { graceful: false });
  });

  it('a guest whose agent never answers: quiesce = required fails before the guest is touched', async () => {
    // Booted with the agent left out (init reads this from the kernel command line).
    const guest = await createLinuxGuest(bench.hv, { name: 'no-agent', cmdlineExtra: 'guest.agent=off', start: false });
    await bench.hv.start(guest.uuid);
    await guest.console.waitFor(0, '"GUEST ready"', 90_000, (ev) => ev.find((e) => e.kind === 'guest-ready'));
    const imageId = randomUUID();
    const err = await bench.rt.engine.take({ requestId: 'no-agent', instanceUuid: guest.uuid, imageId, strategy: 'cold' }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect((err as Error).message).toMatch(/quiesce = required, but no guest agent is connected/);
    expect((await bench.hv.info(guest.uuid)).state).toBe('running');
    expect(await bench.hv.listInternalSnapshots(guest.uuid)).toEqual([]);
    await bench.hv.stop(guest.uuid, { graceful: false });
  });
});
