/**
 * The oslo.messaging wire format (oslo_messaging/_drivers/common.py serialize_msg/deserialize_msg,
 * _drivers/amqp.py pack/unpack_context): decoding requests, encoding replies and notifications.
 *
 * Envelope 2.0: `{"oslo.version": "2.0", "oslo.message": "<the message as a JSON string>"}`.
 * Envelope 1.0: the message dict itself, unwrapped.
 */
import { Secret } from '../util/secret.js';
import { randomUUID } from 'node:crypto';
import { MalformedMessage } from '../errors.js';
import type { MessageProperties } from './bus.js';
import type { RpcRequest } from './rpc-types.js';

export const ENVELOPE_VERSION = '2.0';
export const VERSION_KEY = 'oslo.version';
export const MESSAGE_KEY = 'oslo.message';

/** Bodies above this size are refused before they are parsed. */
export const DEFAULT_MAX_BODY_BYTES = 1024 * 1024;

/**
 * Messages nesting arrays and objects deeper than this are refused: a real nova request nests about
 * a dozen levels, and a value nested thousands deep would overflow the stack of JSON.stringify when
 * it is journaled (JSON.parse itself copes).
 */
export const MAX_NESTING = 64;

/** Longest method name, `_unique_id`, `_msg_id` or `_reply_q` accepted (an AMQP short string). */
export const MAX_NAME_CHARS = 255;

/**
 * The AMQP properties oslo's rabbit driver (kombu's json serializer) puts on every message it
 * publishes; kombu's default delivery mode is persistent.
 */
export const JSON_PROPERTIES: Readonly<MessageProperties> = Object.freeze({
  contentType: 'application/json',
  contentEncoding: 'utf-8',
  deliveryMode: 2,
});

/**
 * Context keys never kept in the request (which is journaled): the caller's keystone token travels
 * beside it, in memory only (DecodeResult.authToken).
 */
const DROPPED_CONTEXT_KEYS = new Set(['auth_token']);

/** Fernet tokens are ~250 characters, old PKI ones a few KiB: a header Glance takes. */
const MAX_AUTH_TOKEN_CHARS = 16 * 1024;

const RPC_VERSION_RE = /^\d{1,9}\.\d{1,9}(\.\d{1,9})?$/;
/** Reply queues and message ids are hex or uuid-like; anything else is not an address we answer. */
const ADDRESS_RE = /^[A-Za-z0-9_.:@-]{1,255}$/;

/** Where a call wants its reply: `_msg_id` and `_reply_q`. */
export interface ReplyAddress {
  msgId: string;
  replyQ: string;
}

export type DecodeResult =
  | {
      ok: true;
      request: RpcRequest;
      /**
       * `_context_auth_token`, kept apart from the request: the request is journaled, the token never
       * is (held in memory for the image store's calls to Glance only).
       */
      authToken?: Secret;
    }
  | {
      ok: false;
      error: MalformedMessage;
      /** Set when the bad message was readable enough to tell that it was a call and where to answer. */
      replyTo?: ReplyAddress;
      uniqueId?: string;
    };

export interface DecodeOptions {
  /** Default DEFAULT_MAX_BODY_BYTES. */
  maxBytes?: number;
}

/** A new `_unique_id`, as oslo makes them (uuid4 hex). */
export function newUniqueId(): string {
  return randomUUID().replaceAll('-', '');
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return typeof v === 'object' || typeof v === 'undefined' ? `an ${typeof v}` : `a ${typeof v}`;
}

/** A received value as JSON for an error message, cut short: a hostile input is never echoed whole. */
export function shown(v: unknown, max = 80): string {
  let text: string;
  try {
    text = JSON.stringify(v) ?? String(v);
  } catch {
    text = describe(v);
  }
  return text.length <= max ? text : `${text.slice(0, max)}… (${text.length} characters)`;
}

/** True when arrays/objects in `value` nest deeper than `max` levels (the value itself is level 1). Iterative. */
export function nestsDeeperThan(value: unknown, max: number): boolean {
  const stack: Array<{ v: object; depth: number }> = [];
  if (typeof value === 'object' && value !== null) stack.push({ v: value, depth: 1 });
  while (stack.length > 0) {
    const { v, depth } = stack.pop()!;
    if (depth > max) return true;
    for (const child of Array.isArray(v) ? v : Object.values(v)) {
      if (typeof child === 'object' && child !== null) stack.push({ v: child as object, depth: depth + 1 });
    }
  }
  return false;
}

function refuseDeepNesting(value: unknown, what: string): void {
  if (nestsDeeperThan(value, MAX_NESTING)) {
    throw new MalformedMessage(`${what} nests deeper than ${MAX_NESTING} levels of arrays and objects`);
  }
}

/**
 * Decodes an RPC request delivery. Never throws: a malformed message comes back as
 * `{ok: false, error}` with its reason, plus the reply address when one could be read.
 */
export function decodeRequest(body: Buffer, opts: DecodeOptions = {}): DecodeResult {
  const maxBytes = opts.maxBytes ?? DEFAULT_MAX_BODY_BYTES;
  if (body.length > maxBytes) {
    return {
      ok: false,
      error: new MalformedMessage(`message body is ${body.length} bytes, over the limit of ${maxBytes} bytes`),
      ...scanReplyAddress(body),
    };
  }
  let message: Record<string, unknown>;
  try {
    message = unwrap(body);
  } catch (err) {
    if (!(err instanceof MalformedMessage)) throw err;
    // Even a truncated call may say where its caller waits: answer it rather than let it time out.
    return { ok: false, error: err, ...scanReplyAddress(body) };
  }
  const replyTo = readReplyAddress(message);
  const uniqueId = typeof message._unique_id === 'string' ? message._unique_id : undefined;
  try {
    const request = toRequest(message);
    const authToken = readAuthToken(message._context_auth_token);
    return { ok: true, request, ...(authToken !== undefined && { authToken }) };
  } catch (err) {
    if (!(err instanceof MalformedMessage)) throw err;
    return { ok: false, error: err, ...(replyTo && { replyTo }), ...(uniqueId !== undefined && { uniqueId }) };
  }
}

/** Body → the inner message dict (envelope 2.0 unwrapped, or a 1.0 dict as is). */
export function unwrap(body: Buffer): Record<string, unknown> {
  let outer: unknown;
  try {
    outer = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(body));
  } catch (err) {
    const why = err instanceof SyntaxError ? err.message : 'not valid UTF-8';
    throw new MalformedMessage(`message body is not JSON: ${why}`);
  }
  if (!isPlainObject(outer)) {
    throw new MalformedMessage(`message is ${describe(outer)}, expected a JSON object`);
  }
  refuseDeepNesting(outer, 'message');
  const hasVersion = VERSION_KEY in outer;
  const hasMessage = MESSAGE_KEY in outer;
  if (!hasVersion && !hasMessage) return outer; // envelope 1.0
  if (!hasVersion) throw new MalformedMessage(`envelope has "${MESSAGE_KEY}" but no "${VERSION_KEY}"`);
  if (!hasMessage) throw new MalformedMessage(`envelope has "${VERSION_KEY}" but no "${MESSAGE_KEY}"`);

  const version = outer[VERSION_KEY];
  if (typeof version !== 'string' || !RPC_VERSION_RE.test(version)) {
    throw new MalformedMessage(`envelope "${VERSION_KEY}" is ${shown(version)}, expected "${ENVELOPE_VERSION}"`);
  }
  if (!isVersionCompatible(ENVELOPE_VERSION, version)) {
    throw new MalformedMessage(`unsupported envelope version "${version}", expected "${ENVELOPE_VERSION}"`);
  }
  const inner = outer[MESSAGE_KEY];
  if (typeof inner !== 'string') {
    throw new MalformedMessage(`envelope "${MESSAGE_KEY}" is ${describe(inner)}, expected a JSON string`);
  }
  let message: unknown;
  try {
    message = JSON.parse(inner);
  } catch (err) {
    throw new MalformedMessage(`envelope "${MESSAGE_KEY}" is not JSON: ${(err as Error).message}`);
  }
  if (!isPlainObject(message)) {
    throw new MalformedMessage(`envelope "${MESSAGE_KEY}" holds ${describe(message)}, expected a JSON object`);
  }
  refuseDeepNesting(message, 'message');
  return message;
}

function readReplyAddress(message: Record<string, unknown>): ReplyAddress | undefined {
  const msgId = message._msg_id;
  const replyQ = message._reply_q;
  if (typeof msgId === 'string' && typeof replyQ === 'string' && ADDRESS_RE.test(msgId) && ADDRESS_RE.test(replyQ)) {
    return { msgId, replyQ };
  }
  return undefined;
}

const SCAN_WINDOW = 64 * 1024;

/**
 * Finds `_msg_id` / `_reply_q` in a body that is too big or too broken to parse: oslo writes them
 * after `args`, so they sit near the end (or, from other writers, near the start). Only the first
 * and last 64 KiB are searched; the keys may appear with escaped quotes inside an envelope.
 */
function scanReplyAddress(body: Buffer): { replyTo?: ReplyAddress } {
  const head = body.subarray(0, SCAN_WINDOW).toString('latin1');
  const tail = body.length > SCAN_WINDOW ? body.subarray(body.length - SCAN_WINDOW).toString('latin1') : '';
  const find = (key: string): string | undefined => {
    const re = new RegExp(`\\\\?"${key}\\\\?"\\s*:\\s*\\\\?"([A-Za-z0-9_.:@-]{1,255})\\\\?"`);
    return (re.exec(tail) ?? re.exec(head))?.[1];
  };
  const msgId = find('_msg_id');
  const replyQ = find('_reply_q');
  return msgId && replyQ ? { replyTo: { msgId, replyQ } } : {};
}

function toRequest(message: Record<string, unknown>): RpcRequest {
  if (!('method' in message)) throw new MalformedMessage('message has no "method"');
  const method = message.method;
  if (typeof method !== 'string' || method.length === 0) {
    throw new MalformedMessage(`"method" is ${describe(method)}, expected a non-empty string`);
  }
  if (method.length > MAX_NAME_CHARS) {
    throw new MalformedMessage(`"method" is ${method.length} characters long, expected at most ${MAX_NAME_CHARS}`);
  }
  const args = 'args' in message ? message.args : {};
  if (!isPlainObject(args)) {
    throw new MalformedMessage(`"args" of ${method} is ${describe(args)}, expected a JSON object`);
  }
  for (const name of Object.keys(args)) {
    if (name.length > MAX_NAME_CHARS) {
      throw new MalformedMessage(`"args" of ${method} has an argument name of ${name.length} characters, expected at most ${MAX_NAME_CHARS}`);
    }
  }
  // oslo's dispatcher: a message without a version asks for 1.0.
  const version = 'version' in message ? message.version : '1.0';
  if (typeof version !== 'string' || !RPC_VERSION_RE.test(version)) {
    throw new MalformedMessage(`"version" of ${method} is ${shown(version)}, expected a "major.minor" string`);
  }
  const namespace = message.namespace ?? undefined;
  if (namespace !== undefined && typeof namespace !== 'string') {
    throw new MalformedMessage(`"namespace" is ${describe(namespace)}, expected a string or null`);
  }
  const uniqueId = optionalString(message, '_unique_id');
  // Journaled, put on every log line and remembered for a week: oslo's are 32 hex digits.
  if (uniqueId !== undefined && !ADDRESS_RE.test(uniqueId)) {
    throw new MalformedMessage('"_unique_id" has characters outside [A-Za-z0-9_.:@-] or is too long');
  }
  const msgId = optionalString(message, '_msg_id');
  const replyQ = optionalString(message, '_reply_q');
  if (msgId !== undefined && replyQ === undefined) throw new MalformedMessage('call has "_msg_id" but no "_reply_q"');
  if (replyQ !== undefined && msgId === undefined) throw new MalformedMessage('call has "_reply_q" but no "_msg_id"');
  if (msgId !== undefined && !ADDRESS_RE.test(msgId)) throw new MalformedMessage('"_msg_id" has characters outside [A-Za-z0-9_.:@-] or is too long');
  if (replyQ !== undefined && !ADDRESS_RE.test(replyQ)) throw new MalformedMessage('"_reply_q" has characters outside [A-Za-z0-9_.:@-] or is too long');
  const timeoutS = readTimeout(message._timeout);

  const context: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(message)) {
    if (!key.startsWith('_context_')) continue;
    const name = key.slice('_context_'.length);
    // defineProperty, not assignment: `_context___proto__` must stay a key, not become the prototype.
    if (!DROPPED_CONTEXT_KEYS.has(name)) Object.defineProperty(context, name, { value, enumerable: true, writable: true, configurable: true });
  }

  return {
    method,
    args,
    version,
    ...(namespace !== undefined && { namespace }),
    ...(uniqueId !== undefined && { uniqueId }),
    ...(msgId !== undefined && { msgId }),
    ...(replyQ !== undefined && { replyQ }),
    ...(timeoutS !== undefined && { timeoutS }),
    context,
  };
}

/** A keystone token as oslo.context sends it; anything else (absent, null, not text) is none. */
function readAuthToken(v: unknown): Secret | undefined {
  if (typeof v !== 'string' || v.length === 0 || v.length > MAX_AUTH_TOKEN_CHARS || !/^[\x21-\x7e]+$/.test(v)) return undefined;
  return new Secret(v);
}

function optionalString(message: Record<string, unknown>, key: string): string | undefined {
  const v = message[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string') throw new MalformedMessage(`"${key}" is ${describe(v)}, expected a string`);
  return v;
}

/** `_timeout` is the client's call-monitor timeout in seconds (an int from oslo; null when unset). */
function readTimeout(v: unknown): number | undefined {
  if (v === undefined || v === null) return undefined;
  const n = typeof v === 'string' && v.trim() !== '' ? Number(v) : v;
  if (typeof n !== 'number' || !Number.isFinite(n) || n < 0) {
    throw new MalformedMessage(`"_timeout" is ${shown(v)}, expected a number of seconds`);
  }
  return n;
}

/** oslo_messaging._utils.version_is_compatible: same major; minor (then revision) not above the served one. */
export function isVersionCompatible(served: string, requested: string): boolean {
  const [sMajor, sMinor, sRev] = parseRpcVersion(served);
  const [rMajor, rMinor, rRev] = parseRpcVersion(requested);
  if (rMajor !== sMajor) return false;
  if (rMinor > sMinor) return false;
  return !(rMinor === sMinor && rRev > sRev);
}

/** "6.2" → [6, 2, 0]; "6.2.1" → [6, 2, 1]. Throws MalformedMessage on anything else. */
export function parseRpcVersion(v: string): [number, number, number] {
  if (!RPC_VERSION_RE.test(v)) throw new MalformedMessage(`RPC version ${shown(v)} is not "major.minor"`);
  const [major = 0, minor = 0, rev = 0] = v.split('.').map(Number);
  return [major, minor, rev];
}

/** serialize_msg: wraps a message dict in envelope 2.0. */
export function encodeEnvelope(message: Record<string, unknown>): Buffer {
  return Buffer.from(JSON.stringify({ [VERSION_KEY]: ENVELOPE_VERSION, [MESSAGE_KEY]: JSON.stringify(message) }));
}

/** The `_context_*` keys of a context dict (pack_context). */
export function packContext(context: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(context)) out[`_context_${key}`] = value;
  return out;
}

export interface ReplyMessage {
  result: unknown;
  /** A serialized oslo failure (see failure.ts), or null. */
  failure: string | null;
  /** false: a call-monitor keep-alive; true: the one and only final reply (oslo ≥ Newton). */
  ending: boolean;
  _msg_id: string;
  /** Each reply has its own, fresh `_unique_id`: the client drops repeats of one. */
  _unique_id: string;
}

/** AMQPIncomingMessage._send_reply: `{result, failure, ending, _msg_id, _unique_id}` in envelope 2.0. */
export function encodeReply(r: { msgId: string; result?: unknown; failure?: string | null; ending: boolean }): Buffer {
  const message: ReplyMessage = {
    result: r.result ?? null,
    failure: r.failure ?? null,
    ending: r.ending,
    _msg_id: r.msgId,
    _unique_id: newUniqueId(),
  };
  return encodeEnvelope(message as unknown as Record<string, unknown>);
}

/** One oslo notification (notify/notifier.py Notifier._notify). */
export interface NotificationMessage {
  message_id: string;
  publisher_id: string;
  event_type: string;
  priority: 'INFO' | 'ERROR' | 'WARN' | 'DEBUG' | 'AUDIT' | 'CRITICAL' | 'SAMPLE';
  payload: unknown;
  /** `str(datetime.utcnow())`: "2024-05-06 07:08:09.123456". */
  timestamp: string;
}

/**
 * A notification as the messaging driver sends it: the message plus `_unique_id` and the
 * `_context_*` keys, in envelope 2.0 (messagingv2) or unwrapped (messaging, format 1.0).
 */
export function encodeNotification(
  n: NotificationMessage,
  context: Record<string, unknown>,
  envelope = true,
): Buffer {
  const message = { ...n, _unique_id: newUniqueId(), ...packContext(context) };
  return envelope ? encodeEnvelope(message) : Buffer.from(JSON.stringify(message));
}

/** Python's `str(datetime)` of a UTC time, as oslo puts it in notifications. */
export function pythonUtcTimestamp(d: Date = new Date()): string {
  const iso = d.toISOString(); // 2024-05-06T07:08:09.123Z
  return `${iso.slice(0, 10)} ${iso.slice(11, 23)}000`;
}
