import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { dir, type DirectoryResult } from 'tmp-promise';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { HashWorkerFailed } from '../../src/errors.js';
import { ParallelDigest } from '../../src/image-store/hash.js';
import { onlineCpus } from '../../src/util/affinity.js';

/**
 * `[DEFAULT] agent_cpus`: the agent runs on the CPUs the operator set aside for the host, with the
 * copies no guest waits for (their qemu-img and hash threads); a qemu-img a guest waits for runs on
 * every online CPU although the agent is pinned. Real taskset, real threads: each one's affinity is
 * read back from /proc.
 */

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const src = (file: string) => JSON.stringify(pathToFileURL(path.join(ROOT, 'src', file)).href);

let tmp: DirectoryResult;

beforeEach(async () => {
  tmp = await dir({ unsafeCleanup: true });
});

afterEach(async () => {
  await tmp.cleanup();
});

/** The CPU this test pins to, and the host's whole list (a pin must differ from it to be seen). */
function hostCpus(): { pin: string; all: string } {
  const n = os.cpus().length;
  if (n < 2) throw new Error(`these tests pin to one CPU of several; this host has ${n}`);
  return { pin: String(n - 1), all: `0-${n - 1}` };
}

async function allowedCpus(statusFile: string): Promise<string | undefined> {
  const text = await fs.readFile(statusFile, 'utf8').catch(() => undefined);
  return text?.match(/^Cpus_allowed_list:\s*(\S+)$/m)?.[1];
}

/** This process's threads whose affinity is exactly `cpus`. */
async function threadsPinnedTo(cpus: string): Promise<number> {
  let n = 0;
  for (const tid of await fs.readdir('/proc/self/task')) {
    if ((await allowedCpus(`/proc/self/task/${tid}/status`)) === cpus) n++;
  }
  return n;
}

describe('[DEFAULT] agent_cpus', () => {
  it('pins the agent; its background qemu-img runs on those CPUs, any other on every online CPU', async () => {
    const { pin, all } = hostCpus();
    expect(onlineCpus()).toBe(all);
    // A qemu-img that writes its own affinity into its destination (the last argument).
    const stub = path.join(tmp.path, 'qemu-img');
    await fs.writeFile(stub, '#!/bin/sh\nfor a; do last=$a; done\ngrep Cpus_allowed_list /proc/self/status > "$last"\n', { mode: 0o755 });
    const disk = path.join(tmp.path, 'disk.qcow2');
    await fs.writeFile(disk, '');
    const out = (name: string) => JSON.stringify(path.join(tmp.path, name));
    // The agent, in a process of its own: pinned as `snapshot-driver` pins itself.
    const script = [
      `const { pinProcess } = await import(${src('util/affinity.ts')});`,
      `const { QemuImg } = await import(${src('qemu-img/qemu-img.ts')});`,
      `await pinProcess(process.pid, ${JSON.stringify(pin)});`,
      `const img = new QemuImg(${JSON.stringify(stub)}, {}, 10, ${JSON.stringify(pin)});`,
      `await img.convertToRaw(${JSON.stringify(disk)}, ${out('bg.raw')}, { background: true });`,
      `await img.convertToRaw(${JSON.stringify(disk)}, ${out('fg.raw')});`,
      `await new QemuImg(${JSON.stringify(stub)}, {}, 10).convertToRaw(${JSON.stringify(disk)}, ${out('inherited.raw')});`,
    ].join('\n');
    await promisify(execFile)(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: ROOT, timeout: 60_000 });
    expect(await allowedCpus(path.join(tmp.path, 'bg.raw'))).toBe(pin);
    expect(await allowedCpus(path.join(tmp.path, 'fg.raw'))).toBe(all);
    // Without agent_cpus nothing is set: a child has the agent's own affinity.
    expect(await allowedCpus(path.join(tmp.path, 'inherited.raw'))).toBe(pin);
  });

  it('pinProcess names the option and what taskset said', async () => {
    const { pinProcess } = await import('../../src/util/affinity.js');
    await expect(pinProcess(process.pid, '4095')).rejects.toThrow(/^cannot run the agent on CPUs 4095 \(\[DEFAULT\] agent_cpus\): taskset: .+/);
    expect(await allowedCpus('/proc/self/status')).toBe(hostCpus().all);
  });

  it("pins a background digest's hash threads, and its digests are right", async () => {
    const { pin } = hostCpus();
    const before = await threadsPinnedTo(pin);
    const digest = new ParallelDigest(['md5', 'sha512'], { cpus: pin });
    const data = Buffer.alloc(3 * 1024 * 1024, 7);
    const slot = await digest.slot(0);
    data.copy(slot);
    digest.push(0, data.length);
    digest.pushZeros(1000);
    const [md5, sha512] = await digest.end();
    const whole = Buffer.concat([data, Buffer.alloc(1000)]);
    expect(md5).toBe(createHash('md5').update(whole).digest('hex'));
    expect(sha512).toBe(createHash('sha512').update(whole).digest('hex'));
    // Both threads wait in the idle pool, still pinned (a later background digest takes them).
    expect((await threadsPinnedTo(pin)) - before).toBe(2);
  });

  it('fails a digest whose threads cannot be pinned, naming the option and the CPUs', async () => {
    const digest = new ParallelDigest(['md5', 'sha512'], { cpus: '4095' });
    const slot = await digest.slot(0);
    slot.fill(1, 0, 4096);
    let err: unknown;
    try {
      digest.push(0, 4096);
      await digest.end();
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(HashWorkerFailed);
    expect((err as Error).message).toMatch(/^cannot pin the (md5|sha512) hash thread to CPUs 4095 \(\[DEFAULT\] agent_cpus\): .+/);
  });
});
