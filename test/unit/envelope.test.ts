import { execFileSync } from 'node:child_process';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { InstanceNotFound, InvalidArgument, MalformedMessage, NoSuchMethod, UnsupportedVersion } from '../../src/errors.js';
import {
  decodeRequest,
  DEFAULT_MAX_BODY_BYTES,
  encodeEnvelope,
  encodeNotification,
  encodeReply,
  isVersionCompatible,
  JSON_PROPERTIES,
  pythonUtcTimestamp,
  unwrap,
  type DecodeResult,
} from '../../src/messaging/envelope.js';
import {
  DRIVER_ERRORS_MODULE,
  OSLO_DISPATCHER_MODULE,
  parseFailure,
  serializeFailure,
  toOsloFailure,
} from '../../src/messaging/failure.js';

/** A call exactly as oslo.messaging 14 puts it on the wire (serialize_msg of _send's dict). */
const PYTHON_CALL = JSON.stringify({
  'oslo.version': '2.0',
  'oslo.message': JSON.stringify({
    method: 'snapshot_instance',
    args: { instance: { uuid: '178b0921-8f85-4257-88b6-2e743b5a975c' }, image_id: 'd2aae36f-785c-4518-8016-bc9534d9fc7f' },
    version: '6.0',
    _msg_id: '0f6a3c0c8a6f4f6e9f1e2d3c4b5a6978',
    _reply_q: 'reply_5b1f0c2e9d8a4b7c8e6f5a4b3c2d1e0f',
    _timeout: 60,
    _unique_id: '53aa62ebcb2743c0a49510b5ff13cdc7',
    _context_request_id: 'req-5b6c791d-5709-4f36-8fbe-c3e02869e35d',
    _context_user_id: 'fake',
    _context_project_id: '6f70656e737461636b20342065766572',
    _context_auth_token: 'gAAAAAsecret',
  }),
});

function ok(r: DecodeResult) {
  if (!r.ok) throw new Error(`expected a request, got: ${r.error.message}`);
  return r.request;
}

function bad(r: DecodeResult) {
  if (r.ok) throw new Error(`expected a malformed message, got method ${r.request.method}`);
  expect(r.error).toBeInstanceOf(MalformedMessage);
  return r;
}

const envelope = (inner: unknown) => Buffer.from(JSON.stringify({ 'oslo.version': '2.0', 'oslo.message': JSON.stringify(inner) }));

describe('decodeRequest', () => {
  afterEach(() => vi.restoreAllMocks());

  it('decodes an oslo 2.0 envelope call with its context, minus the auth token', () => {
    const req = ok(decodeRequest(Buffer.from(PYTHON_CALL)));
    expect(req).toEqual({
      method: 'snapshot_instance',
      args: { instance: { uuid: '178b0921-8f85-4257-88b6-2e743b5a975c' }, image_id: 'd2aae36f-785c-4518-8016-bc9534d9fc7f' },
      version: '6.0',
      uniqueId: '53aa62ebcb2743c0a49510b5ff13cdc7',
      msgId: '0f6a3c0c8a6f4f6e9f1e2d3c4b5a6978',
      replyQ: 'reply_5b1f0c2e9d8a4b7c8e6f5a4b3c2d1e0f',
      timeoutS: 60,
      context: {
        request_id: 'req-5b6c791d-5709-4f36-8fbe-c3e02869e35d',
        user_id: 'fake',
        project_id: '6f70656e737461636b20342065766572',
      },
    });
  });

  it('decodes an unwrapped 1.0 cast, with oslo defaults for a missing version and args', () => {
    const req = ok(decodeRequest(Buffer.from(JSON.stringify({ method: 'start_instance', namespace: 'compute', _unique_id: 'u1' }))));
    expect(req).toEqual({ method: 'start_instance', args: {}, version: '1.0', namespace: 'compute', uniqueId: 'u1', context: {} });
    expect(req.msgId).toBeUndefined();
  });

  it('treats null _msg_id/_reply_q/_timeout (a cast from oslo) as absent', () => {
    const req = ok(decodeRequest(envelope({ method: 'm', args: {}, version: '6.0', _timeout: null, namespace: null })));
    expect(req.timeoutS).toBeUndefined();
    expect(req.namespace).toBeUndefined();
  });

  it('accepts a numeric-string _timeout', () => {
    expect(ok(decodeRequest(envelope({ method: 'm', _msg_id: 'a', _reply_q: 'b', _timeout: '30' }))).timeoutS).toBe(30);
  });

  const cases: Array<[string, Buffer, RegExp]> = [
    ['not JSON', Buffer.from('{"method": '), /not JSON/],
    ['not UTF-8', Buffer.from([0x7b, 0xff, 0xfe, 0x7d]), /not JSON: not valid UTF-8/],
    ['a JSON array', Buffer.from('[1,2]'), /is an array, expected a JSON object/],
    ['a JSON string', Buffer.from('"hello"'), /is a string, expected a JSON object/],
    ['envelope version 1.0', Buffer.from(JSON.stringify({ 'oslo.version': '1.0', 'oslo.message': '{}' })), /unsupported envelope version "1.0"/],
    ['envelope version 2.1', Buffer.from(JSON.stringify({ 'oslo.version': '2.1', 'oslo.message': '{}' })), /unsupported envelope version "2.1"/],
    ['envelope version a number', Buffer.from(JSON.stringify({ 'oslo.version': 2, 'oslo.message': '{}' })), /"oslo.version" is 2, expected "2.0"/],
    ['envelope without oslo.message', Buffer.from(JSON.stringify({ 'oslo.version': '2.0', method: 'm' })), /no "oslo.message"/],
    ['envelope without oslo.version', Buffer.from(JSON.stringify({ 'oslo.message': '{}' })), /no "oslo.version"/],
    ['oslo.message an object', Buffer.from(JSON.stringify({ 'oslo.version': '2.0', 'oslo.message': { method: 'm' } })), /"oslo.message" is an object, expected a JSON string/],
    ['oslo.message not JSON', Buffer.from(JSON.stringify({ 'oslo.version': '2.0', 'oslo.message': '{nope' })), /"oslo.message" is not JSON/],
    ['oslo.message a JSON array', Buffer.from(JSON.stringify({ 'oslo.version': '2.0', 'oslo.message': '[]' })), /holds an array, expected a JSON object/],
    ['no method', envelope({ args: {} }), /no "method"/],
    ['method a number', envelope({ method: 42 }), /"method" is a number, expected a non-empty string/],
    ['method empty', envelope({ method: '' }), /"method" is a string, expected a non-empty string/],
    ['args an array', envelope({ method: 'm', args: [1] }), /"args" of m is an array, expected a JSON object/],
    ['args null', envelope({ method: 'm', args: null }), /"args" of m is null/],
    ['args a string', envelope({ method: 'm', args: 'x' }), /"args" of m is a string/],
    ['version a number', envelope({ method: 'm', version: 6.0 }), /"version" of m is 6, expected a "major.minor" string/],
    ['version without minor', envelope({ method: 'm', version: '6' }), /"version" of m is "6"/],
    ['version not numeric', envelope({ method: 'm', version: 'six.one' }), /"version" of m is "six.one"/],
    ['namespace a number', envelope({ method: 'm', namespace: 5 }), /"namespace" is a number/],
    ['_unique_id a number', envelope({ method: 'm', _unique_id: 5 }), /"_unique_id" is a number/],
    ['_msg_id without _reply_q', envelope({ method: 'm', _msg_id: 'abc' }), /"_msg_id" but no "_reply_q"/],
    ['_reply_q with a slash', envelope({ method: 'm', _msg_id: 'abc', _reply_q: 'a/b' }), /"_reply_q" has characters/],
    ['_timeout not a number', envelope({ method: 'm', _msg_id: 'a', _reply_q: 'b', _timeout: 'soon' }), /"_timeout" is "soon"/],
    ['_timeout negative', envelope({ method: 'm', _msg_id: 'a', _reply_q: 'b', _timeout: -1 }), /"_timeout" is -1/],
  ];
  it.each(cases)('refuses %s with its reason', (_name, body, reason) => {
    expect(bad(decodeRequest(body)).error.message).toMatch(reason);
  });

  it('gives the reply address of a malformed call, so it can be answered', () => {
    const r = bad(decodeRequest(envelope({ args: {}, _msg_id: 'm1', _reply_q: 'reply_x', _unique_id: 'u9' })));
    expect(r.replyTo).toEqual({ msgId: 'm1', replyQ: 'reply_x' });
    expect(r.uniqueId).toBe('u9');
    const cast = bad(decodeRequest(envelope({ args: {} })));
    expect(cast.replyTo).toBeUndefined();
  });

  it('finds where to reply in a truncated call', () => {
    const whole = envelope({ method: 'm', args: {}, _msg_id: 'm7', _reply_q: 'reply_7' }).toString();
    const r = bad(decodeRequest(Buffer.from(whole.slice(0, -3))));
    expect(r.error.message).toMatch(/not JSON/);
    expect(r.replyTo).toEqual({ msgId: 'm7', replyQ: 'reply_7' });
    expect(bad(decodeRequest(Buffer.from('{"method": "m", '))).replyTo).toBeUndefined();
  });

  it('refuses a 10 MiB body without parsing it, and still finds where to reply', () => {
    const parse = vi.spyOn(JSON, 'parse');
    const big = envelope({
      method: 'snapshot_instance',
      args: { blob: 'x'.repeat(10 * 1024 * 1024) },
      version: '6.0',
      _msg_id: 'abcdef0123',
      _reply_q: 'reply_0123abcd',
      _timeout: 60,
    });
    parse.mockClear();
    const r = bad(decodeRequest(big));
    expect(parse).not.toHaveBeenCalled();
    expect(r.error.message).toMatch(new RegExp(`message body is ${big.length} bytes, over the limit of ${DEFAULT_MAX_BODY_BYTES} bytes`));
    expect(r.replyTo).toEqual({ msgId: 'abcdef0123', replyQ: 'reply_0123abcd' });
  });

  it('honours a custom size limit', () => {
    const body = envelope({ method: 'm' });
    expect(decodeRequest(body, { maxBytes: body.length }).ok).toBe(true);
    expect(bad(decodeRequest(body, { maxBytes: body.length - 1 })).error.message).toMatch(/over the limit/);
  });
});

describe('isVersionCompatible (oslo _utils.version_is_compatible)', () => {
  it.each([
    ['6.2', '6.0', true],
    ['6.2', '6.2', true],
    ['6.2', '6.9', false],
    ['6.2', '7.0', false],
    ['6.2', '5.0', false],
    ['6.2', '6.2.1', false],
    ['6.2.1', '6.2.1', true],
    ['6.2', '6.1.9', true],
    ['6.10', '6.9', true],
  ])('serving %s, request %s → %s', (served, requested, expected) => {
    expect(isVersionCompatible(served, requested)).toBe(expected);
  });
});

describe('encoders', () => {
  it('encodes a final reply in envelope 2.0 with a fresh _unique_id each time', () => {
    const a = unwrap(encodeReply({ msgId: 'm1', result: { image_id: 'i' }, ending: true }));
    const b = unwrap(encodeReply({ msgId: 'm1', ending: false }));
    expect(a).toEqual({ result: { image_id: 'i' }, failure: null, ending: true, _msg_id: 'm1', _unique_id: expect.stringMatching(/^[0-9a-f]{32}$/) });
    expect(b).toMatchObject({ result: null, failure: null, ending: false, _msg_id: 'm1' });
    expect(a._unique_id).not.toBe(b._unique_id);
    const outer = JSON.parse(encodeReply({ msgId: 'm', ending: true }).toString()) as Record<string, unknown>;
    expect(Object.keys(outer)).toEqual(['oslo.version', 'oslo.message']);
    expect(typeof outer['oslo.message']).toBe('string');
  });

  it('publishes JSON the way kombu does', () => {
    expect(JSON_PROPERTIES).toEqual({ contentType: 'application/json', contentEncoding: 'utf-8', deliveryMode: 2 });
  });

  it('encodes a notification with _unique_id and _context_* keys, wrapped or not', () => {
    const n = {
      message_id: 'id1', publisher_id: 'nova-compute:h', event_type: 'instance.snapshot.start',
      priority: 'INFO' as const, payload: { a: 1 }, timestamp: '2024-01-02 03:04:05.000000',
    };
    const wrapped = unwrap(encodeNotification(n, { request_id: 'req-1' }));
    expect(wrapped).toEqual({ ...n, _unique_id: expect.stringMatching(/^[0-9a-f]{32}$/), _context_request_id: 'req-1' });
    const bare = JSON.parse(encodeNotification(n, {}, false).toString()) as Record<string, unknown>;
    expect(bare['oslo.version']).toBeUndefined();
    expect(bare.event_type).toBe('instance.snapshot.start');
  });

  it('formats timestamps like Python str(datetime.utcnow())', () => {
    expect(pythonUtcTimestamp(new Date('2024-05-06T07:08:09.123Z'))).toBe('2024-05-06 07:08:09.123000');
  });
});

describe('oslo failures', () => {
  it('sends our errors as snapshot_driver.errors with the stable class name', () => {
    const f = toOsloFailure(new InvalidArgument('argument image_id: expected a UUID'));
    expect(f).toMatchObject({
      class: 'InvalidArgument',
      module: DRIVER_ERRORS_MODULE,
      message: 'argument image_id: expected a UUID',
      args: ['argument image_id: expected a UUID'],
      kwargs: {},
    });
    expect(f.tb.length).toBeGreaterThan(0);
    expect(f.tb.every((l) => l.endsWith('\n'))).toBe(true);
    expect(toOsloFailure(new InstanceNotFound('u1')).class).toBe('InstanceNotFound');
  });

  it("sends NoSuchMethod and UnsupportedVersion as oslo's own dispatcher classes", () => {
    expect(toOsloFailure(new NoSuchMethod('Endpoint does not support RPC method x'))).toMatchObject({
      class: 'NoSuchMethod', module: OSLO_DISPATCHER_MODULE, args: ['Endpoint does not support RPC method x'],
    });
    expect(toOsloFailure(new UnsupportedVersion('v')).module).toBe(OSLO_DISPATCHER_MODULE);
  });

  it('copes with plain errors and non-errors, and round-trips through JSON', () => {
    expect(toOsloFailure(new TypeError('boom'))).toMatchObject({ class: 'TypeError', module: DRIVER_ERRORS_MODULE });
    expect(toOsloFailure('just a string')).toMatchObject({ class: 'Error', message: 'just a string' });
    const s = serializeFailure(new InvalidArgument('bad'));
    expect(typeof s).toBe('string');
    expect(parseFailure(s)).toEqual(JSON.parse(s));
    expect(() => parseFailure('[]')).toThrow(/not a JSON object/);
  });
});

/**
 * Cross-checks against the installed python3-oslo.messaging (14.0.3): the wire format is its.
 * Needs /usr/bin/python3 with oslo_messaging (or OSLO_PYTHON); fails loudly without it.
 */
describe('interop with the installed oslo.messaging', () => {
  const python = process.env.OSLO_PYTHON ?? '/usr/bin/python3';
  const runPython = (script: string, input: string): string => {
    try {
      return execFileSync(python, ['-c', script], { input, encoding: 'utf8' });
    } catch (err) {
      throw new Error(`running ${python} with oslo_messaging failed (install python3-oslo.messaging or set OSLO_PYTHON): ${String(err)}`);
    }
  };

  it('decodes what an oslo client sends', () => {
    const body = runPython(
      `
import json, sys
from oslo_messaging._drivers import common, amqp
msg = {'method': 'backup_instance', 'args': {'instance': {'uuid': 'u'}, 'image_id': 'i', 'backup_type': 'daily', 'rotation': 2},
       'version': '6.0', '_msg_id': 'abc123', '_reply_q': 'reply_x', '_timeout': 120}
amqp._add_unique_id(msg)
amqp.pack_context(msg, {'request_id': 'req-1', 'user_id': 'u1', 'project_id': 'p1'})
sys.stdout.write(json.dumps(common.serialize_msg(msg)))
`,
      '',
    );
    const req = ok(decodeRequest(Buffer.from(body)));
    expect(req).toMatchObject({
      method: 'backup_instance',
      args: { backup_type: 'daily', rotation: 2 },
      version: '6.0',
      msgId: 'abc123',
      replyQ: 'reply_x',
      timeoutS: 120,
      uniqueId: expect.stringMatching(/^[0-9a-f]{32}$/),
      context: { request_id: 'req-1', user_id: 'u1', project_id: 'p1' },
    });
  });

  it("rebuilds our replies and failures the way oslo's ReplyWaiter does", () => {
    const replies = [
      encodeReply({ msgId: 'm1', ending: false }),
      encodeReply({ msgId: 'm1', result: { image_id: 'i1' }, ending: true }),
      encodeReply({ msgId: 'm2', failure: serializeFailure(new NoSuchMethod('Endpoint does not support RPC method nope')), ending: true }),
      encodeReply({ msgId: 'm3', failure: serializeFailure(new UnsupportedVersion('Endpoint does not support RPC version 7.0')), ending: true }),
      encodeReply({ msgId: 'm4', failure: serializeFailure(new InvalidArgument('argument image_id: expected a UUID')), ending: true }),
    ].map((b) => b.toString());
    const out = runPython(
      `
import json, sys
from oslo_messaging._drivers import common
res = []
for line in sys.stdin.read().splitlines():
    data = common.deserialize_msg(json.loads(line))
    item = {'msg_id': data['_msg_id'], 'ending': data['ending'], 'result': data['result']}
    if data['failure']:
        for allowed in ([], ['oslo_messaging.rpc.dispatcher']):
            e = common.deserialize_remote_exception(data['failure'], allowed)
            item['allowed' if allowed else 'default'] = {
                'type': type(e).__name__, 'mro': [c.__module__ + '.' + c.__name__ for c in type(e).__mro__][:3],
                'exc_type': getattr(e, 'exc_type', None), 'value': getattr(e, 'value', None)}
    res.append(item)
sys.stdout.write(json.dumps(res))
`,
      replies.join('\n'),
    );
    const r = JSON.parse(out) as Array<Record<string, any>>;
    expect(r[0]).toEqual({ msg_id: 'm1', ending: false, result: null });
    expect(r[1]).toEqual({ msg_id: 'm1', ending: true, result: { image_id: 'i1' } });
    // Default client (nova allows only its own modules): RemoteError naming our class.
    expect(r[2]!.default).toMatchObject({ type: 'RemoteError', exc_type: 'NoSuchMethod' });
    // A client allowing oslo's dispatcher module gets the real oslo exception class.
    expect(r[2]!.allowed.mro).toContain('oslo_messaging.rpc.dispatcher.NoSuchMethod');
    expect(r[3]!.allowed.mro).toContain('oslo_messaging.rpc.dispatcher.UnsupportedVersion');
    expect(r[4]!.default).toMatchObject({ type: 'RemoteError', exc_type: 'InvalidArgument', value: 'argument image_id: expected a UUID' });
    expect(r[4]!.allowed).toMatchObject({ type: 'RemoteError', exc_type: 'InvalidArgument' });
  });

  it('encodes requests an oslo server would accept', () => {
    const body = encodeEnvelope({ method: 'm', args: { a: 1 }, version: '6.1', _unique_id: 'u' });
    const out = runPython(
      `
import json, sys
from oslo_messaging._drivers import common
sys.stdout.write(json.dumps(common.deserialize_msg(json.loads(sys.stdin.read()))))
`,
      body.toString(),
    );
    expect(JSON.parse(out)).toEqual({ method: 'm', args: { a: 1 }, version: '6.1', _unique_id: 'u' });
  });
});
