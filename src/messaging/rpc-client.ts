/**
 * A small oslo.messaging-style RPC client over a Bus (tests, the demo, tools): what a nova client does on the wire
 * (amqpdriver.py _send / ReplyWaiter): a `reply_<hex>` queue on the default exchange, requests in
 * envelope 2.0 to the control exchange with `_msg_id`, `_reply_q`, `_timeout`, `_unique_id` and
 * `_context_*` keys; a call waits for the reply with `ending: true`, counting `ending: false`
 * keep-alives, and drops replies whose `_unique_id` it has seen.
 */
import { randomUUID } from 'node:crypto';
import type { Bus, Delivery } from './bus.js';
import {
  encodeEnvelope,
  JSON_PROPERTIES,
  newUniqueId,
  packContext,
  unwrap,
  type ReplyMessage,
} from './envelope.js';
import { parseFailure, type OsloFailure } from './failure.js';

/** The call failed on the server: the decoded oslo failure. */
export class RemoteFailure extends Error {
  constructor(readonly failure: OsloFailure) {
    super(`${failure.class}: ${failure.message}`);
    this.name = 'RemoteFailure';
  }
}

export class ReplyTimeout extends Error {
  constructor(msgId: string, seconds: number) {
    super(`no reply to ${msgId} within ${seconds} s`);
    this.name = 'ReplyTimeout';
  }
}

export interface RpcClientOptions {
  /** The control exchange (default "nova"). */
  exchange?: string;
  /** Default "compute". */
  topic?: string;
  /** Send to `topic.server` rather than `topic`. */
  server?: string;
  /** Requested RPC version (default "6.0"). */
  version?: string;
  namespace?: string;
  context?: Record<string, unknown>;
}

export interface SendOptions {
  version?: string;
  namespace?: string;
  server?: string;
  /** Send to the `<topic>_fanout` exchange. */
  fanout?: boolean;
  uniqueId?: string;
  context?: Record<string, unknown>;
}

export interface CallOptions extends SendOptions {
  /** How long to wait for the final reply (default 30 s). */
  timeoutS?: number;
  /** `_timeout`, the call-monitor timeout: the server sends keep-alives every _timeout/2 s. */
  callMonitorTimeoutS?: number;
  /** Called with the running count on each keep-alive (ending:false) reply. */
  onKeepAlive?: (count: number) => void;
}

export interface CallOutcome {
  result: unknown;
  failure: OsloFailure | null;
  /** ending:false replies received before the final one. */
  keepAlives: number;
  /** Every reply message, decoded, in arrival order. */
  replies: ReplyMessage[];
}

interface Waiter {
  replies: ReplyMessage[];
  onReply: () => void;
  onKeepAlive?: (count: number) => void;
}

export class RpcClient {
  readonly replyQueue = `reply_${randomUUID().replaceAll('-', '')}`;
  private readonly exchange: string;
  private readonly topic: string;
  private readonly waiters = new Map<string, Waiter>();
  private readonly seenReplyIds = new Set<string>();
  private consumerTag: string | undefined;
  /** Replies that arrived for nobody (a msg_id no call is waiting for). */
  readonly strayReplies: ReplyMessage[] = [];

  constructor(
    private readonly bus: Bus,
    private readonly opts: RpcClientOptions = {},
  ) {
    this.exchange = opts.exchange ?? 'nova';
    this.topic = opts.topic ?? 'compute';
  }

  /** Declares the reply queue as oslo does (declare_direct_consumer) and consumes it. */
  async open(): Promise<this> {
    await this.bus.assertQueue(this.replyQueue, { durable: false, autoDelete: false, arguments: { 'x-expires': 1_800_000 } });
    this.consumerTag = await this.bus.consume(this.replyQueue, (d) => this.onReply(d), {});
    return this;
  }

  async close(): Promise<void> {
    if (this.consumerTag) await this.bus.cancel(this.consumerTag);
    this.consumerTag = undefined;
    await this.bus.deleteQueue(this.replyQueue);
  }

  /** The request dict as oslo's client builds it (_make_message + _send). */
  buildRequest(method: string, args: Record<string, unknown>, o: SendOptions = {}): Record<string, unknown> {
    const version = o.version ?? this.opts.version ?? '6.0';
    const namespace = o.namespace ?? this.opts.namespace;
    return {
      method,
      args,
      ...(namespace !== undefined && { namespace }),
      version,
      _unique_id: o.uniqueId ?? newUniqueId(),
      ...packContext({ request_id: `req-${randomUUID()}`, ...this.opts.context, ...o.context }),
    };
  }

  /** A cast; resolves with the `_unique_id` it carried. */
  async cast(method: string, args: Record<string, unknown>, o: SendOptions = {}): Promise<string> {
    const message = this.buildRequest(method, args, o);
    await this.publish(encodeEnvelope(message), o);
    return message._unique_id as string;
  }

  /** A call: resolves with the result, rejects with RemoteFailure (or ReplyTimeout). */
  async call(method: string, args: Record<string, unknown>, o: CallOptions = {}): Promise<unknown> {
    const outcome = await this.callRaw(method, args, o);
    if (outcome.failure) throw new RemoteFailure(outcome.failure);
    return outcome.result;
  }

  /** A call, returning every detail of what came back. */
  async callRaw(method: string, args: Record<string, unknown>, o: CallOptions = {}): Promise<CallOutcome> {
    const msgId = randomUUID().replaceAll('-', '');
    const message = {
      ...this.buildRequest(method, args, o),
      _msg_id: msgId,
      _reply_q: this.replyQueue,
      _timeout: o.callMonitorTimeoutS ?? null,
    };
    const done = this.waitReply(msgId, o.timeoutS, o.onKeepAlive);
    await this.publish(encodeEnvelope(message), o);
    return done;
  }

  /** Publishes raw bytes (malformed messages) to the topic (or `topic.server`). */
  async sendRaw(body: Buffer, o: { server?: string } = {}): Promise<void> {
    await this.publish(body, o);
  }

  /** A fresh msg_id and the reply address fields to put into a hand-made call. */
  newCallAddress(): { msgId: string; fields: { _msg_id: string; _reply_q: string } } {
    const msgId = randomUUID().replaceAll('-', '');
    return { msgId, fields: { _msg_id: msgId, _reply_q: this.replyQueue } };
  }

  /** Waits for the ending reply to msgId (registered before the request is sent). */
  waitReply(msgId: string, timeoutS = 30, onKeepAlive?: (count: number) => void): Promise<CallOutcome> {
    const waiter: Waiter = { replies: [], onReply: () => {}, ...(onKeepAlive && { onKeepAlive }) };
    this.waiters.set(msgId, waiter);
    return new Promise<CallOutcome>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(msgId);
        reject(new ReplyTimeout(msgId, timeoutS));
      }, timeoutS * 1000);
      waiter.onReply = () => {
        const last = waiter.replies.at(-1);
        if (!last?.ending) {
          waiter.onKeepAlive?.(waiter.replies.filter((r) => !r.ending).length);
          return;
        }
        clearTimeout(timer);
        this.waiters.delete(msgId);
        resolve({
          result: last.result,
          failure: last.failure ? parseFailure(last.failure) : null,
          keepAlives: waiter.replies.filter((r) => !r.ending).length,
          replies: [...waiter.replies],
        });
      };
    });
  }

  private async publish(body: Buffer, o: { server?: string; fanout?: boolean }): Promise<void> {
    if (o.fanout) {
      await this.bus.publish(`${this.topic}_fanout`, this.topic, body, { ...JSON_PROPERTIES });
      return;
    }
    const server = o.server ?? this.opts.server;
    const routingKey = server ? `${this.topic}.${server}` : this.topic;
    await this.bus.publish(this.exchange, routingKey, body, { ...JSON_PROPERTIES });
  }

  private onReply(d: Delivery): void {
    this.bus.ack(d);
    const reply = unwrap(d.body) as unknown as ReplyMessage;
    if (typeof reply._unique_id === 'string') {
      if (this.seenReplyIds.has(reply._unique_id)) return;
      this.seenReplyIds.add(reply._unique_id);
    }
    const waiter = this.waiters.get(reply._msg_id);
    if (!waiter) {
      this.strayReplies.push(reply);
      return;
    }
    waiter.replies.push(reply);
    waiter.onReply();
  }
}
