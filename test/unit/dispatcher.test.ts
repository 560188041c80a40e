import { describe, expect, it } from 'vitest';
import { InvalidArgument, NoSuchMethod, UnsupportedVersion } from '../../src/errors.js';
import { checkRequest } from '../../src/messaging/dispatcher.js';
import { instanceUuidOf, requestContext, withRequestId } from '../../src/messaging/request-context.js';
import type { RpcRequest, RpcTarget } from '../../src/messaging/rpc-types.js';

function target(over: Partial<RpcTarget> = {}): RpcTarget & { validated: Array<[string, Record<string, unknown>]> } {
  const validated: Array<[string, Record<string, unknown>]> = [];
  return {
    version: '6.2',
    methods: new Set(['snapshot_instance', 'start_instance']),
    validate(method, args) {
      validated.push([method, args]);
      if (method === 'snapshot_instance' && typeof args.image_id !== 'string') {
        throw new InvalidArgument('argument image_id: expected a UUID string');
      }
    },
    async call() {
      return null;
    },
    validated,
    ...over,
  };
}

const req = (over: Partial<RpcRequest> = {}): RpcRequest => ({
  method: 'snapshot_instance',
  args: { instance: { uuid: 'u' }, image_id: 'i' },
  version: '6.0',
  context: {},
  ...over,
});

describe('checkRequest', () => {
  it('passes a compatible request and validates its arguments', () => {
    const t = target();
    checkRequest(t, req({ version: '6.2' }));
    expect(t.validated).toEqual([['snapshot_instance', { instance: { uuid: 'u' }, image_id: 'i' }]]);
  });

  it.each(['7.0', '6.9', '5.0', '6.2.1'])('refuses version %s when serving 6.2 with UnsupportedVersion', (version) => {
    const t = target();
    expect(() => checkRequest(t, req({ version }))).toThrow(UnsupportedVersion);
    expect(() => checkRequest(t, req({ version }))).toThrow(
      `Endpoint does not support RPC version ${version}. Attempted method: snapshot_instance (served: 6.2)`,
    );
    expect(t.validated).toEqual([]);
  });

  it('checks the version before the method, as oslo does', () => {
    expect(() => checkRequest(target(), req({ method: 'nope', version: '7.0' }))).toThrow(UnsupportedVersion);
  });

  it('refuses an unknown method with NoSuchMethod', () => {
    const t = target();
    expect(() => checkRequest(t, req({ method: 'reboot_instance' }))).toThrow(NoSuchMethod);
    expect(() => checkRequest(t, req({ method: 'reboot_instance' }))).toThrow('Endpoint does not support RPC method reboot_instance');
    expect(t.validated).toEqual([]);
  });

  it('never dispatches a private method, even one the target lists', () => {
    const t = target({ methods: new Set(['_secret']) });
    expect(() => checkRequest(t, req({ method: '_secret' }))).toThrow(NoSuchMethod);
  });

  it('matches the namespace: null only with null, a name only with that name', () => {
    expect(() => checkRequest(target(), req({ namespace: 'baseapi' }))).toThrow(UnsupportedVersion);
    expect(() => checkRequest(target({ namespace: 'compute' }), req())).toThrow(/namespace null, served: "compute"/);
    expect(() => checkRequest(target({ namespace: 'compute' }), req({ namespace: 'compute' }))).not.toThrow();
  });

  it("lets the target's validation error through, naming the argument", () => {
    expect(() => checkRequest(target(), req({ args: { instance: { uuid: 'u' }, image_id: 7 } }))).toThrow(
      new InvalidArgument('argument image_id: expected a UUID string'),
    );
  });
});

describe('request context', () => {
  it('reads request, user and project ids from the oslo context', () => {
    const ctx = requestContext(req({ context: { request_id: 'req-1', user_id: 'u', project_id: 'p', roles: ['admin'] } }));
    expect(ctx).toEqual({ requestId: 'req-1', userId: 'u', projectId: 'p', raw: { request_id: 'req-1', user_id: 'u', project_id: 'p', roles: ['admin'] } });
    expect(requestContext(req({ context: { user: 'u2', tenant: 't2' } }))).toMatchObject({ userId: 'u2', projectId: 't2' });
  });

  it('makes up a nova-style request id once, and keeps it', () => {
    const r = withRequestId(req());
    expect(r.context.request_id).toMatch(/^req-[0-9a-f-]{36}$/);
    expect(requestContext(r).requestId).toBe(r.context.request_id);
    expect(withRequestId(r)).toBe(r);
  });

  it('finds the instance uuid in a nova object primitive or a plain dict', () => {
    const uuid = '178b0921-8f85-4257-88b6-2e743b5a975c';
    expect(instanceUuidOf({ instance: { 'nova_object.name': 'Instance', 'nova_object.data': { uuid } } })).toBe(uuid);
    expect(instanceUuidOf({ instance: { uuid } })).toBe(uuid);
    expect(instanceUuidOf({ instance: 'nope' })).toBeUndefined();
    expect(instanceUuidOf({})).toBeUndefined();
  });
});
