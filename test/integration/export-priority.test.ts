import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir } from 'tmp-promise';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultConfig } from '../../src/config/schema.js';
import { BACKGROUND_NICE } from '../../src/qemu-img/qemu-img.js';
import { buildRuntime, type Runtime } from '../../src/service/runtime.js';
import type { BeforeStep } from '../../src/snapshot/run-steps.js';
import { assertQemuInstalled, guestFlush, guestWrite, killQemuUnder, writeQemuImgStub } from '../helpers/qemu-guest.js';
import { captureLogger, type CapturedLine } from '../helpers/log-capture.js';
import { holdAtStep } from '../helpers/hold-at-step.js';
import { tempDirsConfig } from '../helpers/temp-config.js';

/** `[hypervisor] background_export_nice` here: not the default, to show that the option is what counts. */
const NICE = 7;
/** `[hypervisor] running_export_rate_mb` here, likewise. */
const RATE_MB = 3;

/**
 * Issue 13 goal 4, the mechanism: an export no guest waits for runs qemu-img at
 * `[hypervisor] background_export_nice` (default BACKGROUND_NICE), so
 * that on a busy host another guest's managed save and restore get the CPUs first; cold's export of
 * a guest it saved runs at the agent's own priority (that guest is down until it ends). Real QEMU,
 * real qemu-img behind a stub that, on `convert`, records its pid and waits for the test's go before
 * it runs the real one: the test reads the niceness of that very process from /proc. And such an
 * export holds back (takes no data) while another guest is down in its managed save.
 */

const MiB = 2 ** 20;
let base: string;
let rt: Runtime;
let pidFile: string;
let goFile: string;
let lines: CapturedLine[];
let beforeStep: BeforeStep | undefined;

beforeAll(async () => {
  await assertQemuInstalled();
  base = (await dir({ prefix: 'sdp-' })).path;
  pidFile = path.join(base, 'convert.pid');
  goFile = path.join(base, 'go');
  const stub = await writeQemuImgStub(base, [
    `echo $$ > '${pidFile}.new' && mv '${pidFile}.new' '${pidFile}'`,
    `while [ ! -e '${goFile}' ]; do sleep 0.02; done`,
  ]);
  const config = tempDirsConfig(base, { shutdownTimeoutS: 1 });
  config.hypervisor.qemu_img = stub;
  config.hypervisor.background_export_nice = NICE;
  config.hypervisor.running_export_rate_mb = RATE_MB;
  const captured = captureLogger();
  lines = captured.lines;
  rt = buildRuntime(config, captured.log, { beforeStep: (step, i) => beforeStep?.(step, i) });
});

afterAll(async () => {
  if (base === undefined) return;
  await killQemuUnder(base);
  await fs.rm(base, { recursive: true, force: true });
});

/** Field 19 of /proc/<pid>/stat (after the command name, which may hold spaces). */
async function niceOf(pid: number): Promise<number> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]);
}

/** Runs a snapshot; once its qemu-img convert has started, returns that process's niceness and arguments. */
async function exportProcess(uuid: string, strategy: 'cold' | 'suspend-create-resume-extract' | 'live' | 'monitor-snapshot'): Promise<{ nice: number; argv: string[] }> {
  await fs.rm(pidFile, { force: true });
  await fs.rm(goFile, { force: true });
  const taking = rt.engine.take({ requestId: `req-${randomUUID()}`, instanceUuid: uuid, imageId: randomUUID(), strategy });
  let nice: number | undefined;
  let argv: string[] = [];
  try {
    const deadline = Date.now() + 60_000;
    for (;;) {
      // runProgram sets the priority in the same turn as it spawns, before this can see the pid.
      const pid = Number(await fs.readFile(pidFile, 'utf8').catch(() => ''));
      if (pid > 0) {
        nice = await niceOf(pid);
        argv = (await fs.readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0');
        break;
      }
      if (Date.now() > deadline) throw new Error(`no qemu-img convert started for ${strategy}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  } finally {
    await fs.writeFile(goFile, '');
    expect(await taking).toMatchObject({ status: 'active', strategy });
  }
  return { nice, argv };
}

async function exportNice(uuid: string, strategy: 'cold' | 'suspend-create-resume-extract'): Promise<number> {
  return (await exportProcess(uuid, strategy)).nice;
}

describe('export priority (real QEMU, real qemu-img)', () => {
  it('the default is BACKGROUND_NICE', () => {
    expect(defaultConfig().hypervisor.background_export_nice).toBe(BACKGROUND_NICE);
  });

  it('cold on a running guest: its own priority; suspend-create-resume-extract (the guest runs during the export): background_export_nice', async () => {
    const hv = rt.qemu!;
    const uuid = randomUUID();
    await hv.createInstance({ uuid, name: 'prio', memoryMb: 64, vcpus: 1, machine: 'pc', diskSizeBytes: 16 * MiB });
    await rt.lifecycle.start(uuid);
    const ownNice = await niceOf(process.pid);

    expect(await exportNice(uuid, 'cold')).toBe(ownNice);
    expect(await exportNice(uuid, 'suspend-create-resume-extract')).toBe(Math.max(ownNice, NICE));
    expect((await hv.info(uuid)).state).toBe('running');
  });
});

describe("copies of a running guest's disk (real QEMU, real qemu-img)", () => {
  /** The -r argument of a qemu-img convert's arguments (undefined: none). */
  const rateOf = (argv: string[]) => (argv.includes('-r') ? argv[argv.indexOf('-r') + 1] : undefined);

  it('live, monitor-snapshot and a managed-save strategy once the guest runs: held to [hypervisor] running_export_rate_mb; cold, which keeps the guest saved, and a shut-off guest: not', async () => {
    const hv = rt.qemu!;
    const uuid = randomUUID();
    await hv.createInstance({ uuid, name: 'rate', memoryMb: 64, vcpus: 1, machine: 'pc', diskSizeBytes: 16 * MiB });
    await rt.lifecycle.start(uuid);
    for (const strategy of ['live', 'monitor-snapshot', 'suspend-create-resume-extract'] as const) {
      const { argv } = await exportProcess(uuid, strategy);
      expect(argv).toContain('convert');
      expect(rateOf(argv), strategy).toBe(String(RATE_MB * MiB));
    }
    expect(rateOf((await exportProcess(uuid, 'cold')).argv)).toBeUndefined();
    expect((await hv.info(uuid)).state).toBe('running');
    await rt.lifecycle.stop(uuid, false);
    expect(rateOf((await exportProcess(uuid, 'monitor-snapshot')).argv)).toBeUndefined();
  });
});

describe('background exports hold back while another guest waits (real QEMU, real qemu-img)', () => {
  it("a monitor-snapshot's export takes no data while another guest is down in its managed save; it goes on, exact, once that guest runs", async () => {
    const hv = rt.qemu!;
    await fs.writeFile(goFile, ''); // the stub runs the real qemu-img at once
    const [a, b] = [randomUUID(), randomUUID()];
    for (const uuid of [a, b]) {
      await hv.createInstance({ uuid, name: 'yield', memoryMb: 64, vcpus: 1, machine: 'pc', diskSizeBytes: 16 * MiB });
      await rt.lifecycle.start(uuid);
    }
    await guestWrite(hv, a, 0x5a, 0, 8 * MiB); // data to export: qemu-img sends no write for zeros
    await guestFlush(hv, a);
    // B (suspend-create-resume-extract) is held down, saved, before its snapshot is made.
    const bHeld = holdAtStep('create-snapshot');
    beforeStep = bHeld.hook;
    try {
      const bDone = rt.engine.take({ requestId: 'req-b', instanceUuid: b, imageId: randomUUID(), strategy: 'suspend-create-resume-extract' });
      await bHeld.reached;
      expect((await hv.info(b)).state).toBe('saved');
      await fs.rm(pidFile, { force: true });
      const aImage = randomUUID();
      let aSettled = false;
      const aDone = rt.engine.take({ requestId: 'req-a', instanceUuid: a, imageId: aImage, strategy: 'monitor-snapshot' }).finally(() => (aSettled = true));
      // Its qemu-img runs (the stub wrote its pid) but gets no answer to its first write.
      const deadline = Date.now() + 60_000;
      while (!(await fs.stat(pidFile).then(() => true, () => false))) {
        if (Date.now() > deadline) throw new Error('no qemu-img convert started for A');
        await new Promise((r) => setTimeout(r, 20));
      }
      await new Promise((r) => setTimeout(r, 1000));
      expect(aSettled).toBe(false);
      expect((await hv.info(b)).state).toBe('saved');

      bHeld.release();
      await expect(bDone).resolves.toMatchObject({ status: 'active' });
      await expect(aDone).resolves.toMatchObject({ status: 'active', strategy: 'monitor-snapshot', downtime_ms: expect.any(Number) });
      const image = await fs.readFile(path.join(rt.config.image_store.path, aImage));
      expect(image.length).toBe(16 * MiB);
      expect(image.subarray(0, 8 * MiB).every((x) => x === 0x5a)).toBe(true);
      expect(image.subarray(8 * MiB).every((x) => x === 0)).toBe(true);
      const held = lines.filter((l) => l.msg === 'the export held back while other guests of this host waited on their snapshots');
      expect(held).toHaveLength(1);
      expect(held[0]).toMatchObject({ request_id: 'req-a', instance_uuid: a });
      expect(Number(held[0]!.held_back_ms)).toBeGreaterThanOrEqual(900);
      for (const uuid of [a, b]) expect((await hv.info(uuid)).state).toBe('running');
    } finally {
      bHeld.release();
      beforeStep = undefined;
    }
  });
});
