import type { Command } from 'commander';
import { InvalidInstanceId } from '../errors.js';
import { processHoldsDisk } from '../hypervisor/types.js';
import { isUuid } from '../util/uuid.js';
import type { RuntimeFactory } from './main.js';
import { printTable } from './output.js';

export function registerCleanupCommand(program: Command, runtime: RuntimeFactory): void {
  program
    .command('cleanup [uuid]')
    .description('delete the pending internal snapshots that the safety rule allows now (guests with no QEMU process)')
    .action(async (uuid: string | undefined) => {
      if (uuid !== undefined && !isUuid(uuid)) throw new InvalidInstanceId(uuid);
      const rt = await runtime();
      const targets = uuid !== undefined ? [await rt.hv.info(uuid)] : await rt.hv.list();
      const rows: string[][] = [];
      for (const inst of targets) {
        const deleted = await rt.lifecycle.deletePendingIfOffline(inst.uuid);
        const waiting = processHoldsDisk(inst.state) ? await rt.pending.list(inst.uuid) : [];
        rows.push([inst.uuid, inst.state, deleted.join(' ') || '-', waiting.join(' ') || '-']);
      }
      printTable(['uuid', 'state', 'deleted', 'pending (guest running)'], rows);
    });
}
