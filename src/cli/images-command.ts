import type { Command } from 'commander';
import type { RuntimeFactory } from '../service/runtime.js';
import { printJson, printTable } from './output.js';
import { progressReporter } from './progress.js';

export function registerImagesCommands(program: Command, runtime: RuntimeFactory): void {
  const images = program.command('images').description('the image store ([image_store] backend: the local folder or Glance)');

  images
    .command('list')
    .option('--json', 'print JSON')
    .action(async (opts: { json?: boolean }) => {
      const { store } = await runtime();
      const list = await store.list();
      if (opts.json) return printJson(list);
      printTable(
        ['id', 'name', 'status', 'size', 'instance_uuid', 'created_at'],
        list.map((i) => [i.id, i.name, i.status, i.size, i.properties.instance_uuid, i.created_at]),
      );
    });

  images
    .command('show <id>')
    .option('--json', 'print JSON')
    .action(async (id: string, opts: { json?: boolean }) => {
      const { store } = await runtime();
      const image = await store.show(id);
      if (opts.json) return printJson(image);
      printTable(['field', 'value'], Object.entries(image).map(([k, v]) => [k, typeof v === 'object' && v !== null ? JSON.stringify(v) : v]));
    });

  images
    .command('verify <id>')
    .description('recompute both checksums and compare them with the metadata (exit 1 on a mismatch)')
    .option('--json', 'print JSON')
    .action(async (id: string, opts: { json?: boolean }) => {
      const rt = await runtime();
      const progress = progressReporter(rt.log);
      const result = await rt.store.verify(id, { onProgress: (f) => progress.onProgress('verify', f) });
      progress.stop();
      if (opts.json) printJson({ id, ...result });
      else printTable(['field', 'value'], Object.entries({ id, ...result }));
      if (!result.ok) process.exitCode = 1;
    });

  images
    .command('delete <id>')
    .action(async (id: string) => {
      const { store } = await runtime();
      await store.delete(id);
    });
}
