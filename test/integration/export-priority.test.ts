import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { dir } from 'tmp-promise';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultConfig } from '../../src/config/schema.js';
import { BACKGROUND_NICE } from '../../src/qemu-img/qemu-img.js';
import { buildRuntime, type Runtime } from '../../src/service/runtime.js';
import { silentLogger } from '../../src/log.js';
import { assertQemuInstalled, killQemuUnder, writeQemuImgStub } from '../helpers/qemu-guest.js';
import { tempDirsConfig } from '../helpers/temp-config.js';

/** `[hypervisor] background_export_nice` here: not the default, to show that the option is what counts. */
const NICE = 7;

/**
 * Issue 13 goal 4, the mechanism: an export no guest waits for runs qemu-img at
 * `[hypervisor] background_export_nice` (default BACKGROUND_NICE), so
 * that on a busy host another guest's managed save and restore get the CPUs first; cold's export of
 * a guest it saved runs at the agent's own priority (that guest is down until it ends). Real QEMU,
 * real qemu-img behind a stub that, on `convert`, records its pid and waits for the test's go before
 * it runs the real one: the test reads the niceness of that very process from /proc.
 */

const MiB = 2 ** 20;
let base: string;
let rt: Runtime;
let pidFile: string;
let goFile: string;

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
  rt = buildRuntime(config, silentLogger());
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

/** Runs a snapshot; once its qemu-img convert has started, returns that process's niceness. */
async function exportNice(uuid: string, strategy: 'cold' | 'suspend-create-resume-extract'): Promise<number> {
  await fs.rm(pidFile, { force: true });
  await fs.rm(goFile, { force: true });
  const taking = rt.engine.take({ requestId: `req-${randomUUID()}`, instanceUuid: uuid, imageId: randomUUID(), strategy });
  let nice: number | undefined;
  try {
    const deadline = Date.now() + 60_000;
    for (;;) {
      // runProgram sets the priority in the same turn as it spawns, before this can see the pid.
      const pid = Number(await fs.readFile(pidFile, 'utf8').catch(() => ''));
      if (pid > 0) {
        nice = await niceOf(pid);
        break;
      }
      if (Date.now() > deadline) throw new Error(`no qemu-img convert started for ${strategy}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  } finally {
    await fs.writeFile(goFile, '');
    expect(await taking).toMatchObject({ status: 'active', strategy });
  }
  return nice;
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
