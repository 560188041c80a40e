import type { Secret } from '../util/secret.js';
/**
 * What crosses the boundary between the RPC server (src/messaging) and what it serves (src/compute):
 * a decoded request, the target that handles it, and the journal that makes it durable.
 */

/** One decoded oslo.messaging request (envelope 2.0 or unwrapped 1.0). */
export interface RpcRequest {
  method: string;
  args: Record<string, unknown>;
  /** Requested RPC API version, e.g. "6.0". */
  version: string;
  namespace?: string;
  /** `_unique_id`: duplicates are dropped. */
  uniqueId?: string;
  /** Calls only: `_msg_id`, `_reply_q`, `_timeout` (seconds). */
  msgId?: string;
  replyQ?: string;
  timeoutS?: number;
  /** The `_context_*` keys, without the prefix (request_id, user_id, project_id, …). */
  context: Record<string, unknown>;
}

export interface RpcContext {
  /** `_context_request_id`, or one made up (req-<uuid>) when the caller sent none. */
  requestId: string;
  userId?: string;
  projectId?: string;
  raw: Record<string, unknown>;
  /** The request comes from the journal at start-up (accepted before a crash), not from the queue. */
  replayed?: boolean;
  /**
   * The caller's keystone token (`_context_auth_token`), for the image store's calls to Glance: held
   * in memory only, never journaled nor logged. Absent on a replay from the journal.
   */
  authToken?: Secret;
}

/** What the RPC server dispatches to (the compute manager). */
export interface RpcTarget {
  /** Served RPC API version "major.minor"; a request is compatible if same major and minor ≤ this. */
  readonly version: string;
  readonly namespace?: string;
  readonly methods: ReadonlySet<string>;
  /**
   * Checks the arguments of a known method before the request is journaled; throws a typed error
   * (e.g. InvalidArgument) whose message names the bad argument.
   */
  validate(method: string, args: Record<string, unknown>): void;
  call(method: string, args: Record<string, unknown>, ctx: RpcContext): Promise<unknown>;
}

export interface JournalEntry {
  id: string;
  request: RpcRequest;
  /** ISO 8601 UTC. */
  acceptedAt: string;
}

/** The agent's durable journal of accepted requests (under [DEFAULT] state_path). */
export interface RequestJournal {
  /** True if a request with this `_unique_id` was accepted before (it is dropped as a duplicate). */
  has(uniqueId: string): Promise<boolean>;
  /** Records the request durably (fsynced); only then is it acknowledged. Resolves with its id. */
  accept(request: RpcRequest): Promise<JournalEntry>;
  /** The request has finished (either way); its `_unique_id` stays known for duplicate detection. */
  finish(id: string, outcome: { ok: boolean; error?: string }): Promise<void>;
  /** Accepted and not finished, in acceptance order: carried out again on start. */
  unfinished(): Promise<JournalEntry[]>;
}
