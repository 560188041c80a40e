import { connect, type Channel, type ChannelModel, type ConsumeMessage } from 'amqplib';
import { RABBIT_HOST, RABBIT_PORT } from './rabbitmq.js';

/** One versioned notification as seen on the wire: its routing key and the decoded oslo message. */
export interface SeenNotification {
  routingKey: string;
  message: Record<string, unknown>;
}

/**
 * Versioned notifications seen on the control exchange `nova` of a vhost, through an exclusive
 * queue of our own bound to `versioned_notifications.*` (info: start, end; error: error). Open it
 * once an agent has served (the agent declares the exchange) and before the requests to watch.
 */
export class NotificationTap {
  readonly seen: SeenNotification[] = [];
  private readonly waiters = new Set<() => void>();
  private constructor(private readonly conn: ChannelModel) {}

  static async open(vhost: string, queue: string): Promise<NotificationTap> {
    const conn = await connect(`amqp://guest:guest@${RABBIT_HOST}:${RABBIT_PORT}/${encodeURIComponent(vhost)}`);
    const ch: Channel = await conn.createChannel();
    await ch.checkExchange('nova');
    await ch.assertQueue(queue, { exclusive: true, durable: false, autoDelete: true });
    await ch.bindQueue(queue, 'nova', 'versioned_notifications.*');
    const t = new NotificationTap(conn);
    await ch.consume(queue, (m) => m && t.onMessage(m), { noAck: true });
    return t;
  }

  private onMessage(m: ConsumeMessage): void {
    const outer = JSON.parse(m.content.toString('utf8')) as Record<string, unknown>;
    const message = typeof outer['oslo.message'] === 'string' ? (JSON.parse(outer['oslo.message']) as Record<string, unknown>) : outer;
    this.seen.push({ routingKey: m.fields.routingKey, message });
    for (const w of [...this.waiters]) w();
  }

  /** The notifications `eventType` for image `imageId` (its payload's snapshot_image_id). */
  find(eventType: string, imageId: string): SeenNotification[] {
    return this.seen.filter((n) => n.message.event_type === eventType && payloadData(n.message).snapshot_image_id === imageId);
  }

  waitFor(eventType: string, imageId: string, timeoutMs = 30_000): Promise<SeenNotification> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const found = this.find(eventType, imageId)[0];
        if (!found) return;
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve(found);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`no ${eventType} notification for image ${imageId} within ${timeoutMs} ms; seen: ${JSON.stringify(this.seen.map((n) => n.message.event_type))}`));
      }, timeoutMs);
      this.waiters.add(check);
      check();
    });
  }

  async close(): Promise<void> {
    await this.conn.close().catch(() => undefined);
  }
}

/** The `nova_object.data` of a versioned notification's payload. */
export function payloadData(message: Record<string, unknown>): Record<string, unknown> {
  const payload = message.payload as Record<string, unknown> | undefined;
  return (payload?.['nova_object.data'] as Record<string, unknown> | undefined) ?? {};
}

/** The exception payload (`fault`) of an error notification: `exception`, `exception_message`, … */
export function faultOf(message: Record<string, unknown>): Record<string, unknown> {
  return (payloadData(message).fault as Record<string, unknown>)['nova_object.data'] as Record<string, unknown>;
}
