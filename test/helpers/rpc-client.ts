/** The oslo-style RPC client lives in src (the demo uses it too); tests import it from here. */
export * from '../../src/messaging/rpc-client.js';
export { RpcClient as TestRpcClient } from '../../src/messaging/rpc-client.js';
