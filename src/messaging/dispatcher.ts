/**
 * The checks oslo's RPCDispatcher.dispatch makes before calling an endpoint, in its order, plus
 * the target's own argument validation:
 * 1. namespace and version: a request for another namespace, another major version or a higher
 *    minor (or revision) than served → UnsupportedVersion (oslo raises UnsupportedVersion for a
 *    namespace mismatch too: no endpoint was compatible);
 * 2. a method the target does not serve, or a private one (`_…`) → NoSuchMethod;
 * 3. target.validate(method, args): a typed error naming the bad argument.
 * The messages start with oslo's own words (then say what is served), so logs and Python clients read alike.
 */
import { NoSuchMethod, UnsupportedVersion } from '../errors.js';
import { isVersionCompatible, shown } from './envelope.js';
import type { RpcRequest, RpcTarget } from './rpc-types.js';

export function checkRequest(target: RpcTarget, request: RpcRequest): void {
  const { method, version } = request;
  const namespace = request.namespace ?? undefined;
  if (namespace !== (target.namespace ?? undefined)) {
    throw new UnsupportedVersion(
      `Endpoint does not support RPC version ${version}. Attempted method: ${method}` +
        ` (namespace ${shown(namespace ?? null)}, served: ${shown(target.namespace ?? null)})`,
    );
  }
  if (!isVersionCompatible(target.version, version)) {
    throw new UnsupportedVersion(
      `Endpoint does not support RPC version ${version}. Attempted method: ${method}` +
        ` (served: ${target.version})`,
    );
  }
  // oslo's DefaultRPCAccessPolicy: private methods are never dispatched.
  if (method.startsWith('_') || !target.methods.has(method)) {
    throw new NoSuchMethod(`Endpoint does not support RPC method ${method}`);
  }
  target.validate(method, request.args);
}
