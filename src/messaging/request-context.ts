import { randomUUID } from 'node:crypto';
import type { RpcContext, RpcRequest } from './rpc-types.js';

function nonEmptyString(v: unknown): string | undefined {
  return typeof v === 'string' && v.length > 0 ? v : undefined;
}

/**
 * A caller's request id goes on every log line of its operation: one that is not 1 to 255 printable
 * ASCII characters (nova's are `req-<uuid>`) is replaced by a made-up one rather than logged.
 */
function usableRequestId(v: unknown): string | undefined {
  return typeof v === 'string' && /^[\x21-\x7e]{1,255}$/.test(v) ? v : undefined;
}

/**
 * The caller's context (oslo.context RequestContext.to_dict keys): request_id, user_id (or user),
 * project_id (or tenant / project). A request without a request id gets one made up, in nova's form.
 */
export function requestContext(request: RpcRequest): RpcContext {
  const c = request.context;
  const userId = nonEmptyString(c.user_id) ?? nonEmptyString(c.user);
  const projectId = nonEmptyString(c.project_id) ?? nonEmptyString(c.tenant) ?? nonEmptyString(c.project);
  return {
    requestId: usableRequestId(c.request_id) ?? `req-${randomUUID()}`,
    ...(userId !== undefined && { userId }),
    ...(projectId !== undefined && { projectId }),
    raw: c,
  };
}

/**
 * The uuid of `args.instance`: a nova object primitive (`nova_object.data.uuid`) or a plain
 * `{"uuid": …}`. Undefined when there is none; validating it is the target's job.
 */
export function instanceUuidOf(args: Record<string, unknown>): string | undefined {
  const instance = args.instance;
  if (typeof instance !== 'object' || instance === null) return undefined;
  const o = instance as Record<string, unknown>;
  const data = o['nova_object.data'];
  const holder = typeof data === 'object' && data !== null ? (data as Record<string, unknown>) : o;
  return nonEmptyString(holder.uuid);
}

/** The request, with a made-up `request_id` (req-<uuid>, nova's form) in its context if it had none (or an unusable one). */
export function withRequestId(request: RpcRequest): RpcRequest {
  if (usableRequestId(request.context.request_id) !== undefined) return request;
  return { ...request, context: { ...request.context, request_id: `req-${randomUUID()}` } };
}
