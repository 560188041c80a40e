/**
 * Issue 10: libvirtd dies or restarts in the middle of an operation (real libvirtd, the real Linux
 * guest). The agent's calls and event listener reach it again; the operation completes, or fails
 * cleanly and leaves nothing half-done: the domain running and thawed, no managed-save image (a
 * stale one is removed: it would restore old RAM over a newer disk), no job, no snapshot of ours,
 * nothing partial; and the next snapshot succeeds.
 *
 * These restart the one libvirtd of the host, so they run last and alone (vitest.config.ts).
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SnapshotFailed } from '../../src/errors.js';
import { DomainEventWatch } from '../../src/hypervisor/libvirt/monitor-events.js';
import { silentLogger } from '../../src/log.js';
import type { Step } from '../../src/snapshot/context.js';
import { writerPasses } from '../helpers/linux-guest.js';
import { LIBVIRT_URI, libvirtdScript, libvirtView, makeLibvirtBench, virsh, type LibvirtBench, type TestDomain } from '../helpers/libvirt.js';
import { checkGuestImage } from '../../src/guest-check/ext4.js';
import { localStore } from '../../src/image-store/image-store.js';

let bench: LibvirtBench;

beforeAll(async () => {
  bench = await makeLibvirtBench({ quiesce: 'required' });
});

afterAll(async () => {
  await libvirtdScript('start');
  await bench?.cleanup();
});

async function qemuPid(dom: TestDomain): Promise<number> {
  return Number((await fs.readFile(`/run/libvirt/qemu/${dom.name}.pid`, 'utf8')).trim());
}

/** After the operation: the domain runs, thawed and writing; libvirt agrees; nothing of ours is left. */
async function expectLeftClean(dom: TestDomain): Promise<void> {
  expect(await libvirtView(dom.uuid)).toEqual({ state: expect.stringMatching(/^running/), managedSave: false, job: 'None' });
  const guest = { uuid: dom.uuid, console: dom.console, agentSocket: '' };
  const seq = await dom.console.waitForFsynced(await dom.console.mark());
  expect(await writerPasses(guest, seq)).toBeGreaterThan(seq);
  expect(await virsh('qemu-agent-command', dom.uuid, '{"execute":"guest-fsfreeze-status"}')).toContain('"thawed"');
  expect(await bench.rt.hv.listInternalSnapshots(dom.uuid)).toEqual([]);
  expect(await fs.readdir(path.join(bench.base, 'images', '.partial')).catch(() => [])).toEqual([]);
  // And the next snapshot is fine.
  const next = await bench.rt.engine.take({ requestId: 'after', instanceUuid: dom.uuid, imageId: randomUUID(), strategy: 'suspend-create-resume-extract' });
  expect(next).toMatchObject({ status: 'active', quiesced: true });
}

describe('libvirtd restarted during an operation', () => {
  it('killed in the middle of a managed save: the save fails cleanly, the stale save image is removed, the guest runs on', async () => {
    const dom = await bench.domain({ guest: 'linux' });
    const watch = await DomainEventWatch.open({ binary: 'virsh', uri: LIBVIRT_URI, commandTimeoutMs: 30_000 }, dom.uuid, silentLogger(), 30_000);
    try {
      const imageId = randomUUID();
      const since = Date.now();
      const taking = bench.rt.engine.take({ requestId: 'kill-save', instanceUuid: dom.uuid, imageId, strategy: 'suspend-create-resume-extract' }).then(
        (r) => ({ ok: true as const, r }),
        (err: unknown) => ({ ok: false as const, err }),
      );
      // The save has begun: hold QEMU still so that libvirtd dies with the save half-written.
      expect(await watch.find('MIGRATION', since, 60_000)).toBeDefined();
      const pid = await qemuPid(dom);
      process.kill(pid, 'SIGSTOP');
      try {
        expect((await virsh('domstate', dom.uuid, '--reason')).trim()).toBe('paused (saving)');
        await libvirtdScript('kill');
      } finally {
        process.kill(pid, 'SIGCONT');
      }
      await libvirtdScript('start');
      const outcome = await taking;
      expect(outcome.ok).toBe(false);
      if (!outcome.ok) {
        expect(outcome.err).toBeInstanceOf(SnapshotFailed);
        expect((outcome.err as SnapshotFailed).undoErrors).toEqual([]);
      }
      expect((await bench.rt.store.show(imageId)).status).toBe('killed');
      expect(await fs.readdir(path.join(bench.base, 's', 'operations'))).toEqual([]);
      await expectLeftClean(dom);
    } finally {
      watch.close();
    }
  });

  it.each(['restart', 'kill'] as const)('%s while a live backup copies: the copy goes on, the snapshot completes', async (how) => {
    const dom = await bench.domain({ guest: 'linux' });
    const beforeStep = async (step: Step) => {
      if (step.name !== 'wait-backup') return;
      if (how === 'kill') await libvirtdScript('kill');
      await libvirtdScript(how === 'kill' ? 'start' : 'restart');
    };
    const rt = bench.runtimeWith({ quiesce: 'required' }, { beforeStep });
    const imageId = randomUUID();
    const r = await rt.engine.take({ requestId: `backup-${how}`, instanceUuid: dom.uuid, imageId, strategy: 'live' });
    expect(r).toMatchObject({ status: 'active', quiesced: true });
    expect((await rt.store.verify(imageId)).ok).toBe(true);
    const fsReport = await checkGuestImage(localStore(rt.store).dataPath(imageId), path.join(bench.base, `check-${imageId}`));
    expect(fsReport).toMatchObject({ cleanWithoutReplay: true, records: { problems: [] } });
    await expectLeftClean(dom);
  });

  it('restarted between the save and the resume: the listener reaches it again, the resume happens', async () => {
    const dom = await bench.domain({ guest: 'linux' });
    const beforeStep = async (step: Step) => {
      if (step.name === 'resume') await libvirtdScript('restart');
    };
    const rt = bench.runtimeWith({ quiesce: 'required' }, { beforeStep });
    const r = await rt.engine.take({ requestId: 'restart-resume', instanceUuid: dom.uuid, imageId: randomUUID(), strategy: 'suspend-create-resume-extract' });
    expect(r).toMatchObject({ status: 'active', quiesced: true });
    expect(r.downtime_ms).toBeGreaterThan(0);
    await expectLeftClean(dom);
  });
});
