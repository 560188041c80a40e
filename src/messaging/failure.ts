/**
 * oslo failures: what a reply's `failure` field holds when the call raised
 * (oslo_messaging/_drivers/common.py serialize_remote_exception / deserialize_remote_exception).
 *
 * The Python client rebuilds the exception class only when `module` is "builtins" or listed in its
 * `allowed_remote_exmods`; for any other module it raises `oslo_messaging.RemoteError` whose
 * `exc_type` is our `class`. So:
 * - NoSuchMethod and UnsupportedVersion go out as oslo's own classes (module
 *   `oslo_messaging.rpc.dispatcher`, args `[message]`, exactly what an oslo server sends): a client
 *   allowing that module gets the real exception, any other gets RemoteError("NoSuchMethod", …).
 * - Every other error goes out with module `snapshot_driver.errors` and class = its stable `name`
 *   (InvalidArgument, InstanceNotFound, …): Python clients see RemoteError naming the class.
 *   Never "builtins": a JS TypeError is not Python's.
 */
import { errorMessage, errorName, NoSuchMethod, UnsupportedVersion } from '../errors.js';

export const OSLO_DISPATCHER_MODULE = 'oslo_messaging.rpc.dispatcher';
export const DRIVER_ERRORS_MODULE = 'snapshot_driver.errors';

/** The decoded form of a failure string. */
export interface OsloFailure {
  class: string;
  module: string;
  message: string;
  /** Traceback lines, each ending in "\n" (Python's traceback.format_exception). */
  tb: string[];
  args: unknown[];
  kwargs: Record<string, unknown>;
}

export function toOsloFailure(err: unknown): OsloFailure {
  const message = errorMessage(err);
  const isOsloClass = err instanceof NoSuchMethod || err instanceof UnsupportedVersion;
  return {
    class: errorName(err),
    module: isOsloClass ? OSLO_DISPATCHER_MODULE : DRIVER_ERRORS_MODULE,
    message,
    tb: traceback(err),
    args: [message],
    kwargs: {},
  };
}

/** The JSON string that goes into a reply's `failure`. */
export function serializeFailure(err: unknown): string {
  return JSON.stringify(toOsloFailure(err));
}

/** Parses a reply's `failure` string (for clients and tests); throws on anything that is not one. */
export function parseFailure(s: string): OsloFailure {
  const f: unknown = JSON.parse(s);
  if (typeof f !== 'object' || f === null || Array.isArray(f)) throw new Error('failure is not a JSON object');
  const o = f as Record<string, unknown>;
  if (typeof o.class !== 'string' || typeof o.module !== 'string' || typeof o.message !== 'string') {
    throw new Error('failure lacks class, module or message');
  }
  return {
    class: o.class,
    module: o.module,
    message: o.message,
    tb: Array.isArray(o.tb) ? o.tb.map(String) : [],
    args: Array.isArray(o.args) ? o.args : [],
    kwargs: typeof o.kwargs === 'object' && o.kwargs !== null ? (o.kwargs as Record<string, unknown>) : {},
  };
}

function traceback(err: unknown): string[] {
  const stack = err instanceof Error && typeof err.stack === 'string' ? err.stack : `${errorName(err)}: ${errorMessage(err)}`;
  return stack.split('\n').map((line) => `${line}\n`);
}
