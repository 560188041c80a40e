import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../helpers/cli.js';
import { dir } from 'tmp-promise';
import { assertQemuInstalled, killQemuUnder } from '../helpers/qemu-guest.js';

let base: string;
let conf: string;

/** Every file under the test folder, to show that bad input wrote nothing. */
async function tree(): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string) => {
    for (const e of await fs.readdir(d, { withFileTypes: true }).catch(() => [])) {
      const p = path.join(d, e.name);
      out.push(path.relative(base, p));
      if (e.isDirectory()) await walk(p);
    }
  };
  await walk(base);
  return out.sort();
}

beforeAll(async () => {
  await assertQemuInstalled();
  base = (await dir({ prefix: 'sdc-' })).path;
  conf = path.join(base, 'agent.conf');
  // Relative paths resolve against the config file's folder.
  await fs.writeFile(
    conf,
    [
      '[DEFAULT]',
      'instances_path = i',
      'state_path = s',
      '[hypervisor]',
      'accel = tcg',
      'shutdown_timeout = 1',
      '[image_store]',
      'path = images',
      'reserved_space_mb = 0',
      '',
    ].join('\n'),
  );
});

afterAll(async () => {
  await killQemuUnder(base);
  await fs.rm(base, { recursive: true, force: true });
});

describe('CLI end to end on a real guest', () => {
  it('creates a guest, snapshots it with --json, lists, verifies, shows and deletes the image', async () => {
    const uuid = randomUUID();
    const created = await runCli(['--config-file', conf, 'instances', 'create', '--name', 'cli-guest', '--uuid', uuid, '--disk-size', '64M', '--start']);
    expect(created.code).toBe(0);
    expect(created.stderr).not.toMatch(/"level":(40|50|60)/); // no warning or error logged
    expect(created.stdout.trim()).toBe(uuid);

    const list = await runCli(['--config-file', conf, 'instances', 'list', '--json']);
    expect(list.code).toBe(0);
    expect(JSON.parse(list.stdout)).toEqual([{ uuid, name: 'cli-guest', state: 'running' }]);

    const imageId = randomUUID();
    const snap = await runCli(['--config-file', conf, 'snapshot', uuid, '--image-id', imageId, '--strategy', 'double-suspend', '--json']);
    expect(snap.code).toBe(0);
    const result = JSON.parse(snap.stdout) as Record<string, unknown>;
    expect(Object.keys(result).sort()).toEqual(
      ['checksum', 'downtime_ms', 'duration_ms', 'freeze_ms', 'image_id', 'internal_snapshots', 'os_hash_algo', 'os_hash_value', 'quiesced', 'size', 'status', 'strategy'].sort(),
    );
    expect(result).toMatchObject({ image_id: imageId, status: 'active', strategy: 'double-suspend', size: 64 * 2 ** 20, os_hash_algo: 'sha512', internal_snapshots: 0 });
    // Every log line of the operation carries request_id and instance_uuid.
    const opLines = snap.stderr.split('\n').filter((l) => l.includes('"image_id"')).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(opLines.length).toBeGreaterThan(0);
    for (const line of opLines) {
      expect(line.instance_uuid).toBe(uuid);
      expect(String(line.request_id)).toMatch(/^req-/);
    }

    const verify = await runCli(['--config-file', conf, 'images', 'verify', imageId, '--json']);
    expect(verify.code).toBe(0);
    expect(JSON.parse(verify.stdout)).toMatchObject({ ok: true, checksum: result.checksum, os_hash_value: result.os_hash_value });

    const show = await runCli(['--config-file', conf, 'images', 'show', imageId, '--json']);
    expect(JSON.parse(show.stdout)).toMatchObject({ id: imageId, status: 'active', disk_format: 'raw', properties: { instance_uuid: uuid, image_type: 'snapshot' } });

    const images = await runCli(['--config-file', conf, 'images', 'list', '--json']);
    expect((JSON.parse(images.stdout) as { id: string }[]).map((i) => i.id)).toEqual([imageId]);

    // Tamper with the data: verify says so, with exit code 1.
    const data = path.join(base, 'images', imageId);
    const fh = await fs.open(data, 'r+');
    await fh.write(Buffer.from([0xff]), 0, 1, 12345);
    await fh.close();
    const bad = await runCli(['--config-file', conf, 'images', 'verify', imageId, '--json']);
    expect(bad.code).toBe(1);
    expect(JSON.parse(bad.stdout)).toMatchObject({ ok: false });

    expect((await runCli(['--config-file', conf, 'images', 'delete', imageId])).code).toBe(0);
    const gone = await runCli(['--config-file', conf, 'images', 'show', imageId]);
    expect(gone.code).toBe(1);
    expect(gone.stderr).toMatch(/ImageNotFound/);

    const stop = await runCli(['--config-file', conf, 'instances', 'stop', uuid, '--force']);
    expect(stop.code).toBe(0);
    expect(stop.stdout.trim()).toBe(`${uuid} shutoff`);
  });
});

describe('CLI bad input: a clear message, the right exit code, nothing written', () => {
  const cases: [string, () => string[], number, RegExp][] = [
    ['a non-UUID image id', () => ['--config-file', conf, 'snapshot', randomUUID(), '--image-id', 'not-a-uuid'], 2, /invalid image id "not-a-uuid"/],
    ['a path as image id', () => ['--config-file', conf, 'snapshot', randomUUID(), '--image-id', '../x'], 2, /invalid image id "\.\.\/x"/],
    ['a non-UUID instance', () => ['--config-file', conf, 'snapshot', '../../etc/passwd'], 2, /invalid instance uuid/],
    ['an unknown instance', () => ['--config-file', conf, 'snapshot', '11111111-2222-4333-8444-555555555555'], 1, /InstanceNotFound: instance 11111111-2222-4333-8444-555555555555 not found/],
    ['an unknown strategy', () => ['--config-file', conf, 'snapshot', randomUUID(), '--strategy', 'yolo'], 2, /unknown snapshot strategy "yolo": expected one of cold/],
    ['a missing config file', () => ['--config-file', path.join(base, 'nope.conf'), 'instances', 'list'], 2, /cannot read config file .*nope\.conf/],
    ['an unknown command', () => ['--config-file', conf, 'snapshots'], 2, /unknown command 'snapshots'/],
    ['a missing argument', () => ['--config-file', conf, 'images', 'show'], 2, /missing required argument 'id'/],
  ];
  it.each(cases)('%s', async (_name, args, code, message) => {
    const before = await tree();
    const r = await runCli(args());
    expect(r.stderr).toMatch(message);
    expect(r.code).toBe(code);
    expect(r.stdout).toBe('');
    expect(await tree()).toEqual(before);
  });

  it('a malformed config file and a misspelled option: exit 2, naming file, line and option', async () => {
    const bad = path.join(base, 'bad.conf');
    await fs.writeFile(bad, '[snapshot]\nstratgy = cold\nthis line has no equals sign\n');
    const before = await tree();
    const r = await runCli(['--config-file', bad, 'instances', 'list']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/bad\.conf:3/);
    expect(r.stderr).toMatch(/\[snapshot\] stratgy .*unknown option \(did you mean "strategy"\?\)/);
    expect(await tree()).toEqual(before);
  });
});
