import { describe, expect, it } from 'vitest';
import { InstanceNotFound } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import type { Bus, MessageProperties } from '../../src/messaging/bus.js';
import { unwrap } from '../../src/messaging/envelope.js';
import { NoopNotifier, OsloNotifier, type OsloNotifierDeps } from '../../src/messaging/notifier.js';

interface Published {
  exchange: string;
  routingKey: string;
  message: Record<string, unknown>;
  raw: Record<string, unknown>;
  props: MessageProperties | undefined;
}

/** Records what the notifier declares and publishes; nothing else of the Bus is used. */
function recordingBus(opts: { failPublish?: boolean } = {}) {
  const ops: string[] = [];
  const published: Published[] = [];
  const bus = {
    async assertExchange(name: string, type: string, o: unknown) {
      ops.push(`exchange ${name} ${type} ${JSON.stringify(o)}`);
    },
    async assertQueue(name: string, o: unknown) {
      ops.push(`queue ${name} ${JSON.stringify(o)}`);
      return name;
    },
    async bindQueue(queue: string, exchange: string, key: string) {
      ops.push(`bind ${queue} ${exchange} ${key}`);
    },
    async publish(exchange: string, routingKey: string, body: Buffer, props?: MessageProperties) {
      if (opts.failPublish) throw new Error('connection lost');
      published.push({ exchange, routingKey, message: unwrap(body), raw: JSON.parse(body.toString()) as Record<string, unknown>, props });
    },
    on() {
      return bus;
    },
  };
  return { bus: bus as unknown as Bus, ops, published };
}

const INSTANCE_UUID = '178b0921-8f85-4257-88b6-2e743b5a975c';
const IMAGE_ID = 'd2aae36f-785c-4518-8016-bc9534d9fc7f';
const NOVA_INSTANCE = {
  'nova_object.name': 'Instance',
  'nova_object.namespace': 'nova',
  'nova_object.version': '2.7',
  'nova_object.data': {
    uuid: INSTANCE_UUID,
    user_id: 'fake',
    project_id: '6f70656e737461636b20342065766572',
    display_name: 'some-server',
    hostname: 'some-server',
    host: 'compute',
    node: 'fake-mini',
    image_ref: '155d900f-4e14-4e4c-a73d-069cbf4541e6',
    vm_state: 'active',
    power_state: 1,
    task_state: 'image_snapshot',
    auto_disk_config: false,
    metadata: { a: 'b' },
    flavor: { 'nova_object.name': 'Flavor', 'nova_object.data': { flavorid: 'f1', name: 'small', memory_mb: 512, vcpus: 1 } },
  },
};
const info = {
  instanceUuid: INSTANCE_UUID,
  imageId: IMAGE_ID,
  strategy: 'deferred-delete',
  requestId: 'req-5b6c791d-5709-4f36-8fbe-c3e02869e35d',
  userId: 'fake',
  projectId: '6f70656e737461636b20342065766572',
  instance: NOVA_INSTANCE,
};

function notifier(over: Partial<OsloNotifierDeps> & { bus: Bus }) {
  return new OsloNotifier({ controlExchange: 'nova', host: 'host1', log: silentLogger(), ...over });
}

describe('OsloNotifier', () => {
  it('sends versioned instance.snapshot.start like nova-compute, in envelope 2.0', async () => {
    const { bus, published, ops } = recordingBus();
    await notifier({ bus, format: 'versioned' }).snapshotStart(info);
    expect(published).toHaveLength(1);
    const [p] = published;
    expect(p!.exchange).toBe('nova');
    expect(p!.routingKey).toBe('versioned_notifications.info');
    expect(p!.raw['oslo.version']).toBe('2.0');
    expect(p!.props).toMatchObject({ contentType: 'application/json' });
    expect(p!.message).toMatchObject({
      message_id: expect.stringMatching(/^[0-9a-f-]{36}$/),
      publisher_id: 'nova-compute:host1',
      event_type: 'instance.snapshot.start',
      priority: 'INFO',
      timestamp: expect.stringMatching(/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$/),
      _unique_id: expect.stringMatching(/^[0-9a-f]{32}$/),
      _context_request_id: info.requestId,
      _context_user_id: 'fake',
    });
    const payload = p!.message.payload as Record<string, any>;
    expect(payload['nova_object.name']).toBe('InstanceActionSnapshotPayload');
    expect(payload['nova_object.namespace']).toBe('nova');
    expect(payload['nova_object.version']).toBe('1.10');
    expect(payload['nova_object.data']).toMatchObject({
      uuid: INSTANCE_UUID,
      snapshot_image_id: IMAGE_ID,
      tenant_id: '6f70656e737461636b20342065766572',
      display_name: 'some-server',
      host: 'compute',
      image_uuid: '155d900f-4e14-4e4c-a73d-069cbf4541e6',
      state: 'active',
      power_state: 'running',
      task_state: 'image_snapshot',
      auto_disk_config: 'MANUAL',
      request_id: info.requestId,
      action_initiator_user: 'fake',
      fault: null,
      strategy: 'deferred-delete',
      downtime_ms: null,
      bytes: null,
    });
    expect(payload['nova_object.data'].flavor).toMatchObject({
      'nova_object.name': 'FlavorPayload',
      'nova_object.data': { flavorid: 'f1', name: 'small', memory_mb: 512, vcpus: 1 },
    });
    // oslo declares a queue named after the routing key before publishing, so nothing is lost.
    expect(ops).toEqual([
      'exchange nova topic {"durable":false,"autoDelete":false}',
      'queue versioned_notifications.info {"durable":false,"autoDelete":false}',
      'bind versioned_notifications.info nova versioned_notifications.info',
    ]);
  });

  it('puts downtime_ms, strategy and bytes into the end notification', async () => {
    const { bus, published } = recordingBus();
    await notifier({ bus, format: 'versioned' }).snapshotEnd({ ...info, downtimeMs: 431, bytes: 1048576 });
    const data = (published[0]!.message.payload as Record<string, any>)['nova_object.data'];
    expect(published[0]!.message.event_type).toBe('instance.snapshot.end');
    expect(data).toMatchObject({ downtime_ms: 431, bytes: 1048576, strategy: 'deferred-delete', snapshot_image_id: IMAGE_ID });
  });

  it("takes the engine's result as a second argument (the compute manager's call style)", async () => {
    const { bus, published } = recordingBus();
    const n = notifier({ bus, format: 'versioned' });
    const { strategy: _omitted, ...withoutStrategy } = info;
    await n.snapshotEnd(withoutStrategy, { downtime_ms: 12, size: 4096, strategy: 'cold' });
    await n.snapshotError(withoutStrategy, new InstanceNotFound(INSTANCE_UUID));
    const [end, error] = published.map((p) => (p.message.payload as Record<string, any>)['nova_object.data']);
    expect(end).toMatchObject({ downtime_ms: 12, bytes: 4096, strategy: 'cold' });
    expect(error.fault['nova_object.data']).toMatchObject({ exception: 'InstanceNotFound' });
  });

  it('sends instance.snapshot.error with an ExceptionPayload fault on versioned_notifications.error', async () => {
    const { bus, published } = recordingBus();
    await notifier({ bus, format: 'both' }).snapshotError({ ...info, error: new InstanceNotFound(INSTANCE_UUID) });
    expect(published).toHaveLength(1); // no legacy snapshot error, as in nova
    const p = published[0]!;
    expect(p.routingKey).toBe('versioned_notifications.error');
    expect(p.message).toMatchObject({ event_type: 'instance.snapshot.error', priority: 'ERROR' });
    expect((p.message.payload as Record<string, any>)['nova_object.data'].fault).toMatchObject({
      'nova_object.name': 'ExceptionPayload',
      'nova_object.version': '1.1',
      'nova_object.data': {
        exception: 'InstanceNotFound',
        exception_message: `instance ${INSTANCE_UUID} not found`,
        function_name: 'snapshot_instance',
      },
    });
  });

  it('sends legacy compute.instance.snapshot.* on notifications.info when unversioned', async () => {
    const { bus, published } = recordingBus();
    const n = notifier({ bus, format: 'unversioned' });
    await n.snapshotStart({ instanceUuid: INSTANCE_UUID, imageId: IMAGE_ID, requestId: 'req-1' });
    await n.snapshotEnd({ instanceUuid: INSTANCE_UUID, imageId: IMAGE_ID, requestId: 'req-1', downtimeMs: 5, bytes: 7, strategy: 'cold' });
    expect(published.map((p) => [p.routingKey, p.message.event_type, p.message.publisher_id])).toEqual([
      ['notifications.info', 'compute.instance.snapshot.start', 'compute.host1'],
      ['notifications.info', 'compute.instance.snapshot.end', 'compute.host1'],
    ]);
    expect(published[1]!.message.payload).toMatchObject({
      instance_id: INSTANCE_UUID, snapshot_image_id: IMAGE_ID, downtime_ms: 5, bytes: 7, strategy: 'cold', host: 'host1',
    });
  });

  it('sends both formats when asked, and nothing with the noop driver', async () => {
    const both = recordingBus();
    await notifier({ bus: both.bus, format: 'both' }).snapshotStart(info);
    expect(both.published.map((p) => p.routingKey).sort()).toEqual(['notifications.info', 'versioned_notifications.info']);

    const noop = recordingBus();
    await notifier({ bus: noop.bus, driver: 'noop' }).snapshotStart(info);
    expect(noop.published).toEqual([]);
    await new NoopNotifier().snapshotEnd({ ...info });
  });

  it('sends format 1.0 (unwrapped) with the messaging driver', async () => {
    const { bus, published } = recordingBus();
    await notifier({ bus, format: 'versioned', driver: 'messaging' }).snapshotStart(info);
    expect(published[0]!.raw['oslo.version']).toBeUndefined();
    expect(published[0]!.raw.event_type).toBe('instance.snapshot.start');
  });

  it('declares durable quorum queues when configured', async () => {
    const { bus, ops } = recordingBus();
    await notifier({ bus, format: 'versioned', rabbit: { quorumQueues: true } }).snapshotStart(info);
    expect(ops).toContain('exchange nova topic {"durable":true,"autoDelete":false}');
    expect(ops).toContain('queue versioned_notifications.info {"durable":true,"autoDelete":false,"arguments":{"x-queue-type":"quorum"}}');
  });

  it('never fails the operation when a notification cannot be sent', async () => {
    const { bus } = recordingBus({ failPublish: true });
    await expect(notifier({ bus }).snapshotStart(info)).resolves.toBeUndefined();
  });
});
