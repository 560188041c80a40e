import fs from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../log.js';
import type { Hypervisor } from '../hypervisor/types.js';
import { writeFileAtomic } from '../util/durable-fs.js';
import { isUuid } from '../util/uuid.js';
import { InvalidInstanceId } from '../errors.js';

/**
 * Internal snapshots left on a disk by `deferred-delete`, to be deleted at the next moment the guest's
 * QEMU process is gone (SPEC §3). One small JSON file per instance under `<state_path>/pending/`.
 */
export class PendingSnapshots {
  constructor(private readonly dir: string) {}

  private file(uuid: string): string {
    if (!isUuid(uuid)) throw new InvalidInstanceId(uuid);
    return path.join(this.dir, `${uuid}.json`);
  }

  async list(uuid: string): Promise<string[]> {
    let text: string;
    try {
      text = await fs.readFile(this.file(uuid), 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const parsed = JSON.parse(text) as { snapshots?: unknown };
    return Array.isArray(parsed.snapshots) ? parsed.snapshots.filter((s): s is string => typeof s === 'string') : [];
  }

  private async save(uuid: string, names: string[]): Promise<void> {
    if (names.length === 0) {
      await fs.rm(this.file(uuid), { force: true });
      return;
    }
    await fs.mkdir(this.dir, { recursive: true, mode: 0o750 });
    await writeFileAtomic(this.file(uuid), `${JSON.stringify({ snapshots: names })}\n`, { mode: 0o640 });
  }

  /** Pending snapshots of every instance (the records on disk, whichever process wrote them). */
  async count(): Promise<number> {
    let files: string[];
    try {
      files = await fs.readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
      throw err;
    }
    let n = 0;
    for (const file of files) {
      const uuid = file.endsWith('.json') ? file.slice(0, -'.json'.length) : '';
      // Temp files of an atomic write, or anything else, are not records.
      if (isUuid(uuid)) n += (await this.list(uuid)).length;
    }
    return n;
  }

  async add(uuid: string, name: string): Promise<void> {
    const names = await this.list(uuid);
    if (!names.includes(name)) await this.save(uuid, [...names, name]);
  }

  async remove(uuid: string, name: string): Promise<void> {
    const names = await this.list(uuid);
    if (names.includes(name)) await this.save(uuid, names.filter((n) => n !== name));
  }

  /**
   * Deletes every pending snapshot of the instance from its disk. Only call while no QEMU process
   * holds the disk (the hypervisor refuses otherwise: SPEC §2).
   */
  async deleteAll(hv: Hypervisor, uuid: string, log: Logger): Promise<string[]> {
    const names = await this.list(uuid);
    if (names.length === 0) return [];
    const onDisk = new Set((await hv.listInternalSnapshots(uuid)).map((s) => s.name));
    for (const name of names) {
      if (onDisk.has(name)) {
        await hv.offlineSnapshotDelete(uuid, name);
        log.info({ snapshot: name }, 'deleted pending internal snapshot');
      }
      await this.remove(uuid, name);
    }
    return names;
  }
}
