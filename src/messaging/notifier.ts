/**
 * Snapshot notifications over the bus, as nova-compute sends them through oslo.messaging's
 * `messagingv2` driver (notify/messaging.py, notify/notifier.py):
 * - versioned (`notification_format` versioned|both): `instance.snapshot.start|end` (INFO) and
 *   `instance.snapshot.error` (ERROR) on `versioned_notifications.<priority>`, publisher
 *   `nova-compute:<host>`, payload InstanceActionSnapshotPayload;
 * - unversioned (unversioned|both): `compute.instance.snapshot.start|end` on
 *   `notifications.info`, publisher `compute.<host>`. (nova sends no legacy snapshot error.)
 * Everything goes to the topic exchange `<control_exchange>`; the queue named after each routing key
 * is declared first, as oslo does, so nothing is lost before a consumer binds.
 * Like oslo, a notification that cannot be sent is logged and never fails the operation.
 */
import { randomUUID } from 'node:crypto';
import { errorMessage } from '../errors.js';
import type { Logger } from '../log.js';
import type { Bus } from './bus.js';
import { encodeNotification, JSON_PROPERTIES, pythonUtcTimestamp, type NotificationMessage } from './envelope.js';
import {
  legacySnapshotPayload,
  versionedSnapshotPayload,
  type SnapshotEndInfo,
  type SnapshotErrorInfo,
  type SnapshotNotificationInfo,
  type SnapshotOutcome,
} from './notification-payloads.js';
import { declareNotificationQueue, resolveRabbitOptions, type RabbitTopologyOptions } from './topology.js';

export type { SnapshotEndInfo, SnapshotErrorInfo, SnapshotNotificationInfo, SnapshotOutcome } from './notification-payloads.js';

/** `[notifications] notification_format`. */
export type NotificationFormat = 'versioned' | 'unversioned' | 'both';
/** `[oslo_messaging_notifications] driver`: messagingv2 (envelope 2.0), messaging (1.0, unwrapped), noop. */
export type NotificationDriver = 'messagingv2' | 'messaging' | 'noop';

/**
 * Both call styles work: `snapshotEnd({...info, downtimeMs, bytes})` or
 * `snapshotEnd(info, engineResult)`; `snapshotError({...info, error})` or `snapshotError(info, err)`.
 */
export interface SnapshotNotifier {
  snapshotStart(info: SnapshotNotificationInfo): Promise<void>;
  snapshotEnd(info: SnapshotEndInfo, result?: SnapshotOutcome): Promise<void>;
  snapshotError(info: SnapshotErrorInfo, error?: unknown): Promise<void>;
}

export interface OsloNotifierDeps {
  bus: Bus;
  /** `[DEFAULT] control_exchange`. */
  controlExchange: string;
  /** `[DEFAULT] host`. */
  host: string;
  /** Default "both". */
  format?: NotificationFormat;
  /** Default "messagingv2"; "noop" sends nothing. */
  driver?: NotificationDriver;
  /** Exchange/queue flags (amqp_durable_queues, amqp_auto_delete, rabbit_quorum_queue…). */
  rabbit?: Partial<RabbitTopologyOptions>;
  /** nova `[notifications] versioned_notifications_topics` (default ["versioned_notifications"]). */
  versionedTopics?: readonly string[];
  /** `[oslo_messaging_notifications] topics` (default ["notifications"]). */
  topics?: readonly string[];
  log: Logger;
}

type Priority = 'INFO' | 'ERROR';

export class OsloNotifier implements SnapshotNotifier {
  private readonly format: NotificationFormat;
  private readonly driver: NotificationDriver;
  private readonly rabbit: RabbitTopologyOptions;
  private readonly versionedTopics: readonly string[];
  private readonly topics: readonly string[];
  private readonly log: Logger;
  /** Routing keys whose queue is declared (or being declared). */
  private readonly declared = new Map<string, Promise<void>>();

  constructor(private readonly deps: OsloNotifierDeps) {
    this.format = deps.format ?? 'both';
    this.driver = deps.driver ?? 'messagingv2';
    this.rabbit = resolveRabbitOptions(deps.rabbit);
    this.versionedTopics = deps.versionedTopics ?? ['versioned_notifications'];
    this.topics = deps.topics ?? ['notifications'];
    this.log = deps.log.child({ component: 'notifier' });
    // The broker may have lost non-durable queues: declare them again on the next send.
    deps.bus.on('reconnected', () => this.declared.clear());
  }

  async snapshotStart(info: SnapshotNotificationInfo): Promise<void> {
    await this.emit(info, 'start', 'INFO', {});
  }

  async snapshotEnd(info: SnapshotEndInfo, result?: SnapshotOutcome): Promise<void> {
    const downtimeMs = info.downtimeMs ?? result?.downtime_ms;
    const bytes = info.bytes ?? result?.size;
    const strategy = info.strategy ?? result?.strategy;
    await this.emit({ ...info, ...(strategy !== undefined && { strategy }) }, 'end', 'INFO', {
      ...(downtimeMs !== undefined && { downtimeMs }),
      ...(bytes !== undefined && { bytes }),
    });
  }

  async snapshotError(info: SnapshotErrorInfo, error?: unknown): Promise<void> {
    await this.emit(info, 'error', 'ERROR', {
      fault: error ?? info.error ?? new Error('unknown error'),
      ...(info.downtimeMs !== undefined && { downtimeMs: info.downtimeMs }),
      ...(info.bytes !== undefined && { bytes: info.bytes }),
    });
  }

  private async emit(
    info: SnapshotNotificationInfo,
    phase: 'start' | 'end' | 'error',
    priority: Priority,
    extras: { fault?: unknown; downtimeMs?: number; bytes?: number },
  ): Promise<void> {
    if (this.driver === 'noop') return;
    const host = this.deps.host;
    const context = {
      request_id: info.requestId,
      ...(info.userId !== undefined && { user_id: info.userId }),
      ...(info.projectId !== undefined && { project_id: info.projectId }),
    };
    const sends: Promise<void>[] = [];
    if (this.format !== 'unversioned') {
      const message = this.message(`nova-compute:${host}`, `instance.snapshot.${phase}`, priority,
        versionedSnapshotPayload(info, { host, ...extras }));
      for (const topic of this.versionedTopics) sends.push(this.send(topic, priority, message, context, info));
    }
    if (this.format !== 'versioned' && phase !== 'error') {
      const message = this.message(`compute.${host}`, `compute.instance.snapshot.${phase}`, priority,
        legacySnapshotPayload(info, { host, ...extras }));
      for (const topic of this.topics) sends.push(this.send(topic, priority, message, context, info));
    }
    await Promise.all(sends);
  }

  private message(publisherId: string, eventType: string, priority: Priority, payload: unknown): NotificationMessage {
    return {
      message_id: randomUUID(),
      publisher_id: publisherId,
      event_type: eventType,
      priority,
      payload,
      timestamp: pythonUtcTimestamp(),
    };
  }

  private async send(
    topic: string,
    priority: Priority,
    message: NotificationMessage,
    context: Record<string, unknown>,
    info: SnapshotNotificationInfo,
  ): Promise<void> {
    const routingKey = `${topic}.${priority.toLowerCase()}`;
    const { bus, controlExchange } = this.deps;
    try {
      await this.ensureQueue(routingKey);
      const body = encodeNotification(message, context, this.driver === 'messagingv2');
      await bus.publish(controlExchange, routingKey, body, { ...JSON_PROPERTIES });
      this.log.debug({ event_type: message.event_type, routing_key: routingKey, request_id: info.requestId,
        instance_uuid: info.instanceUuid }, 'notification sent');
    } catch (err) {
      this.log.error({ event_type: message.event_type, routing_key: routingKey, request_id: info.requestId,
        instance_uuid: info.instanceUuid, err: errorMessage(err) }, 'could not send notification');
    }
  }

  private ensureQueue(routingKey: string): Promise<void> {
    let p = this.declared.get(routingKey);
    if (!p) {
      p = declareNotificationQueue(this.deps.bus, this.deps.controlExchange, routingKey, this.rabbit);
      p.catch(() => this.declared.delete(routingKey));
      this.declared.set(routingKey, p);
    }
    return p;
  }
}

/** A notifier that sends nothing (`driver = noop`, or tests). */
export class NoopNotifier implements SnapshotNotifier {
  async snapshotStart(_info: SnapshotNotificationInfo): Promise<void> {}
  async snapshotEnd(_info: SnapshotEndInfo, _result?: SnapshotOutcome): Promise<void> {}
  async snapshotError(_info: SnapshotErrorInfo, _error?: unknown): Promise<void> {}
}
