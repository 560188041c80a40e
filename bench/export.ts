/**
 * Benchmark (issue 13): the export stage of a snapshot against the floor and the shell pipeline, in
 * the same run on the same bytes.
 *
 * A shut-off qemu instance whose qcow2 disk (`--virtual-gib`, default 4) holds `--data-mb` (default
 * 1024) of random data in four extents spread over the disk, the rest holes. Each run takes a `cold`
 * snapshot with the real engine and times its export stage (the export step's start to the image
 * `active`: qemu-img convert, then md5 and the os_hash of every byte), with the event loop's delay
 * (perf_hooks monitorEventLoopDelay) over that stage. Then, on the image just made:
 *   - the floor: `openssl dgst -md5` and `openssl dgst -sha512` of the raw image, each alone (one core
 *     each, the faster of two tries); floor = the slower of the two;
 *   - the shell pipeline: `qemu-img convert -O raw`, then `md5sum`, then `sha512sum`.
 * Before all of that, `snapshot --strategy cold` of a disk of `--rss-virtual-gib` (default 16) with the
 * same data, run as the command an operator types (node dist/snapshot-driver.mjs; `npm run build` first),
 * gives that process's peak RSS. Beside the one-core floor, the export's own CPU time (this process's
 * threads and qemu-img's, from /proc/self/stat) over the host's cores: on a host with few cores
 * that, not one hash, bounds how soon the export can end.
 *
 * Usage: npm run bench:export [-- --runs N --virtual-gib G --data-mb M --rss-virtual-gib G]
 *
 * `--glance` (issue 15) runs instead the upload into a real Glance (a private one, as the tests start
 * it: python3-glance, file store, no keystone): a raw file of `--glance-mb` (default 1024) random
 * MiB uploaded by the agent's Glance store (its commit: PUT of the staged file with undici, sha512 as
 * it goes, then the GET that checks Glance's record), streamed by it (qemu-img convert of the file
 * into the store's NBD export, sent on in the PUT as it comes: an export that can be run again), and
 * `curl -T` of the same file (PUT, application/octet-stream) to the same Glance, each into a fresh
 * queued record; throughput of each and their ratios to curl's.
 */
import { spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import type { Config } from '../src/config/schema.js';
import { silentLogger } from '../src/log.js';
import { buildRuntime, type Runtime } from '../src/service/runtime.js';
import { SnapshotEngine } from '../src/snapshot/engine.js';
import { runProgram } from '../src/util/exec.js';
import { benchConfig } from './bench-config.js';
import { localStore } from '../src/image-store/image-store.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    'virtual-gib': { type: 'string', default: '4' },
    'data-mb': { type: 'string', default: '1024' },
    'rss-virtual-gib': { type: 'string', default: '16' },
    glance: { type: 'boolean', default: false },
    'glance-mb': { type: 'string', default: '1024' },
  },
});
const runs = Number(values.runs);
const virtualGib = Number(values['virtual-gib']);
const dataMb = Number(values['data-mb']);
const rssVirtualGib = Number(values['rss-virtual-gib']);
const MiB = 2 ** 20;
const GiB = 2 ** 30;
const EXTENTS = 4;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
const s = (ms: number) => (ms / 1000).toFixed(2);

async function run(program: string, args: string[]): Promise<number> {
  const t = performance.now();
  const r = await runProgram(program, args, { timeoutMs: 3_600_000 });
  if (r.code !== 0) throw new Error(`${program} ${args.join(' ')} failed: ${r.stderr}`);
  return performance.now() - t;
}

/** A shut-off instance whose disk holds `dataMb` of random data in EXTENTS extents spread over `virtualBytes`. */
async function makeInstance(rt: Runtime, base: string, virtualBytes: number): Promise<string> {
  const uuid = randomUUID();
  await rt.qemu!.createInstance({ uuid, name: `export-${virtualBytes / GiB}g`, memoryMb: 64, vcpus: 1, machine: 'pc', diskSizeBytes: virtualBytes });
  const raw = path.join(base, `fill-${uuid}.raw`);
  const fh = await fs.open(raw, 'w');
  try {
    await fh.truncate(virtualBytes);
    const extent = (dataMb * MiB) / EXTENTS;
    for (let e = 0; e < EXTENTS; e++) {
      const at = (e * virtualBytes) / EXTENTS;
      for (let off = 0; off < extent; off += 4 * MiB) await fh.write(randomBytes(Math.min(4 * MiB, extent - off)), 0, undefined, at + off);
    }
  } finally {
    await fh.close();
  }
  const disk = (await rt.hv.diskInfo(uuid)).path;
  await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'qcow2', raw, disk]);
  await fs.rm(raw);
  return uuid;
}

interface Export {
  imageId: string;
  stageMs: number;
  loopP99Ms: number;
  loopMaxMs: number;
  /** CPU time the export stage took on this host: this process's threads and its children's (qemu-img). */
  cpuMs: number;
}

/** /proc's clock ticks per second (USER_HZ: 100 on Linux, `getconf CLK_TCK`). */
const CLOCK_TICKS_PER_S = 100;

/**
 * CPU time so far of this process (all its threads: the event loop, the hash workers) and of its
 * children it has waited for (each qemu-img): /proc/self/stat utime, stime, cutime, cstime.
 */
async function cpuMsSoFar(): Promise<number> {
  const stat = await fs.readFile('/proc/self/stat', 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = [11, 12, 13, 14].reduce((n, i) => n + Number(f[i]), 0);
  return (ticks * 1000) / CLOCK_TICKS_PER_S;
}

/** One cold snapshot of the instance; the export stage and the event loop's delay meanwhile. */
async function exportOnce(rt: Runtime, uuid: string): Promise<Export> {
  let exportStart = NaN;
  let cpuStart: Promise<number> | undefined;
  const engine = new SnapshotEngine({
    hv: rt.hv,
    store: rt.store,
    lifecycle: rt.lifecycle,
    operations: rt.operations,
    log: silentLogger(),
    namePrefix: rt.config.snapshot.name_prefix,
    defaultStrategy: 'cold',
    beforeStep: (step) => {
      if (step.name === 'export-disk') {
        exportStart = performance.now();
        cpuStart = cpuMsSoFar();
        loop.reset();
      }
    },
  });
  const loop = monitorEventLoopDelay({ resolution: 5 });
  loop.enable();
  const res = await engine.take({ requestId: `bench-${randomUUID()}`, instanceUuid: uuid, imageId: randomUUID(), strategy: 'cold' });
  const stageMs = performance.now() - exportStart;
  const cpuMs = (await cpuMsSoFar()) - (await cpuStart!);
  loop.disable();
  if (res.status !== 'active') throw new Error(`snapshot ended ${res.status}`);
  return { imageId: res.image_id, stageMs, loopP99Ms: loop.percentile(99) / 1e6, loopMaxMs: loop.max / 1e6, cpuMs };
}

/** Runs `snapshot --strategy cold` of `uuid` in a CLI process; its peak RSS (VmHWM), sampled until it exits. */
async function cliExportRss(base: string, config: Config, uuid: string): Promise<{ peakMiB: number; ms: number }> {
  const cli = path.resolve(import.meta.dirname, '../dist/snapshot-driver.mjs');
  await fs.access(cli).catch(() => {
    throw new Error(`${cli} is missing: run \`npm run build\` first`);
  });
  const conf = path.join(base, 'rss.conf');
  await fs.writeFile(
    conf,
    [
      '[DEFAULT]',
      `instances_path = ${config.DEFAULT.instances_path}`,
      `state_path = ${config.DEFAULT.state_path}`,
      '[image_store]',
      `path = ${config.image_store.path}`,
      'reserved_space_mb = 0',
      '[snapshot]',
      'quiesce = off',
      '',
    ].join('\n'),
  );
  const t = performance.now();
  const child = spawn(process.execPath, [cli, '--config-file', conf, 'snapshot', uuid, '--strategy', 'cold', '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  let peakKiB = 0;
  const sample = async () => {
    const status = await fs.readFile(`/proc/${child.pid}/status`, 'utf8').catch(() => '');
    const m = /^VmHWM:\s+(\d+) kB/m.exec(status);
    if (m) peakKiB = Math.max(peakKiB, Number(m[1]));
  };
  const sampler = setInterval(() => void sample(), 100);
  const [code] = (await once(child, 'exit')) as [number | null];
  clearInterval(sampler);
  if (code !== 0) throw new Error(`snapshot command exited ${code}: ${err.slice(-2000)}`);
  const result = JSON.parse(out) as { image_id: string; status: string };
  if (result.status !== 'active') throw new Error(`snapshot command made an image ${result.status}`);
  return { peakMiB: peakKiB / 1024, ms: performance.now() - t };
}

/** The agent's Glance upload against curl -T of the same file to the same Glance. */
async function glanceUpload(): Promise<void> {
  const { GlanceServer } = await import('../test/helpers/glance.js');
  const { GlanceClient } = await import('../src/image-store/glance/client.js');
  const { GlanceImageStore } = await import('../src/image-store/glance/store.js');
  const { digestFile } = await import('../src/image-store/hash.js');
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'sdg-'));
  const g = await GlanceServer.start(path.join(base, 'glance'));
  try {
    const mb = Number(values['glance-mb']);
    const src = path.join(base, 'image.raw');
    const fh = await fs.open(src, 'w');
    for (let off = 0; off < mb * MiB; off += 4 * MiB) await fh.write(randomBytes(4 * MiB));
    await fh.close();
    const log = silentLogger();
    const client = new GlanceClient({ apiServers: [g.url], timeoutMs: 600_000, retries: 0, authStrategy: 'noauth', log });
    const store = new GlanceImageStore({ client, stagingPath: path.join(base, 'staging'), reservedSpaceMb: 0, osHashAlgo: 'sha512', log }).forRequest({ requestId: 'req-bench' });
    const rfh = await fs.open(src, 'r');
    const digests = await digestFile(rfh, 'sha512', {});
    await rfh.close();
    const queued = async () => {
      const id = randomUUID();
      await g.createQueued(id, 'bench');
      const r = await g.api('PATCH', `/v2/images/${id}`, [
        { op: 'add', path: '/disk_format', value: 'raw' },
        { op: 'add', path: '/container_format', value: 'bare' },
      ]);
      if (r.status !== 200) throw new Error(`PATCH: ${r.status} ${r.text}`);
      return id;
    };
    const ours: number[] = [];
    const streamed: number[] = [];
    const curl: number[] = [];
    for (let r = 0; r < runs; r++) {
      const a = await queued();
      await fs.mkdir(store.partialDir, { recursive: true });
      await fs.link(src, store.partialPath(a)); // the commit removes its staged file
      const t = performance.now();
      const image = await store.commit(a, { digests: Promise.resolve(digests) });
      ours.push(performance.now() - t);
      if (image.os_hash_value !== digests.osHash) throw new Error('the uploaded image does not hash as the file');
      await store.delete(a);
      // The streamed path (an export that can be run again): qemu-img writes into the store's NBD
      // export, which sends it on in the PUT as it comes (nothing staged), then the record is checked.
      const c = await queued();
      const t2 = performance.now();
      const sink = await store.receive(c, mb * MiB, log, { streamable: true });
      try {
        await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', '-n', '--target-is-zero', src, sink.nbdUri]);
        await sink.finish();
      } catch (err) {
        throw (await sink.abort(err)) as Error;
      }
      const streamedImage = await store.commit(c, { digests: sink.digests() });
      streamed.push(performance.now() - t2);
      if (streamedImage.os_hash_value !== digests.osHash) throw new Error('the streamed image does not hash as the file');
      await store.delete(c);
      const b = await queued();
      curl.push(await run('curl', ['-sS', '-f', '-o', '/dev/null', '-X', 'PUT', '-H', 'Content-Type: application/octet-stream', '-T', src, `${g.url}/v2/images/${b}/file`]));
      const done = await g.image(b);
      if (done?.os_hash_value !== digests.osHash) throw new Error(`curl's upload ended ${JSON.stringify(done?.status)}`);
      await g.api('DELETE', `/v2/images/${b}`);
      const mibs = (ms: number) => (mb / (ms / 1000)).toFixed(0);
      console.log(
        `run ${r + 1}: agent ${s(ours[r]!)} s (${mibs(ours[r]!)} MiB/s), streamed ${s(streamed[r]!)} s (${mibs(streamed[r]!)} MiB/s), curl -T ${s(curl[r]!)} s (${mibs(curl[r]!)} MiB/s)`,
      );
    }
    const [o, st, c] = [median(ours), median(streamed), median(curl)];
    console.log(`\nupload of ${mb} MiB into a local Glance (python3-glance 25, file store), ${runs} runs, medians`);
    console.log(`agent (undici PUT of the staged file, then the record checked against the export's hashes)  ${s(o)} s = ${(mb / (o / 1000)).toFixed(0)} MiB/s`);
    console.log(`agent streamed (qemu-img convert into the NBD export, sent on in the PUT as it comes, hashed on the way; then the record checked)  ${s(st)} s = ${(mb / (st / 1000)).toFixed(0)} MiB/s`);
    console.log(`curl -T (PUT, application/octet-stream)  ${s(c)} s = ${(mb / (c / 1000)).toFixed(0)} MiB/s`);
    console.log(`throughput ratio agent/curl ${(c / o).toFixed(2)}, streamed/curl ${(c / st).toFixed(2)}`);
    await client.close();
  } finally {
    await g.stop();
    await fs.rm(base, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  if (values.glance) return glanceUpload();
  const { base, config } = await benchConfig('sde-', 'off');
  const rt = buildRuntime(config, silentLogger());
  try {
    // Peak RSS: the agent's command line exporting the big disk, as an operator runs it (node
    // dist/snapshot-driver.mjs snapshot), its high-water mark read from /proc while it runs.
    const big = await makeInstance(rt, base, rssVirtualGib * GiB);
    const rss = await cliExportRss(base, config, big);
    await rt.qemu!.deleteInstance(big);

    const uuid = await makeInstance(rt, base, virtualGib * GiB);
    const disk = (await rt.hv.diskInfo(uuid)).path;
    const fig = { ours: [] as number[], md5: [] as number[], sha512: [] as number[], floor: [] as number[], pipeline: [] as number[], p99: [] as number[], max: [] as number[], cpu: [] as number[] };
    const cores = os.availableParallelism();
    for (let r = 0; r < runs; r++) {
      const ours = await exportOnce(rt, uuid);
      const image = localStore(rt.store).dataPath(ours.imageId);
      // The floor is what the hardware can do: the faster of two tries of each (this machine is noisy).
      const md5 = Math.min(await run('openssl', ['dgst', '-md5', image]), await run('openssl', ['dgst', '-md5', image]));
      const sha512 = Math.min(await run('openssl', ['dgst', '-sha512', image]), await run('openssl', ['dgst', '-sha512', image]));
      const out = path.join(base, 'pipeline.raw');
      const pipeline = (await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', disk, out])) + (await run('md5sum', [out])) + (await run('sha512sum', [out]));
      await fs.rm(out);
      await rt.store.delete(ours.imageId);
      fig.ours.push(ours.stageMs);
      fig.md5.push(md5);
      fig.sha512.push(sha512);
      fig.floor.push(Math.max(md5, sha512));
      fig.pipeline.push(pipeline);
      fig.p99.push(ours.loopP99Ms);
      fig.max.push(ours.loopMaxMs);
      fig.cpu.push(ours.cpuMs);
      console.log(
        `run ${r + 1}: export stage ${s(ours.stageMs)} s (CPU ${s(ours.cpuMs)} s), floor ${s(Math.max(md5, sha512))} s (md5 ${s(md5)}, sha512 ${s(sha512)}), pipeline ${s(pipeline)} s, loop p99 ${ours.loopP99Ms.toFixed(1)} ms`,
      );
    }
    const [ours, floor, pipeline] = [median(fig.ours), median(fig.floor), median(fig.pipeline)];
    console.log(`\n${virtualGib} GiB virtual disk, ${dataMb} MiB random data in ${EXTENTS} extents; ${runs} runs, medians`);
    console.log(`export stage (cold, export start → active)  ${s(ours)} s`);
    console.log(`floor = max(openssl md5 ${s(median(fig.md5))} s, sha512 ${s(median(fig.sha512))} s)  ${s(floor)} s   ratio ours/floor ${(ours / floor).toFixed(2)} (goal ≤ 1.10)`);
    // The one-core floor assumes a core free for each hash. Here the export's whole CPU time (qemu-img,
    // the receiver, both hashes) shares `cores` cores: it cannot end before that time / cores either.
    const cpu = median(fig.cpu);
    const coresFloor = Math.max(floor, cpu / cores);
    console.log(
      `the export's CPU time (this process's threads and qemu-img) ${s(cpu)} s on ${cores} cores: floor on this host = max(one-core floor, ${s(cpu)} / ${cores}) ${s(coresFloor)} s   ratio ours/that ${(ours / coresFloor).toFixed(2)}`,
    );
    console.log(`shell pipeline (convert; md5sum; sha512sum)  ${s(pipeline)} s   ratio pipeline/ours ${(pipeline / ours).toFixed(2)} (goal ≥ 3)`);
    console.log(`event-loop delay during the export stage: p99 ${median(fig.p99).toFixed(1)} ms, max ${median(fig.max).toFixed(1)} ms (goal p99 < 20)`);
    console.log(`peak RSS of \`snapshot --strategy cold\` of a ${rssVirtualGib} GiB virtual disk: ${rss.peakMiB.toFixed(0)} MiB (VmHWM; the whole command took ${s(rss.ms)} s) (goal ≤ 150)`);
  } finally {
    await fs.rm(base, { recursive: true, force: true });
  }
}

await main();
