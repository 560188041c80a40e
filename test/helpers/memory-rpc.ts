import { randomUUID } from 'node:crypto';
import { pino } from 'pino';
import { RpcServer, type RpcServerDeps } from '../../src/messaging/rpc-server.js';
import { openMemoryBus } from '../../src/messaging/transport/memory-bus.js';
import { TestRpcClient } from './rpc-client.js';

/**
 * The agent's RPC server for a target on a fresh vhost of the in-memory broker, started, and a client
 * of it as nova's (exchange `nova`, topic `compute`, version 6.0). What closes them goes into
 * `cleanups`, to be run last-in first-out.
 */
export async function serveOnMemoryBus(
  deps: Omit<RpcServerDeps, 'bus' | 'controlExchange'>,
  cleanups: Array<() => Promise<unknown>>,
): Promise<{ server: RpcServer; client: TestRpcClient }> {
  const vhost = `/rpc-${randomUUID()}`;
  const bus = openMemoryBus(vhost, pino({ level: 'silent' }));
  cleanups.push(async () => bus.close());
  const server = new RpcServer({ ...deps, bus, controlExchange: 'nova' });
  await server.start();
  cleanups.push(() => server.stop());
  const clientBus = openMemoryBus(vhost, pino({ level: 'silent' }));
  cleanups.push(async () => clientBus.close());
  const client = await new TestRpcClient(clientBus, { exchange: 'nova', topic: 'compute', version: '6.0' }).open();
  cleanups.push(async () => client.close());
  return { server, client };
}
