import { fileURLToPath } from 'node:url';
import { runProgram } from '../../src/util/exec.js';

/**
 * A real RabbitMQ for integration tests, through scripts/rabbitmq.sh (Debian's rabbitmq-server,
 * no systemd, 127.0.0.1:5672, guest/guest). Nothing here skips: when RabbitMQ cannot run, the
 * test fails with the script's output.
 *
 * The broker is shared by every test file; restartRabbit() drops every file's connections, so a
 * file that restarts it must only hold connections that are meant to survive a restart.
 */

const SCRIPT = fileURLToPath(new URL('../../scripts/rabbitmq.sh', import.meta.url));
export const RABBIT_HOST = '127.0.0.1';
export const RABBIT_PORT = 5672;

async function rabbitmqScript(args: string[], timeoutMs = 180_000): Promise<void> {
  const res = await runProgram('bash', [SCRIPT, ...args], { timeoutMs }).catch((err: Error) => {
    throw new Error(`scripts/rabbitmq.sh ${args.join(' ')} could not run: ${err.message}`);
  });
  if (res.code !== 0) {
    throw new Error(
      `RabbitMQ is required by this test and scripts/rabbitmq.sh ${args.join(' ')} failed (exit ${res.code}); ` +
        `install it with scripts/setup.sh.\n${res.stdout}${res.stderr}`,
    );
  }
}

/** Starts RabbitMQ unless it runs already; resolves with the URL of its default vhost. */
export async function ensureRabbit(): Promise<string> {
  await rabbitmqScript(['start']);
  return `rabbit://guest:guest@${RABBIT_HOST}:${RABBIT_PORT}/`;
}

/**
 * Stops RabbitMQ (its process exits) and starts it again: every connection of every test file is
 * dropped, and non-durable queues are gone. To test a lost connection without disturbing other
 * files, closeRabbitConnections(vhost) is enough.
 */
export async function restartRabbit(): Promise<void> {
  await rabbitmqScript(['restart']);
}

/**
 * Stops RabbitMQ (its process exits): every connection of every test file is lost until
 * ensureRabbit() starts it again. Only for files in vitest.config.ts's BROKER_RESTARTS.
 */
export async function stopRabbit(): Promise<void> {
  await rabbitmqScript(['stop']);
}

/** Creates (if needed) a vhost where guest has every right; resolves with its URL. */
export async function createRabbitVhost(name: string): Promise<string> {
  await rabbitmqScript(['vhost', name]);
  return `rabbit://guest:guest@${RABBIT_HOST}:${RABBIT_PORT}/${encodeURIComponent(name)}`;
}

export async function deleteRabbitVhost(name: string): Promise<void> {
  await rabbitmqScript(['delete-vhost', name]);
}

/** Closes every client connection to one vhost (the broker keeps running, queues stay). */
export async function closeRabbitConnections(vhost: string): Promise<void> {
  await rabbitmqScript(['close-connections', vhost]);
}
