#!/usr/bin/env node
import { Command, CommanderError } from 'commander';
import { loadConfig } from '../config/load.js';
import { buildRuntime, type RuntimeFactory } from '../service/runtime.js';
import { pinProcess } from '../util/affinity.js';
import { errorMessage, SnapshotDriverError } from '../errors.js';
import { createLogger } from '../log.js';
import { registerCleanupCommand } from './cleanup-command.js';
import { registerDemoCommand } from './demo-command.js';
import { registerImagesCommands } from './images-command.js';
import { registerInstancesCommands } from './instances-command.js';
import { registerServeCommand } from './serve-command.js';
import { registerSnapshotCommand } from './snapshot-command.js';

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

export function buildProgram(): Command {
  const program = new Command('snapshot-driver')
    .description('Snapshots QEMU guests with qcow2 disks into an image store (a local folder or Glance)')
    .option('--config-file <file>', 'config file (repeatable; later files override)', collect, [])
    .showHelpAfterError()
    .exitOverride();

  const runtime: RuntimeFactory = async () => {
    const files = program.opts<{ configFile: string[] }>().configFile;
    const config = await loadConfig(files);
    const log = createLogger({ level: config.DEFAULT.debug ? 'debug' : undefined });
    // Before any thread the runtime starts: each inherits its creator's affinity.
    if (config.DEFAULT.agent_cpus) await pinProcess(process.pid, config.DEFAULT.agent_cpus);
    return buildRuntime(config, log);
  };

  registerServeCommand(program, runtime);
  registerSnapshotCommand(program, runtime);
  registerInstancesCommands(program, runtime);
  registerImagesCommands(program, runtime);
  registerCleanupCommand(program, runtime);
  registerDemoCommand(program);
  // Subcommands inherit exitOverride and error output settings.
  for (const cmd of program.commands) cmd.exitOverride();
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return process.exitCode === undefined ? 0 : Number(process.exitCode);
  } catch (err) {
    if (err instanceof CommanderError) {
      // Help and version are not errors; everything else commander throws is bad usage.
      return err.exitCode === 0 ? 0 : 2;
    }
    if (err instanceof SnapshotDriverError) {
      process.stderr.write(`snapshot-driver: ${err.name}: ${err.message}\n`);
      return err.exitCode;
    }
    process.stderr.write(`snapshot-driver: ${errorMessage(err)}\n`);
    return 1;
  }
}

main(process.argv).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`snapshot-driver: ${errorMessage(err)}\n`);
    process.exitCode = 1;
  },
);
