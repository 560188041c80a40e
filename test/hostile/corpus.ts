/**
 * The hostile-input corpus (issue 5): RPC messages, config files and command lines that must each get
 * a clear error naming what is wrong, while the agent keeps serving and nothing outside its folders
 * is touched.
 *
 * The cases are data. test/unit/hostile-rpc.test.ts runs the `rpc` cases through the real RpcServer,
 * ComputeManager and SnapshotEngine (fake hypervisor, real FileJournal, in-memory broker);
 * test/integration/hostile-cli.test.ts runs the `config` and `cli` cases against the built CLI;
 * test/hostile/print-table.ts prints the table for the closing note.
 */
import { gzipSync } from 'node:zlib';

export type CaseKind = 'rpc' | 'config' | 'cli';

// ---------------------------------------------------------------------------------------------
// Fixtures both runners agree on.

/** A running guest of the RPC runner's fake hypervisor. */
export const RUNNING_GUEST = '3a1f5e2c-8b4d-4c6e-9f0a-1b2c3d4e5f60';
/** A shut-off guest of the RPC runner's fake hypervisor. */
export const SHUTOFF_GUEST = '7c9d0e1f-2a3b-4c5d-8e6f-708192a3b4c5';
/** An image the RPC runner makes before the corpus (a valid snapshot of RUNNING_GUEST). */
export const EXISTING_IMAGE = 'e1d2c3b4-a596-4788-9a0b-1c2d3e4f5a6b';
/** A well-formed UUID that names no instance and no image anywhere. */
export const UNKNOWN_UUID = '0badc0de-0000-4000-8000-00000000beef';
/** A fresh image id, valid in form. */
export const NEW_IMAGE = '5e7f8091-a2b3-44c5-96d7-e8f90a1b2c3d';
/** The RPC runner's reply queue: calls in the corpus carry `_reply_q` = this and `_msg_id` = `msg-<case id>`. */
export const REPLY_Q = 'reply_hostile_corpus';

// ---------------------------------------------------------------------------------------------
// Case types.

/** Where an RPC case is published: the `compute` topic (default), `compute.<host>`, or the fanout exchange. */
export type RpcRoute = 'topic' | 'server' | 'fanout';

export interface RpcCase {
  id: string;
  kind: 'rpc';
  input: {
    /** The raw AMQP body, exactly as published. */
    body: string | Buffer;
    /** AMQP properties (default: oslo's content_type application/json, utf-8, persistent). */
    properties?: { contentType?: string; contentEncoding?: string; headers?: Record<string, unknown> };
    route?: RpcRoute;
    /** A readable rendering of the input, for the table. */
    shown: string;
  };
  expect: {
    /** The failure class: the reply's `class`, or the `error` of the log line. */
    class: string;
    /** What the failure message must say: it names what is wrong. */
    message: RegExp;
    /**
     * true: the server can read a reply address, so the caller gets a failure reply (msg-<id> on
     * REPLY_Q). false: no reply can (or should) reach us; the server's log line says why.
     */
    reply: boolean;
    /** Must appear in no log line of the case and not in the reply (a hijacked request id, …). */
    absent?: RegExp;
  };
  why: string;
}

export interface ConfigCase {
  id: string;
  kind: 'config';
  input: {
    /** The config file's content (written to `<tmp>/conf/<id>.conf`). */
    ini?: string | Buffer;
    /** Instead of an INI: pass this path itself (relative: to the `<tmp>` folder), or a special file made there. */
    file?: { path: string } | { special: 'missing' | 'directory' | 'fifo' };
    /** The command run with it (default: `instances list`, which reads the instances folder only). */
    command?: string[];
  };
  expect: { class: string; message: RegExp; exitCode: 1 | 2; absent?: RegExp };
  why: string;
}

export interface CliCase {
  id: string;
  kind: 'cli';
  input: {
    /** The arguments after `--config-file <sandbox config>` (or the whole argv with `noConfig`). */
    argv: string[];
    noConfig?: boolean;
  };
  /** `class` CommanderError: commander's own usage error (`error: …` on stderr). */
  expect: { class: string; message: RegExp; exitCode: 1 | 2; absent?: RegExp };
  why: string;
}

export type HostileCase = RpcCase | ConfigCase | CliCase;

// ---------------------------------------------------------------------------------------------
// RPC helpers.

/** The reply address of a call in the corpus. */
export function replyAddress(id: string): { _msg_id: string; _reply_q: string } {
  return { _msg_id: `msg-${id}`, _reply_q: REPLY_Q };
}

/** Envelope 2.0 around an inner message given as JSON text (so it may hold `__proto__` keys or deep nesting). */
function envelopeText(inner: string): string {
  return JSON.stringify({ 'oslo.version': '2.0', 'oslo.message': inner });
}

/** A request dict for case `id`: `version` 6.0, its own `_unique_id`, and (for a call) its reply address. */
function request(id: string, fields: Record<string, unknown>, call = true): Record<string, unknown> {
  return { version: '6.0', _unique_id: `uid-${id}`, ...(call && replyAddress(id)), ...fields };
}

/** The request without the plumbing fields that hold their usual values (the table leaves them out). */
function showRequest(id: string, message: Record<string, unknown>, note = ''): string {
  const usual: Record<string, unknown> = { _unique_id: `uid-${id}`, version: '6.0', ...replyAddress(id) };
  const shown = Object.fromEntries(Object.entries(message).filter(([k, v]) => !(k in usual) || usual[k] !== v));
  return JSON.stringify(shrink(shown)) + note;
}

/** Long strings (values and keys) cut to a few characters plus their length, for the table. */
function shrink(v: unknown): unknown {
  const cut = (s: string) => (s.length > 60 ? `${s.slice(0, 6)}…(${s.length} chars)` : s);
  if (typeof v === 'string') return cut(v);
  if (Array.isArray(v)) return v.map(shrink);
  if (typeof v === 'object' && v !== null) return Object.fromEntries(Object.entries(v).map(([k, x]) => [cut(k), shrink(x)]));
  return v;
}

type RpcExpect = RpcCase['expect'];

/** A call (or cast) in envelope 2.0. */
function rpc(id: string, why: string, fields: Record<string, unknown>, expect: RpcExpect, o: { call?: boolean; route?: RpcRoute; note?: string } = {}): RpcCase {
  const message = request(id, fields, o.call ?? true);
  return {
    id,
    kind: 'rpc',
    input: { body: envelopeText(JSON.stringify(message)), ...(o.route && { route: o.route }), shown: showRequest(id, message, o.note) },
    expect,
    why,
  };
}

/** A case whose body is given as is. */
function raw(id: string, why: string, body: string | Buffer, shown: string, expect: RpcExpect, properties?: RpcCase['input']['properties']): RpcCase {
  return { id, kind: 'rpc', input: { body, shown, ...(properties && { properties }) }, expect, why };
}

/** The JSON text of a call whose inner message is given as text (the address fields are appended). */
function innerText(id: string, fieldsText: string): string {
  const tail = JSON.stringify({ _unique_id: `uid-${id}`, ...replyAddress(id) }).slice(1);
  return `{"version":"6.0",${fieldsText},${tail}`;
}

const deep = (depth: number): string => '['.repeat(depth) + ']'.repeat(depth);
const DEPTH = 100_000;

const malformed = (message: RegExp, reply: boolean): RpcExpect => ({ class: 'MalformedMessage', message, reply });
const invalidArg = (message: RegExp): RpcExpect => ({ class: 'InvalidArgument', message, reply: true });

const snap = (instance: unknown, imageId: unknown = NEW_IMAGE) => ({ method: 'snapshot_instance', args: { instance, image_id: imageId } });
const backup = (backupType: unknown, rotation: unknown) => ({
  method: 'backup_instance',
  args: { instance: { uuid: RUNNING_GUEST }, image_id: NEW_IMAGE, backup_type: backupType, rotation },
});

/** Bytes 0..255, four times: no JSON, no UTF-8. */
const GARBAGE = Buffer.from(Array.from({ length: 1024 }, (_, i) => (i * 37 + 11) % 256));

export const RPC_CASES: RpcCase[] = [
  // --- bodies that are not an oslo message at all
  raw('empty-body', 'an empty body is not a message', '', '(0 bytes)', malformed(/not JSON/, false)),
  raw('binary-garbage', 'random bytes (not UTF-8, not JSON)', GARBAGE, `${GARBAGE.length} bytes of binary garbage`, malformed(/not JSON: not valid UTF-8/, false), {
    contentType: 'application/octet-stream',
  }),
  raw(
    'gzip-body',
    'a compressed body (content-encoding gzip) is not decoded: refused, not guessed at',
    gzipSync(envelopeText(JSON.stringify(request('gzip-body', snap({ uuid: RUNNING_GUEST }), false)))),
    'gzip of a valid cast, content-encoding: gzip',
    malformed(/not JSON/, false),
    { contentType: 'application/json', contentEncoding: 'gzip' },
  ),
  raw(
    'non-utf8-call',
    'invalid UTF-8 inside an otherwise readable call: refused, and the caller is answered',
    Buffer.concat([
      Buffer.from(`{"method":"snapshot_instance","args":{"instance":{"uuid":"${RUNNING_GUEST}"},"image_id":"`),
      Buffer.from([0xff, 0xfe, 0xc3, 0x28]),
      Buffer.from(`"},"version":"6.0","_msg_id":"msg-non-utf8-call","_reply_q":"${REPLY_Q}"}`),
    ]),
    'unwrapped call, image_id holds bytes ff fe c3 28',
    malformed(/not JSON: not valid UTF-8/, true),
  ),
  raw('truncated-call', 'a call cut short: not JSON, but its reply address is still read and answered', envelopeText(JSON.stringify(request('truncated-call', snap({ uuid: RUNNING_GUEST })))).slice(0, -3), 'envelope of a call, last 3 bytes cut', malformed(/not JSON/, true)),
  raw('json-array', 'a JSON array is not a message', '[{"method":"snapshot_instance"}]', '[{"method":"snapshot_instance"}]', malformed(/message is an array, expected a JSON object/, false)),
  raw('json-string', 'a JSON string is not a message', '"snapshot_instance"', '"snapshot_instance"', malformed(/message is a string, expected a JSON object/, false)),

  // --- the oslo envelope
  raw(
    'envelope-message-object',
    'oslo.message must be a JSON string, not an object',
    JSON.stringify({ 'oslo.version': '2.0', 'oslo.message': snap({ uuid: RUNNING_GUEST }), ...replyAddress('envelope-message-object') }),
    '{"oslo.version":"2.0","oslo.message":{…object…}}',
    malformed(/"oslo.message" is an object, expected a JSON string/, true),
  ),
  raw('envelope-message-number', 'oslo.message must be a JSON string', JSON.stringify({ 'oslo.version': '2.0', 'oslo.message': 42 }), '{"oslo.version":"2.0","oslo.message":42}', malformed(/"oslo.message" is a number, expected a JSON string/, false)),
  raw('envelope-version-3', 'an envelope version this agent does not speak', JSON.stringify({ 'oslo.version': '3.0', 'oslo.message': '{}' }), '{"oslo.version":"3.0","oslo.message":"{}"}', malformed(/unsupported envelope version "3.0", expected "2.0"/, false)),
  raw('envelope-version-object', 'a NoSQL-injection-style version object', JSON.stringify({ 'oslo.version': { $gt: '' }, 'oslo.message': '{}' }), '{"oslo.version":{"$gt":""},"oslo.message":"{}"}', malformed(/envelope "oslo.version" is \{"\$gt":""\}, expected "2.0"/, false)),
  raw('envelope-no-version', 'oslo.message without oslo.version', JSON.stringify({ 'oslo.message': '{}' }), '{"oslo.message":"{}"}', malformed(/envelope has "oslo.message" but no "oslo.version"/, false)),
  raw(
    'envelope-inner-not-json',
    'oslo.message that is not JSON; the escaped reply address is still found and answered',
    envelopeText(innerText('envelope-inner-not-json', '"method":"snapshot_instance","args":{').replace(/\}$/, '')),
    '{"oslo.version":"2.0","oslo.message":"{\\"method\\":…,\\"args\\":{ …(broken)"}',
    malformed(/"oslo.message" is not JSON/, true),
  ),

  // --- the request dict
  rpc('missing-method', 'a call without a method', { args: {} }, malformed(/message has no "method"/, true)),
  rpc('method-array', 'method must be a string', { method: ['snapshot_instance'], args: {} }, malformed(/"method" is an array, expected a non-empty string/, true)),
  rpc('method-empty', 'method must not be empty', { method: '', args: {} }, malformed(/"method" is a string, expected a non-empty string/, true)),
  rpc('method-huge', 'a 200 000-character method name is refused without being echoed', { method: 'm'.repeat(200_000), args: {} }, malformed(/"method" is 200000 characters long, expected at most 255/, true)),
  rpc('unknown-method', 'a method nova never sends', { method: 'delete_all_instances', args: {} }, { class: 'NoSuchMethod', message: /Endpoint does not support RPC method delete_all_instances/, reply: true }),
  rpc('private-method', 'a private method (leading underscore) is never dispatched', { method: '_run', args: {} }, { class: 'NoSuchMethod', message: /Endpoint does not support RPC method _run/, reply: true }),
  rpc('constructor-method', "an Object.prototype member as method name", { method: 'constructor', args: {} }, { class: 'NoSuchMethod', message: /Endpoint does not support RPC method constructor/, reply: true }),
  rpc('proto-method', '__proto__ as method name', { method: '__proto__', args: {} }, { class: 'NoSuchMethod', message: /Endpoint does not support RPC method __proto__/, reply: true }),
  rpc('version-major-5', 'an older major version than served (6.x)', { ...snap({ uuid: RUNNING_GUEST }), version: '5.0' }, { class: 'UnsupportedVersion', message: /does not support RPC version 5.0\. Attempted method: snapshot_instance/, reply: true }),
  rpc('version-minor-99', 'a higher minor than served (6.2)', { ...snap({ uuid: RUNNING_GUEST }), version: '6.99' }, { class: 'UnsupportedVersion', message: /does not support RPC version 6.99\b.*served: 6\.2/, reply: true }),
  rpc('version-number', 'version must be a "major.minor" string', { ...snap({ uuid: RUNNING_GUEST }), version: 6.0 }, malformed(/"version" of snapshot_instance is 6, expected a "major.minor" string/, true)),
  rpc('version-injection', 'a version string carrying a shell command', { ...snap({ uuid: RUNNING_GUEST }), version: '6.0; rm -rf /' }, malformed(/"version" of snapshot_instance is "6.0; rm -rf \/", expected a "major.minor" string/, true)),
  rpc('version-huge', 'a 500 000-digit minor version: refused, echoed cut short', { ...snap({ uuid: RUNNING_GUEST }), version: `6.${'9'.repeat(500_000)}` }, malformed(/"version" of snapshot_instance is "6\.9{70,}… \(500004 characters\), expected a "major.minor" string/, true)),
  rpc('namespace-other', 'a namespace this target does not serve', { ...snap({ uuid: RUNNING_GUEST }), namespace: 'baremetal' }, { class: 'UnsupportedVersion', message: /namespace "baremetal", served: null/, reply: true }),
  rpc('namespace-huge', 'a 300 000-character namespace: refused, echoed cut short', { ...snap({ uuid: RUNNING_GUEST }), namespace: 'n'.repeat(300_000) }, { class: 'UnsupportedVersion', message: /namespace "n{70,}… \(300002 characters\), served: null/, reply: true }),
  rpc('args-array', 'positional args are not oslo', { method: 'snapshot_instance', args: [RUNNING_GUEST, NEW_IMAGE] }, malformed(/"args" of snapshot_instance is an array, expected a JSON object/, true)),
  rpc('args-string', 'args must be an object', { method: 'snapshot_instance', args: 'instance=x' }, malformed(/"args" of snapshot_instance is a string, expected a JSON object/, true)),
  rpc('unique-id-number', '_unique_id must be a string', { ...snap({ uuid: RUNNING_GUEST }), _unique_id: 5 }, malformed(/"_unique_id" is a number, expected a string/, true)),
  rpc(
    'unique-id-huge',
    'a 500 000-character _unique_id would be journaled, logged on every line and remembered for a week: refused',
    { ...snap({ uuid: RUNNING_GUEST }), _unique_id: 'u'.repeat(500_000) },
    malformed(/"_unique_id" has characters outside \[A-Za-z0-9_.:@-\] or is too long/, true),
  ),
  rpc('reply-q-empty', 'an empty _reply_q is no address: refused, nothing sent', { ...snap({ uuid: RUNNING_GUEST }), _reply_q: '' }, malformed(/"_reply_q" has characters outside \[A-Za-z0-9_.:@-\] or is too long/, false)),
  rpc('reply-q-long', 'a 300-character _reply_q is no address', { ...snap({ uuid: RUNNING_GUEST }), _reply_q: 'q'.repeat(300) }, malformed(/"_reply_q" has characters outside \[A-Za-z0-9_.:@-\] or is too long/, false)),
  rpc('reply-q-exchange-injection', 'a _reply_q that tries to name an exchange and routing key', { ...snap({ uuid: RUNNING_GUEST }), _reply_q: 'nova/compute #' }, malformed(/"_reply_q" has characters outside/, false)),
  rpc(
    'reply-q-own-queue',
    "a _reply_q naming the server's own queue: the failure lands there, is dropped as no request, and does not loop",
    { method: 'no_such_method', args: {}, _reply_q: 'compute' },
    { class: 'NoSuchMethod', message: /Endpoint does not support RPC method no_such_method/, reply: false },
  ),
  rpc('msg-id-without-reply-q', 'half a reply address', { ...snap({ uuid: RUNNING_GUEST }), _reply_q: null }, malformed(/call has "_msg_id" but no "_reply_q"/, false)),
  rpc('timeout-negative', '_timeout must be a number of seconds >= 0', { ...snap({ uuid: RUNNING_GUEST }), _timeout: -1 }, malformed(/"_timeout" is -1, expected a number of seconds/, true)),
  rpc('timeout-string', '_timeout must be a number', { ...snap({ uuid: RUNNING_GUEST }), _timeout: 'soon' }, malformed(/"_timeout" is "soon", expected a number of seconds/, true)),
  rpc(
    'timeout-huge',
    'a 1e308 s call-monitor timeout must not turn into a keep-alive every millisecond (Node clamps an overflowing timer to 1 ms)',
    { ...snap({ uuid: UNKNOWN_UUID }), _timeout: 1e308 },
    { class: 'InstanceNotFound', message: new RegExp(`instance ${UNKNOWN_UUID} not found`), reply: true },
  ),

  // --- the context
  rpc(
    'context-huge',
    'a 900 KB context value (under the 1 MiB limit) on a bad call: refused as usual, not echoed',
    { ...snap({ uuid: RUNNING_GUEST }, 'not-an-image'), _context_roles: 'admin,'.repeat(150_000) },
    invalidArg(/argument image_id "not-an-image" is not an image id: expected a UUID/),
  ),
  rpc(
    'context-request-id-huge',
    'a 300 000-character request_id would be put on every log line: replaced by a made-up one',
    { method: 'no_such_method', args: {}, _context_request_id: `req-${'r'.repeat(300_000)}` },
    { class: 'NoSuchMethod', message: /Endpoint does not support RPC method no_such_method/, reply: true, absent: /r{1000}/ },
  ),
  raw(
    'context-proto',
    'a `_context___proto__` key must not become the prototype of the request context (and so fake its request_id)',
    envelopeText(innerText('context-proto', '"method":"no_such_method","args":{},"_context___proto__":{"request_id":"req-hijacked","user_id":"admin"}')),
    '{"method":"no_such_method","_context___proto__":{"request_id":"req-hijacked",…}}',
    { class: 'NoSuchMethod', message: /Endpoint does not support RPC method no_such_method/, reply: true, absent: /req-hijacked/ },
  ),

  // --- arguments: prototype pollution attempts
  raw(
    'args-proto',
    'prototype pollution through args.__proto__: an unexpected argument, and Object.prototype stays clean',
    envelopeText(innerText('args-proto', `"method":"snapshot_instance","args":{"instance":{"uuid":"${RUNNING_GUEST}"},"image_id":"${NEW_IMAGE}","__proto__":{"polluted":"yes"}}`)),
    '{"method":"snapshot_instance","args":{…,"__proto__":{"polluted":"yes"}}}',
    invalidArg(/snapshot_instance: unexpected argument "__proto__": expected only instance, image_id/),
  ),
  raw(
    'args-constructor-prototype',
    'prototype pollution through args.constructor.prototype',
    envelopeText(innerText('args-constructor-prototype', `"method":"start_instance","args":{"instance":{"uuid":"${SHUTOFF_GUEST}"},"constructor":{"prototype":{"polluted":"yes"}}}`)),
    '{"method":"start_instance","args":{…,"constructor":{"prototype":{"polluted":"yes"}}}}',
    invalidArg(/start_instance: unexpected argument "constructor": expected only instance/),
  ),
  raw(
    'instance-proto',
    'prototype pollution inside the instance primitive, with a bad image id: refused, prototype clean',
    envelopeText(innerText('instance-proto', `"method":"snapshot_instance","args":{"instance":{"nova_object.name":"Instance","nova_object.data":{"uuid":"${RUNNING_GUEST}","__proto__":{"polluted":"yes"}}},"image_id":"../x"}`)),
    '{"args":{"instance":{"nova_object.data":{"uuid":…,"__proto__":{…}}},"image_id":"../x"}}',
    invalidArg(/argument image_id "\.\.\/x" is not an image id/),
  ),

  // --- deep nesting and size
  raw(
    'deep-nesting-instance',
    'a 100 000-deep array inside an otherwise valid instance primitive: refused before it reaches the journal (JSON.stringify would overflow the stack)',
    envelopeText(innerText('deep-nesting-instance', `"method":"snapshot_instance","args":{"instance":{"nova_object.name":"Instance","nova_object.data":{"uuid":"${RUNNING_GUEST}","metadata":${deep(DEPTH)}}},"image_id":"${NEW_IMAGE}"}`)),
    `valid snapshot_instance call, instance data "metadata": [[[…]]] ${DEPTH} deep`,
    malformed(/message nests deeper than 64 levels/, true),
  ),
  raw(
    'deep-nesting-context',
    'a 100 000-deep array as a context value',
    envelopeText(innerText('deep-nesting-context', `"method":"start_instance","args":{"instance":{"uuid":"${SHUTOFF_GUEST}"}},"_context_roles":${deep(DEPTH)}`)),
    `start_instance call, _context_roles: [[[…]]] ${DEPTH} deep`,
    malformed(/message nests deeper than 64 levels/, true),
  ),
  raw(
    'deep-nesting-envelope',
    'a 100 000-deep array beside oslo.message in the envelope',
    `{"oslo.version":"2.0","oslo.message":${JSON.stringify(JSON.stringify(request('deep-nesting-envelope', { method: 'start_instance', args: { instance: { uuid: SHUTOFF_GUEST } } })))},"x":${deep(DEPTH)}}`,
    `envelope {"oslo.version","oslo.message":<valid call>,"x":[[[…]]] ${DEPTH} deep}`,
    malformed(/message nests deeper than 64 levels/, true),
  ),
  raw(
    'oversized-call',
    'a 2 MiB call: refused unparsed (the reply address is read from its tail)',
    envelopeText(JSON.stringify(request('oversized-call', { method: 'snapshot_instance', args: { instance: { uuid: RUNNING_GUEST }, image_id: NEW_IMAGE, pad: 'x'.repeat(2 * 2 ** 20) } }))),
    'snapshot_instance call with a 2 MiB "pad" argument',
    malformed(/message body is \d+ bytes, over the limit of 1048576 bytes/, true),
  ),
  raw(
    'oversized-cast',
    'a 2 MiB cast with no reply address: refused unparsed, logged',
    `{"pad":"${'x'.repeat(2 * 2 ** 20)}"}`,
    '{"pad":"xxx…"} (2 MiB)',
    malformed(/message body is \d+ bytes, over the limit of 1048576 bytes/, false),
  ),

  // --- the instance argument
  rpc('instance-missing', 'snapshot_instance without an instance', { method: 'snapshot_instance', args: { image_id: NEW_IMAGE } }, invalidArg(/snapshot_instance: missing argument instance: expected a nova Instance object primitive/)),
  rpc('instance-not-uuid', 'an instance uuid that is a name', snap({ uuid: 'web-1' }), invalidArg(/argument instance\.uuid "web-1" is not an instance uuid: expected a UUID/)),
  rpc('instance-uuid-traversal', 'a path as instance uuid', snap({ uuid: '../../etc/passwd' }), invalidArg(/argument instance\.uuid "\.\.\/\.\.\/etc\/passwd" is not an instance uuid/)),
  rpc('instance-uuid-suffix-traversal', 'a valid uuid followed by a path', snap({ uuid: `${RUNNING_GUEST}/../../../etc` }), invalidArg(/argument instance\.uuid ".*\/\.\.\/\.\.\/\.\.\/etc" is not an instance uuid/)),
  rpc('instance-uuid-huge', 'a 300 000-character instance uuid: refused, echoed cut short (and logged cut short)', snap({ uuid: 'u'.repeat(300_000) }), invalidArg(/argument instance\.uuid "u{80}…" is not an instance uuid/)),
  rpc('instance-uuid-number', 'a number as instance uuid', snap({ uuid: 12345 }), invalidArg(/argument instance\.uuid number 12345 is not an instance uuid/)),
  rpc('instance-wrong-object', 'a nova object primitive of another class', snap({ 'nova_object.name': 'Flavor', 'nova_object.data': { uuid: RUNNING_GUEST } }), invalidArg(/argument instance is a nova object primitive of "Flavor", not of "Instance"/)),
  rpc('instance-primitive-traversal', 'a path as the primitive\'s uuid', snap({ 'nova_object.name': 'Instance', 'nova_object.data': { uuid: '../../etc/passwd' } }), invalidArg(/argument instance\["nova_object.data"\]\.uuid "\.\.\/\.\.\/etc\/passwd" is not an instance uuid/)),
  rpc('instance-unknown', 'a well-formed uuid that names no instance: the operation fails, nothing is made', snap({ uuid: UNKNOWN_UUID }), { class: 'InstanceNotFound', message: new RegExp(`instance ${UNKNOWN_UUID} not found`), reply: true }),

  // --- image_id
  rpc('image-id-traversal', 'a relative path as image id', snap({ uuid: RUNNING_GUEST }, '../../etc/passwd'), invalidArg(/argument image_id "\.\.\/\.\.\/etc\/passwd" is not an image id: expected a UUID/)),
  rpc('image-id-absolute', 'an absolute path as image id', snap({ uuid: RUNNING_GUEST }, '/etc/passwd'), invalidArg(/argument image_id "\/etc\/passwd" is not an image id/)),
  rpc('image-id-nul', 'a valid uuid followed by a NUL byte', snap({ uuid: RUNNING_GUEST }, `${NEW_IMAGE}\u0000.json`), invalidArg(/argument image_id ".*\\u0000\.json" is not an image id/)),
  rpc('image-id-newline', 'a valid uuid, a newline, and a path', snap({ uuid: RUNNING_GUEST }, `${NEW_IMAGE}\n../x`), invalidArg(/argument image_id ".*\\n\.\.\/x" is not an image id/)),
  rpc('image-id-partial-dir', "the store's own .partial folder as image id", snap({ uuid: RUNNING_GUEST }, '.partial'), invalidArg(/argument image_id "\.partial" is not an image id/)),
  rpc('image-id-long', 'a 100 000-character image id (shown shortened in the error)', snap({ uuid: RUNNING_GUEST }, 'a'.repeat(100_000)), invalidArg(/argument image_id "a{80}…" is not an image id/)),
  rpc('image-id-number', 'a number as image id', snap({ uuid: RUNNING_GUEST }, 42), invalidArg(/argument image_id number 42 is not an image id/)),
  rpc('image-id-existing', 'the id of an image that already exists: never overwritten', snap({ uuid: RUNNING_GUEST }, EXISTING_IMAGE), { class: 'ImageExists', message: new RegExp(`image ${EXISTING_IMAGE} already exists`), reply: true }),

  // --- other arguments
  rpc('extra-argument', 'an argument the method does not take', { method: 'snapshot_instance', args: { instance: { uuid: RUNNING_GUEST }, image_id: NEW_IMAGE, force: true } }, invalidArg(/unexpected argument "force": expected only instance, image_id/)),
  rpc('argument-name-huge', 'an argument named by 300 000 characters: refused without echoing the name', { method: 'start_instance', args: { instance: { uuid: SHUTOFF_GUEST }, ['k'.repeat(300_000)]: 1 } }, malformed(/"args" of start_instance has an argument name of 300000 characters, expected at most 255/, true)),
  rpc('display-name-huge', 'a 100 000-character display_name would become the image name: refused', snap({ uuid: RUNNING_GUEST, display_name: 'n'.repeat(100_000) }), invalidArg(/argument instance\.display_name is 100000 characters long: expected at most 255/)),
  rpc('user-id-huge', 'a 100 000-character user_id would land in the image metadata: refused', snap({ uuid: RUNNING_GUEST, user_id: 'u'.repeat(100_000) }), invalidArg(/argument instance\.user_id is 100000 characters long: expected at most 255/)),
  rpc('backup-type-huge', 'a 100 000-character backup_type: refused', backup('d'.repeat(100_000), 1), invalidArg(/backup_instance: argument backup_type is "d{80}…": expected a non-empty string of at most 255 characters/)),
  rpc('backup-type-number', 'backup_type must be a string', backup(3, 1), invalidArg(/backup_instance: argument backup_type is number 3: expected a non-empty string/)),
  rpc('rotation-negative', 'a negative rotation', backup('daily', -1), invalidArg(/argument rotation is number -1: expected an integer >= 0/)),
  rpc('rotation-string', 'a number sent as a string', backup('daily', '2'), invalidArg(/argument rotation is "2": expected an integer >= 0/)),
  rpc('rotation-fraction', 'a fractional rotation', backup('daily', 1.5), invalidArg(/argument rotation is number 1.5: expected an integer >= 0/)),
  rpc('rotation-huge', 'a rotation beyond the safe integers', backup('daily', 1e300), invalidArg(/argument rotation is number 1e\+300: expected an integer >= 0/)),
  rpc('reboot-type-lowercase', 'reboot_type is SOFT or HARD, case-sensitive as in nova', { method: 'reboot_instance', args: { instance: { uuid: RUNNING_GUEST }, reboot_type: 'hard' } }, invalidArg(/reboot_instance: argument reboot_type is "hard": expected one of SOFT, HARD/)),
  rpc('reboot-type-object', 'reboot_type as an object', { method: 'reboot_instance', args: { instance: { uuid: RUNNING_GUEST }, reboot_type: { type: 'HARD' } } }, invalidArg(/argument reboot_type is an object: expected one of SOFT, HARD/)),
  rpc('block-device-info-string', 'block_device_info must be an object or null', { method: 'reboot_instance', args: { instance: { uuid: RUNNING_GUEST }, reboot_type: 'SOFT', block_device_info: '/dev/sda' } }, invalidArg(/argument block_device_info is "\/dev\/sda": expected an object or null/)),
  rpc('clean-shutdown-string', 'a boolean sent as a string', { method: 'stop_instance', args: { instance: { uuid: RUNNING_GUEST }, clean_shutdown: 'false' } }, invalidArg(/stop_instance: argument clean_shutdown is "false": expected true or false/)),

  // --- other routes and a cast
  rpc('fanout-unknown-method', 'a hostile request on the fanout exchange is refused the same way', { method: 'delete_all_instances', args: {} }, { class: 'NoSuchMethod', message: /does not support RPC method delete_all_instances/, reply: true }, { route: 'fanout' }),
  rpc('server-queue-traversal', 'a hostile request on compute.<host>', snap({ uuid: RUNNING_GUEST }, '../../../../etc/shadow'), invalidArg(/argument image_id "\.\.\/\.\.\/\.\.\/\.\.\/etc\/shadow" is not an image id/), { route: 'server' }),
  rpc('cast-image-id-traversal', 'a cast (no reply address) with a path as image id: refused and logged', snap({ uuid: RUNNING_GUEST }, '../../etc/passwd'), { ...invalidArg(/argument image_id "\.\.\/\.\.\/etc\/passwd" is not an image id/), reply: false }, { call: false }),
];

// ---------------------------------------------------------------------------------------------
// Config files. The INI text is written to `<tmp>/conf/<id>.conf`; SANDBOX points every folder
// into `<tmp>/sandbox/`, so that a config the product wrongly accepted still touches nothing else.

export const SANDBOX_INI = [
  '[DEFAULT]',
  'instances_path = ../sandbox/instances',
  'state_path = ../sandbox/state',
  '[image_store]',
  'path = ../sandbox/images',
  'reserved_space_mb = 0',
  '',
].join('\n');

/** Hostile lines first (so that line numbers in the expectations are theirs), then the sandbox. */
const hostileIni = (text: string): string => `${text}\n${SANDBOX_INI}`;

function config(id: string, why: string, input: ConfigCase['input'], message: RegExp, extra: Partial<ConfigCase['expect']> = {}): ConfigCase {
  return { id, kind: 'config', input, expect: { class: 'ConfigError', message, exitCode: 2, ...extra }, why };
}

const conf = (id: string) => `${id}\\.conf`;

export const CONFIG_CASES: ConfigCase[] = [
  config('unknown-section', 'a misspelled section', { ini: hostileIni('[snapshots]\nstrategy = cold') }, new RegExp(`\\[snapshots\\] in .*${conf('unknown-section')}:1: unknown section \\(did you mean "snapshot"\\?\\); known sections: DEFAULT, snapshot`)),
  config('unknown-option', 'a misspelled option, with a suggestion', { ini: hostileIni('[snapshot]\nstratgy = cold') }, new RegExp(`\\[snapshot\\] stratgy in .*${conf('unknown-option')}:2: unknown option \\(did you mean "strategy"\\?\\)`)),
  config('bad-int', 'an integer option given a word', { ini: hostileIni('[DEFAULT]\nmax_concurrent_snapshots = five') }, /\[DEFAULT\] max_concurrent_snapshots = "five" in .*:2: expected an integer/),
  config('negative-int', 'a negative prefetch count', { ini: hostileIni('[oslo_messaging_rabbit]\nrabbit_qos_prefetch_count = -1') }, /\[oslo_messaging_rabbit\] rabbit_qos_prefetch_count = "-1" in .*:2: expected at least 0/),
  config('zero-concurrency', 'max_concurrent_snapshots must be at least 1', { ini: hostileIni('[DEFAULT]\nmax_concurrent_snapshots = 0') }, /\[DEFAULT\] max_concurrent_snapshots = "0" in .*:2: expected at least 1/),
  config('bool-garbage', 'a boolean that is neither true nor false', { ini: hostileIni('[DEFAULT]\ndebug = maybe') }, /\[DEFAULT\] debug = "maybe" in .*:2: expected one of 0, 1, true, false, yes, no, on, off/),
  config('strategy-unknown', 'a strategy that does not exist', { ini: hostileIni('[snapshot]\nstrategy = yolo') }, /\[snapshot\] strategy = "yolo" in .*:2: expected one of cold, suspend-create-resume-extract, double-suspend, deferred-delete, live/),
  config('driver-unknown', 'a hypervisor driver that does not exist', { ini: hostileIni('[hypervisor]\ndriver = xen') }, /\[hypervisor\] driver = "xen" in .*:2: expected one of qemu, libvirt/),
  config('qmp-timeout-negative', 'a negative QMP timeout', { ini: hostileIni('[hypervisor]\nqmp_timeout = -5') }, /\[hypervisor\] qmp_timeout = "-5" in .*:2: expected a number/),
  config('libvirt-uri-garbage', 'a libvirt URI with a space and no scheme', { ini: hostileIni('[hypervisor]\nlibvirt_uri = qemu system; rm -rf /') }, /\[hypervisor\] libvirt_uri = "qemu system; rm -rf \/" in .*:2: expected a libvirt connection URI such as qemu:\/\/\/system/),
  config('job-timeout-zero', 'a hypervisor job bound of 0 s', { ini: hostileIni('[hypervisor]\njob_timeout = 0') }, /\[hypervisor\] job_timeout = "0" in .*:2: expected/),
  config('accel-injection', 'an accel value that would add QEMU options', { ini: hostileIni('[hypervisor]\naccel = tcg,thread=multi') }, /\[hypervisor\] accel = "tcg,thread=multi" in .*:2: expected kvm, tcg, or a fallback list such as kvm:tcg/),
  config('name-prefix-traversal', 'a snapshot name prefix with a path in it', { ini: hostileIni('[snapshot]\nname_prefix = ../../') }, /\[snapshot\] name_prefix = "\.\.\/\.\.\/" in .*:2: expected 1 to 32 of A-Z a-z 0-9 \. _ -/),
  config('control-exchange-injection', 'an exchange name with a slash and spaces', { ini: hostileIni('[DEFAULT]\ncontrol_exchange = nova/../ x') }, /\[DEFAULT\] control_exchange = "nova\/\.\.\/ x" in .*:2: expected 1 to 255 of A-Z a-z 0-9 \. _ - :/),
  config('host-too-long', 'a host name too long for the compute.<host> queue (AMQP names are at most 255 bytes)', { ini: hostileIni(`[DEFAULT]\nhost = ${'h'.repeat(300)}`) }, /\[DEFAULT\] host = "h{99}… \(302 characters\) in .*:2: expected at most 247 characters \(the RPC server consumes the queue compute\.<host>/),
  config('transport-garbage', 'a transport_url that is not a URL; the password-looking text is not echoed', { ini: hostileIni('[DEFAULT]\ntransport_url = :::s3cr3t-garbage') }, /\[DEFAULT\] transport_url in .*:2: expected a transport URL such as rabbit:\/\/user:pass@host:5672\/vhost or memory:\/\/ \(expected it to start with rabbit:\/\/ or memory:\/\/\)/, { absent: /s3cr3t/ }),
  config('transport-scheme', 'an unknown scheme; the password is not echoed', { ini: hostileIni('[DEFAULT]\ntransport_url = http://admin:s3cr3t@h/') }, /\[DEFAULT\] transport_url in .*:2: .*unsupported scheme "http:\/\/": expected rabbit:\/\/ or memory:\/\//, { absent: /s3cr3t/ }),
  config('transport-port', 'a port out of range; the password is not echoed', { ini: hostileIni('[DEFAULT]\ntransport_url = rabbit://admin:s3cr3t@h:99999/') }, /\[DEFAULT\] transport_url in .*:2: .*host 1: the port is not a number from 1 to 65535/, { absent: /s3cr3t/ }),
  config('empty-path', 'an empty instances_path', { ini: `[DEFAULT]\ninstances_path =\nstate_path = ../sandbox/state\n[image_store]\npath = ../sandbox/images\n` }, /\[DEFAULT\] instances_path = "" in .*:2: expected a non-empty string/),
  config(
    'instances-path-is-file',
    'instances_path naming a file outside the sandbox: refused at load, the file untouched',
    { ini: `[DEFAULT]\ninstances_path = ../outside/canary.txt\nstate_path = ../sandbox/state\n[image_store]\npath = ../sandbox/images\n` },
    /\[DEFAULT\] instances_path = ".*outside\/canary\.txt" in .*:2: expected a directory, but it is a file/,
  ),
  config(
    'store-path-is-file',
    'the image store path naming a file (a traversal to /etc/passwd)',
    { ini: `[DEFAULT]\ninstances_path = ../sandbox/instances\nstate_path = ../sandbox/state\n[image_store]\npath = ../../../../../../../../etc/passwd\n`, command: ['images', 'list'] },
    /\[image_store\] path = "\/etc\/passwd" in .*:5: expected a directory, but it is a file/,
  ),
  config('line-without-equals', 'a line that is no "key = value"', { ini: hostileIni('[snapshot]\nthis line has no equals sign') }, new RegExp(`${conf('line-without-equals')}:2: no "=" or ":" in line \\(expected "key = value"\\)`)),
  config('option-before-section', 'an option before any section header', { ini: hostileIni('debug = true') }, new RegExp(`${conf('option-before-section')}:1: option debug before any \\[section\\] header`)),
  config('header-unterminated', 'a section header without "]"', { ini: hostileIni('[snapshot\nstrategy = cold') }, new RegExp(`${conf('header-unterminated')}:1: section header missing "\\]"`)),
  config('continuation-first', 'a continuation line with nothing to continue', { ini: hostileIni('  indented = value') }, new RegExp(`${conf('continuation-first')}:1: unexpected continuation line`)),
  config('garbage-lines', '5000 lines of garbage: the error lists the first problems and counts the rest', { ini: Array.from({ length: 5000 }, (_, i) => `garbage line ${i}`).join('\n') }, /garbage-lines\.conf:1: no "=".*\n(.*\n){19}\.\.\. and 4980 more problems/),
  config('binary-file', 'a binary file (not UTF-8) as config', { ini: GARBAGE }, new RegExp(`cannot read config file .*${conf('binary-file')}: not valid UTF-8 text`)),
  config('huge-file', 'a 2 MiB config file: refused before it is parsed', { ini: `# ${'x'.repeat(2 * 2 ** 20)}\n${SANDBOX_INI}` }, new RegExp(`cannot read config file .*${conf('huge-file')}: \\d+ bytes, over the limit of 1048576 bytes`)),
  config('missing-file', 'a config file that does not exist', { file: { special: 'missing' } }, /cannot read config file .*missing-file\.conf: no such file/),
  config('directory', 'a directory as config file', { file: { special: 'directory' } }, /cannot read config file .*directory\.conf: is a directory, not a file/),
  config('fifo', 'a named pipe as config file would block forever: refused at once', { file: { special: 'fifo' } }, /cannot read config file .*fifo\.conf: not a regular file/),
  config('dev-zero', '/dev/zero as config file would be read forever: refused at once', { file: { path: '/dev/zero' } }, /cannot read config file \/dev\/zero: not a regular file/),
  config('etc-passwd', '/etc/passwd as config file: named with its first bad line, nothing else echoed', { file: { path: '/etc/passwd' } }, /\/etc\/passwd:1: option root before any \[section\] header/, { absent: /\/bin\/(ba)?sh/ }),
];

// ---------------------------------------------------------------------------------------------
// Command lines. `--config-file <tmp>/conf/sandbox.conf` (SANDBOX_INI) comes first unless noConfig.
// The CLI runs with its working directory in `<tmp>/sandbox/images` so that `../../outside/…`
// names the canaries in `<tmp>/outside/`.

function cli(id: string, why: string, argv: string[], cls: string, message: RegExp, exitCode: 1 | 2 = 2, o: { noConfig?: boolean; absent?: RegExp } = {}): CliCase {
  return {
    id,
    kind: 'cli',
    input: { argv, ...(o.noConfig && { noConfig: true }) },
    expect: { class: cls, message, exitCode, ...(o.absent && { absent: o.absent }) },
    why,
  };
}

/** The value as the product quotes it (JSON), as a regex matching it literally. */
const quoted = (v: string): string => JSON.stringify(v).replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
const badImage = (id: string) => new RegExp(`invalid image id ${quoted(id)}: expected a UUID`);
const badInstance = (uuid: string) => new RegExp(`invalid instance uuid ${quoted(uuid)}: expected a UUID`);

export const CLI_CASES: CliCase[] = [
  cli('snapshot-uuid-traversal', 'a path as instance uuid', ['snapshot', '../../etc/passwd'], 'InvalidInstanceId', badInstance('../../etc/passwd')),
  cli('snapshot-uuid-empty', 'an empty instance uuid', ['snapshot', ''], 'InvalidInstanceId', badInstance('')),
  cli('snapshot-image-id-traversal', 'a traversal to a canary as --image-id', ['snapshot', UNKNOWN_UUID, '--image-id', '../../outside/passwd'], 'InvalidImageId', badImage('../../outside/passwd')),
  cli('snapshot-image-id-absolute', '/etc/passwd as --image-id', ['snapshot', UNKNOWN_UUID, '--image-id', '/etc/passwd'], 'InvalidImageId', badImage('/etc/passwd')),
  cli('snapshot-image-id-empty', 'an empty --image-id', ['snapshot', UNKNOWN_UUID, '--image-id', ''], 'InvalidImageId', badImage('')),
  cli('snapshot-strategy-unknown', 'an unknown --strategy', ['snapshot', UNKNOWN_UUID, '--strategy', 'yolo'], 'UnknownStrategy', /unknown snapshot strategy "yolo": expected one of cold, suspend-create-resume-extract/),
  cli('snapshot-unknown-instance', 'a well-formed uuid that names no instance: the operation fails (exit 1), nothing is made', ['snapshot', UNKNOWN_UUID], 'InstanceNotFound', new RegExp(`instance ${UNKNOWN_UUID} not found`), 1),
  cli('images-show-traversal', 'images show with a traversal to a canary', ['images', 'show', '../../outside/passwd'], 'InvalidImageId', badImage('../../outside/passwd')),
  cli('images-show-absolute', 'images show /etc/passwd', ['images', 'show', '/etc/passwd'], 'InvalidImageId', badImage('/etc/passwd')),
  cli('images-show-dotdot', 'images show ..', ['images', 'show', '..'], 'InvalidImageId', badImage('..')),
  cli('images-show-partial', "images show of the store's .partial folder", ['images', 'show', '.partial'], 'InvalidImageId', badImage('.partial')),
  cli('images-show-newline', 'a uuid, a newline and a path', ['images', 'show', `${NEW_IMAGE}\n../../outside/passwd`], 'InvalidImageId', badImage(`${NEW_IMAGE}\n../../outside/passwd`)),
  cli('images-show-unknown', 'a well-formed id that names no image (exit 1)', ['images', 'show', UNKNOWN_UUID], 'ImageNotFound', new RegExp(`image ${UNKNOWN_UUID} not found`), 1),
  cli('images-delete-absolute', 'images delete /etc/passwd', ['images', 'delete', '/etc/passwd'], 'InvalidImageId', badImage('/etc/passwd')),
  cli('images-delete-traversal', 'images delete of a canary by traversal', ['images', 'delete', '../../outside/passwd'], 'InvalidImageId', badImage('../../outside/passwd')),
  cli('images-verify-traversal', 'images verify of a canary by traversal', ['images', 'verify', '../../outside/passwd'], 'InvalidImageId', badImage('../../outside/passwd')),
  cli('images-show-long', 'a 10 000-character image id: quoted cut short, not echoed whole', ['images', 'show', 'a'.repeat(10_000)], 'InvalidImageId', /invalid image id "a{80}"… \(10000 characters\): expected a UUID/),
  cli('instances-start-traversal', 'instances start with a path', ['instances', 'start', '../../etc/passwd'], 'InvalidInstanceId', badInstance('../../etc/passwd')),
  cli('instances-delete-traversal', 'instances delete (rm -r of the instance folder) with a traversal to the canary folder', ['instances', 'delete', '../../outside'], 'InvalidInstanceId', badInstance('../../outside')),
  cli('instances-delete-dot', 'instances delete . (the instances folder itself)', ['instances', 'delete', '.'], 'InvalidInstanceId', badInstance('.')),
  cli('instances-reboot-traversal', 'instances reboot --hard with a path', ['instances', 'reboot', '--hard', '../x'], 'InvalidInstanceId', badInstance('../x')),
  cli('instances-create-uuid-traversal', 'instances create with a path as --uuid', ['instances', 'create', '--name', 'x', '--uuid', '../../outside/new'], 'InvalidInstanceId', badInstance('../../outside/new')),
  cli('instances-create-name-empty', 'instances create with an empty --name', ['instances', 'create', '--name', ''], 'UsageError', /name must be a non-empty string/),
  cli('instances-create-memory-negative', 'a negative --memory-mb', ['instances', 'create', '--name', 'x', '--memory-mb', '-5'], 'CommanderError', /option '--memory-mb <n>' argument '-5' is invalid\. expected a positive integer/),
  cli('instances-create-memory-huge', 'a --memory-mb beyond the safe integers', ['instances', 'create', '--name', 'x', '--memory-mb', '99999999999999999999'], 'CommanderError', /option '--memory-mb <n>' argument '99999999999999999999' is invalid\. expected a positive integer/),
  cli('instances-create-vcpus-fraction', 'a fractional --vcpus', ['instances', 'create', '--name', 'x', '--vcpus', '1.5'], 'CommanderError', /option '--vcpus <n>' argument '1\.5' is invalid\. expected a positive integer/),
  cli('instances-create-disk-size-garbage', 'a --disk-size with an unknown unit', ['instances', 'create', '--name', 'x', '--disk-size', '1X'], 'CommanderError', /option '--disk-size <size>' argument '1X' is invalid\. expected a size such as 1G, 512M or 1048576/),
  cli('instances-create-disk-size-huge', 'a --disk-size beyond the safe integers', ['instances', 'create', '--name', 'x', '--disk-size', '99999999999999T'], 'CommanderError', /option '--disk-size <size>' argument '99999999999999T' is invalid\. expected a size/),
  cli('instances-create-base-format', 'a --base-format that is neither qcow2 nor raw', ['instances', 'create', '--name', 'x', '--base-format', 'vmdk'], 'UsageError', /--base-format: expected qcow2 or raw, got "vmdk"/),
  cli('instances-create-machine-injection', 'a --machine that would add QEMU options', ['instances', 'create', '--name', 'x', '--machine', 'pc,accel=kvm'], 'UsageError', /machine must be a QEMU machine type such as "pc" or "q35"/),
  cli('instances-create-kernel-missing', 'a --kernel that does not exist: nothing is created', ['instances', 'create', '--name', 'x', '--kernel', '../../outside/no-such-vmlinuz'], 'UsageError', /"kernel" ".*\/outside\/no-such-vmlinuz" does not exist/),
  cli('instances-create-kernel-directory', 'a folder as --kernel', ['instances', 'create', '--name', 'x', '--kernel', '../../outside'], 'UsageError', /"kernel" ".*\/outside" is not a regular file/),
  cli('instances-create-initrd-missing', 'a --kernel that exists with an --initrd that does not', ['instances', 'create', '--name', 'x', '--kernel', '../../outside/canary.txt', '--initrd', '../../outside/no-such-initrd'], 'UsageError', /"initrd" ".*\/outside\/no-such-initrd" does not exist/),
  cli('instances-create-initrd-no-kernel', 'an --initrd without a --kernel', ['instances', 'create', '--name', 'x', '--initrd', '../../outside/canary.txt'], 'UsageError', /"initrd" and "cmdline" need a "kernel"/),
  cli('instances-create-cmdline-newline', 'a --cmdline of two lines', ['instances', 'create', '--name', 'x', '--kernel', '../../outside/canary.txt', '--cmdline', 'console=ttyS0\ninit=/bin/sh'], 'UsageError', /"cmdline" must be a string of one line/),
  cli('instances-create-cmdline-huge', 'a --cmdline longer than the kernel takes', ['instances', 'create', '--name', 'x', '--kernel', '../../outside/canary.txt', '--cmdline', 'x'.repeat(5000)], 'UsageError', /"cmdline" is longer than 2047 bytes/),
  cli('cleanup-traversal', 'cleanup with a path', ['cleanup', '../x'], 'InvalidInstanceId', badInstance('../x')),
  cli('unknown-command', 'a command that does not exist', ['frobnicate'], 'CommanderError', /unknown command 'frobnicate'/),
  cli('unknown-cli-option', 'an option a command does not take', ['images', 'list', '--force'], 'CommanderError', /unknown option '--force'/),
  cli('missing-argument', 'images show without an id', ['images', 'show'], 'CommanderError', /missing required argument 'id'/),
  cli('excess-argument', 'images list with an extra argument', ['images', 'list', '../../etc'], 'CommanderError', /too many arguments for 'list'\. Expected 0 arguments but got 1/),
  cli('config-file-no-value', '--config-file with nothing after it', ['--config-file'], 'CommanderError', /option '--config-file <file>' argument missing/, 2, { noConfig: true }),
];

export const CORPUS: HostileCase[] = [...RPC_CASES, ...CONFIG_CASES, ...CLI_CASES];

/** Case ids are unique (they name tests, config files and reply msg ids). */
export function assertUniqueIds(cases: readonly HostileCase[] = CORPUS): void {
  const seen = new Set<string>();
  for (const c of cases) {
    if (seen.has(c.id)) throw new Error(`duplicate hostile case id ${c.id}`);
    seen.add(c.id);
  }
}
