/**
 * Issue 12 item 2, on real QEMU guests: a `snapshot` command interrupted while the guest is
 * managed-saved undoes the snapshot itself (guest running again, image killed, nothing left in the
 * journal) and exits 128+signo; and one killed outright (SIGKILL: nothing to undo with) beside a
 * serving agent is recovered by that agent, which is not restarted.
 *
 * The moment is found, not waited for: the command is stopped (SNAPSHOT_DRIVER_FAULT=stop:<point>,
 * SIGSTOP) right before its export step acts, after its managed save; the test sees it stopped in
 * /proc, checks the guest is saved, signals it, and lets it continue (SIGCONT).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentProcess } from '../helpers/agent.js';
import { cliJson } from '../helpers/cli.js';
import { makeCrashBench, type CrashBench } from '../helpers/crash-matrix.js';
import { CLI_ENTRY } from '../helpers/entry.js';

/** The CLI under test (default: the built one; SD_TEST_CLI lets a build of another tree be tried). */
const CLI = process.env.SD_TEST_CLI ?? CLI_ENTRY;
/** `cold`'s steps: quiesce, suspend, export-disk, resume, thaw. Stopped here, the guest is saved. */
const STOP_WHILE_SAVED = 'stop:step:2:export-disk';

let bench: CrashBench;

beforeAll(async () => {
  bench = await makeCrashBench('interrupt', ['cold']);
});

afterAll(async () => {
  await bench?.close();
});

interface Cli {
  child: ChildProcess;
  done: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>;
}

function spawnCli(args: readonly string[], env: NodeJS.ProcessEnv = {}): Cli {
  const child = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stdout!.resume();
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stderr }));
  });
  return { child, done };
}

/** Resolves once the process is stopped (state T in /proc); rejects if it exits first. */
async function stopped(cli: Cli): Promise<void> {
  let exited = false;
  void cli.done.then(() => (exited = true));
  const deadline = Date.now() + 120_000;
  for (;;) {
    const stat = await fs.readFile(`/proc/${cli.child.pid}/stat`, 'utf8').catch(() => '');
    if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('T')) return;
    if (exited) throw new Error(`the command exited before its stop point: ${(await cli.done).stderr}`);
    if (Date.now() > deadline) throw new Error('the command never reached its stop point');
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function stateOf(uuid: string): Promise<string | undefined> {
  const list = (await cliJson(bench.confs.get('cold')!, ['instances', 'list'])) as { uuid: string; state: string }[];
  return list.find((i) => i.uuid === uuid)?.state;
}

async function operationRecords(): Promise<string[]> {
  return fs.readdir(path.join(bench.stateDir, 'operations')).catch(() => []);
}

/** A `snapshot` command of the guest, stopped right before its export, the guest managed-saved. */
async function snapshotStoppedWhileSaved(uuid: string, imageId: string): Promise<Cli> {
  const cli = spawnCli(['--config-file', bench.confs.get('cold')!, 'snapshot', uuid, '--image-id', imageId, '--json'], { SNAPSHOT_DRIVER_FAULT: STOP_WHILE_SAVED });
  await stopped(cli);
  expect(await stateOf(uuid)).toBe('saved');
  const record = JSON.parse(await fs.readFile(path.join(bench.stateDir, 'operations', `${imageId}.json`), 'utf8')) as Record<string, unknown>;
  expect(record).toMatchObject({ image_id: imageId, phase: 'run', step_index: 2, owner: { pid: cli.child.pid } });
  return cli;
}

async function expectUndone(uuid: string, imageId: string): Promise<void> {
  expect(await stateOf(uuid)).toBe('running');
  expect(await cliJson(bench.confs.get('cold')!, ['images', 'show', imageId])).toMatchObject({ status: 'killed' });
  await expect(fs.access(path.join(bench.imagesDir, imageId))).rejects.toThrow();
  await expect(fs.access(path.join(bench.imagesDir, '.partial', imageId))).rejects.toThrow();
  expect(await operationRecords()).toEqual([]);
  expect((await bench.qemuImg.snapshotList(bench.diskOf(uuid))).map((s) => s.name)).toEqual([]);
}

describe('a snapshot command interrupted while the guest is managed-saved', () => {
  it('SIGTERM: it undoes the snapshot (guest running, image killed, no record) and exits 143', async () => {
    const uuid = await bench.guest('cold', 'running');
    const imageId = randomUUID();
    const cli = await snapshotStoppedWhileSaved(uuid, imageId);
    process.kill(cli.child.pid!, 'SIGTERM');
    process.kill(cli.child.pid!, 'SIGCONT');
    const res = await cli.done;
    expect({ code: res.code, signal: res.signal }, res.stderr).toEqual({ code: 128 + 15, signal: null });
    expect(res.stderr).toContain('snapshot-driver: SIGTERM: the snapshot was interrupted and undone');
    await expectUndone(uuid, imageId);
    // And the instance is free: the next snapshot goes through.
    expect(await cliJson(bench.confs.get('cold')!, ['snapshot', uuid])).toMatchObject({ status: 'active' });
  });

  it('SIGHUP with its terminal gone (stdout and stderr closed): it still undoes everything, and exits 129', async () => {
    const uuid = await bench.guest('cold', 'running');
    const imageId = randomUUID();
    const cli = await snapshotStoppedWhileSaved(uuid, imageId);
    // Its output now goes nowhere: every write it makes fails (EPIPE), as on a hung-up terminal.
    cli.child.stdout!.destroy();
    cli.child.stderr!.destroy();
    process.kill(cli.child.pid!, 'SIGHUP');
    process.kill(cli.child.pid!, 'SIGCONT');
    const res = await cli.done;
    expect({ code: res.code, signal: res.signal }).toEqual({ code: 128 + 1, signal: null });
    await expectUndone(uuid, imageId);
  });
});

describe('a snapshot command killed outright beside a serving agent', () => {
  it('SIGKILL while the guest is saved: the serving agent notices and recovers it, without a restart', async () => {
    const uuid = await bench.guest('cold', 'running');
    const conf = bench.confs.get('cold')!;
    const agent = new AgentProcess(spawn(process.execPath, [CLI, '--config-file', conf, 'serve'], { stdio: ['ignore', 'pipe', 'pipe'] }));
    bench.agents.push(agent);
    await agent.waitForLog('agent serving');
    const imageId = randomUUID();
    const cli = await snapshotStoppedWhileSaved(uuid, imageId);
    // A record under way in a live process is left alone by the agent; this one now dies with it.
    process.kill(cli.child.pid!, 'SIGKILL');
    expect(await cli.done).toMatchObject({ code: null, signal: 'SIGKILL' });
    expect(await stateOf(uuid)).toBe('saved');

    await agent.waitForLog('interrupted snapshot recovered', { image_id: imageId }, { timeoutMs: 120_000 });
    expect(agent.exitStatus).toBeUndefined(); // the same agent, still serving
    await expectUndone(uuid, imageId);
    expect(await agent.stop()).toEqual({ code: 0, signal: null });
  });
});
