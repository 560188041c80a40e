import type { Command } from 'commander';
import { startAgent } from '../service/agent.js';
import type { RuntimeFactory } from '../service/runtime.js';

/** `serve`: the RPC server, until SIGTERM or SIGINT (then it finishes running operations and exits). */
export function registerServeCommand(program: Command, runtime: RuntimeFactory): void {
  program
    .command('serve')
    .description('run the agent: serve snapshot and lifecycle RPCs from the message queue')
    .action(async () => {
      const rt = await runtime();
      // Listening before the agent starts: a SIGTERM right after "agent serving" must stop it
      // cleanly, not kill it with the default disposition.
      const stopSignal = new Promise<NodeJS.Signals>((resolve) => {
        process.once('SIGTERM', () => resolve('SIGTERM'));
        process.once('SIGINT', () => resolve('SIGINT'));
      });
      const agent = await startAgent(rt);
      const signal = await stopSignal;
      rt.log.info({ signal }, 'stopping: waiting for running operations');
      await agent.stop();
      rt.log.info('stopped');
    });
}
