/**
 * The oslo.messaging-compatible RPC server (SPEC §5): consumes `compute`, `compute.<host>` and the
 * `compute` fanout queue, and carries each request through
 *
 *   decode → dispatch checks → duplicate? → journal.accept → ack → target.call → journal.finish → reply
 *
 * Intake (everything up to the ack) runs one delivery at a time, in delivery order, so a duplicate
 * can never slip past `journal.has` while its twin is being journaled; the calls themselves run
 * concurrently (the target orders work per instance).
 *
 * Nothing is requeued forever: a malformed or refused message is acked, logged with its reason,
 * and answered with a failure when it was a call whose reply address could be read.
 */
import type { Secret } from '../util/secret.js';
import type { Logger } from '../log.js';
import type { AgentMetrics } from '../metrics/agent-metrics.js';
import { UNKNOWN_METHOD, type RpcResultLabel } from '../metrics/names.js';
import { faultPointAfterOutput } from '../util/fault.js';
import { errorMessage, errorName, SnapshotDriverError } from '../errors.js';
import type { Bus, Delivery } from './bus.js';
import { checkRequest } from './dispatcher.js';
import { decodeRequest, DEFAULT_MAX_BODY_BYTES, encodeReply, JSON_PROPERTIES, type ReplyAddress } from './envelope.js';
import { serializeFailure } from './failure.js';
import { instanceUuidOf, requestContext, withRequestId } from './request-context.js';
import type { JournalEntry, RequestJournal, RpcContext, RpcRequest, RpcTarget } from './rpc-types.js';
import {
  declareRpcServerTopology,
  resolveRabbitOptions,
  type RabbitTopologyOptions,
  type RpcServerQueues,
} from './topology.js';

/** The longest delay a Node timer takes (2^31-1 ms, about 24.8 days). */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** A received string for a log field, cut short. */
function clip(s: string, max = 255): string {
  return s.length <= max ? s : `${s.slice(0, max)}…`;
}

export interface RpcServerDeps {
  bus: Bus;
  target: RpcTarget;
  journal: RequestJournal;
  /** `[DEFAULT] control_exchange` (nova's is "nova"). */
  controlExchange: string;
  /** `[DEFAULT] host`: the server part of the `compute.<host>` queue. */
  host: string;
  /** Default "compute". */
  topic?: string;
  /** `[oslo_messaging_rabbit]` flags; oslo's defaults for whatever is left out. */
  rabbit?: Partial<RabbitTopologyOptions>;
  log: Logger;
  /** Bodies above this are refused unparsed. Default 1 MiB. */
  maxMessageBytes?: number;
  /** Requests by method and result (snapshot_driver_rpc_requests_total). */
  metrics?: AgentMetrics;
}

/** What target.call receives: the RpcContext plus the operation's logger (request_id, instance_uuid). */
export type RpcCallContext = RpcContext & { log: Logger };

export class RpcServer {
  private readonly topic: string;
  private readonly rabbit: RabbitTopologyOptions;
  private readonly maxBytes: number;
  private readonly log: Logger;
  private queuesDeclared: RpcServerQueues | undefined;
  private consumerTags: string[] = [];
  private intake: Promise<void> = Promise.resolve();
  private readonly running = new Set<Promise<void>>();
  private state: 'new' | 'starting' | 'serving' | 'stopping' | 'stopped' = 'new';

  constructor(private readonly deps: RpcServerDeps) {
    this.topic = deps.topic ?? 'compute';
    this.rabbit = resolveRabbitOptions(deps.rabbit);
    this.maxBytes = deps.maxMessageBytes ?? DEFAULT_MAX_BODY_BYTES;
    this.log = deps.log.child({ component: 'rpc-server' });
  }

  /** The queues declared by start(): `compute`, `compute.<host>`, and the fanout queue's generated name. */
  get queues(): RpcServerQueues | undefined {
    return this.queuesDeclared;
  }

  /**
   * Declares the topology, carries out the journal's unfinished requests (to the end, in
   * acceptance order), then starts consuming.
   */
  async start(): Promise<void> {
    if (this.state !== 'new') throw new Error(`RpcServer.start() called when ${this.state}`);
    this.state = 'starting';
    const { bus, controlExchange, host } = this.deps;
    this.queuesDeclared = await declareRpcServerTopology(bus, { controlExchange, topic: this.topic, server: host }, this.rabbit);

    const unfinished = await this.deps.journal.unfinished();
    if (unfinished.length > 0) {
      this.log.info({ count: unfinished.length }, 'carrying out unfinished requests from the journal');
      for (const entry of unfinished) this.launch(entry, true);
      await this.drainRunning();
    }
    if (this.state !== 'starting') return; // stop() was called meanwhile

    const queues = [...this.queuesDeclared.topic.map((t) => t.queue), this.queuesDeclared.fanoutQueue];
    this.state = 'serving';
    for (const queue of queues) {
      const tag = await bus.consume(queue, (d) => this.onDelivery(d), { prefetch: this.rabbit.prefetchCount });
      if (this.state !== 'serving') {
        await bus.cancel(tag); // stop() came while we were subscribing
        return;
      }
      this.consumerTags.push(tag);
    }
    this.log.info(
      { exchange: controlExchange, queues, prefetch: this.rabbit.prefetchCount },
      'RPC server consuming',
    );
  }

  /**
   * Carries out to the end the journal's unfinished requests that `select` picks (in acceptance
   * order) without consuming from any queue: `cleanup` settles so the requests whose operation was
   * interrupted, and leaves the others to the next `serve`. Resolves with how many it carried out.
   */
  async runJournaled(select: (entry: JournalEntry) => boolean | Promise<boolean>): Promise<number> {
    if (this.state !== 'new') throw new Error(`RpcServer.runJournaled() called when ${this.state}`);
    let count = 0;
    for (const entry of await this.deps.journal.unfinished()) {
      if (!(await select(entry))) continue;
      this.launch(entry, true);
      count += 1;
    }
    await this.drainRunning();
    return count;
  }

  /** Cancels the consumers, then waits for the intake and every running call to finish. */
  async stop(): Promise<void> {
    if (this.state === 'stopped' || this.state === 'stopping') return this.idle();
    this.state = 'stopping';
    const tags = this.consumerTags;
    this.consumerTags = [];
    for (const tag of tags) {
      try {
        await this.deps.bus.cancel(tag);
      } catch (err) {
        this.log.warn({ err: errorMessage(err), consumer_tag: tag }, 'could not cancel consumer');
      }
    }
    await this.idle();
    this.state = 'stopped';
    this.log.info('RPC server stopped');
  }

  /** Resolves once nothing is being taken in or run. */
  async idle(): Promise<void> {
    for (;;) {
      const intake = this.intake;
      await intake;
      await this.drainRunning();
      if (intake === this.intake && this.running.size === 0) return;
    }
  }

  private async drainRunning(): Promise<void> {
    while (this.running.size > 0) await Promise.allSettled([...this.running]);
  }

  private onDelivery(delivery: Delivery): Promise<void> {
    const next = this.intake.then(() => this.take(delivery));
    this.intake = next.catch((err: unknown) => {
      this.log.error({ err: errorMessage(err) }, 'unexpected error taking in an RPC message');
    });
    return this.intake;
  }

  private async take(delivery: Delivery): Promise<void> {
    const { bus, journal, target } = this.deps;
    if (this.state !== 'serving') {
      // Consumers are being cancelled: hand the message back for another server (or our restart).
      bus.nack(delivery, true);
      return;
    }
    const where = { routing_key: delivery.fields.routingKey, redelivered: delivery.fields.redelivered };

    const decoded = decodeRequest(delivery.body, { maxBytes: this.maxBytes });
    if (!decoded.ok) {
      this.log.warn(
        { ...where, reason: decoded.error.message, bytes: delivery.body.length, msg_id: decoded.replyTo?.msgId },
        'malformed RPC message dropped',
      );
      bus.ack(delivery);
      this.count(undefined, 'refused');
      if (decoded.replyTo) await this.sendFailure(decoded.replyTo, decoded.error, this.log);
      return;
    }
    // A request id made up now is journaled with the request, so a replay logs under the same id.
    const request = withRequestId(decoded.request);
    const { authToken } = decoded;
    const log = this.requestLogger(request, requestContext(request).requestId);

    try {
      checkRequest(target, request);
    } catch (err) {
      log.warn({ ...where, error: errorName(err), reason: errorMessage(err) }, 'RPC request refused');
      bus.ack(delivery);
      this.count(request.method, 'refused');
      await this.replyFailureIfCall(request, err, log);
      return;
    }

    let entry: JournalEntry;
    try {
      if (request.uniqueId !== undefined && (await journal.has(request.uniqueId))) {
        log.info({ ...where }, 'duplicate RPC request dropped (its _unique_id was accepted before)');
        bus.ack(delivery);
        this.count(request.method, 'refused');
        return;
      }
      entry = await journal.accept(request);
    } catch (err) {
      // Not journaled means not accepted: refuse it rather than run it without the crash guarantee.
      log.error({ ...where, err: errorMessage(err) }, 'could not record the RPC request in the journal; refused');
      bus.nack(delivery, false);
      this.count(request.method, 'refused');
      await this.replyFailureIfCall(request, err, log);
      return;
    }
    bus.ack(delivery);
    log.info({ journal_id: entry.id, call: request.msgId !== undefined }, 'RPC request accepted');
    await faultPointAfterOutput('rpc-accepted');
    this.launch(entry, false, authToken);
  }

  /** `authToken`: the caller's, in memory only (a replay from the journal has none). */
  private launch(entry: JournalEntry, replayed: boolean, authToken?: Secret): void {
    const run = this.run(entry, replayed, authToken).catch((err: unknown) => {
      this.log.error({ err: errorMessage(err), journal_id: entry.id }, 'unexpected error running an RPC request');
    });
    this.running.add(run);
    void run.finally(() => this.running.delete(run));
  }

  private async run(entry: JournalEntry, replayed: boolean, authToken: Secret | undefined): Promise<void> {
    const request = entry.request;
    const ctx = requestContext(request);
    const log = this.requestLogger(request, ctx.requestId).child({ journal_id: entry.id });
    if (replayed) log.info({ accepted_at: entry.acceptedAt }, 'resuming an unfinished RPC request');

    const keepAlive = this.startKeepAlive(request, log);
    let ok = true;
    let result: unknown;
    let failure: unknown;
    try {
      const callCtx: RpcCallContext = { ...ctx, log, ...(replayed && { replayed }), ...(authToken !== undefined && { authToken }) };
      result = await this.deps.target.call(request.method, request.args, callCtx);
    } catch (err) {
      ok = false;
      failure = err;
    } finally {
      await keepAlive.stop();
    }
    this.count(request.method, ok ? 'success' : 'failure');
    if (ok) log.info('RPC request finished');
    else if (failure instanceof SnapshotDriverError) log.warn({ error: errorName(failure), reason: errorMessage(failure) }, 'RPC request failed');
    else log.error({ error: errorName(failure), reason: errorMessage(failure), stack: (failure as Error)?.stack }, 'RPC request failed unexpectedly');

    try {
      await this.deps.journal.finish(entry.id, ok ? { ok } : { ok, error: `${errorName(failure)}: ${errorMessage(failure)}` });
    } catch (err) {
      log.error({ err: errorMessage(err) }, 'could not record the end of the RPC request in the journal');
    }

    if (request.msgId === undefined || request.replyQ === undefined) return;
    const to = { msgId: request.msgId, replyQ: request.replyQ };
    if (!ok) {
      await this.sendFailure(to, failure, log);
      return;
    }
    let body: Buffer;
    try {
      body = encodeReply({ msgId: to.msgId, result, ending: true });
    } catch (err) {
      log.error({ err: errorMessage(err) }, 'RPC result is not JSON-serializable');
      await this.sendFailure(to, err, log);
      return;
    }
    await this.publishReply(to, body, log);
  }

  /**
   * oslo's call-monitor keep-alive (rpc/dispatcher.py _watchdog): a client that sent `_timeout`
   * gets an `ending: false` reply every int(_timeout)/2 s while its call runs; none below 1 s.
   */
  private startKeepAlive(request: RpcRequest, log: Logger): { stop(): Promise<void> } {
    const none = { stop: async () => {} };
    if (request.msgId === undefined || request.replyQ === undefined || request.timeoutS === undefined) return none;
    const intervalS = Math.trunc(request.timeoutS) / 2;
    if (intervalS < 1) {
      log.warn({ timeout: request.timeoutS }, 'client call-monitor timeout too small for keep-alive replies');
      return none;
    }
    const to = { msgId: request.msgId, replyQ: request.replyQ };
    // A timer delay above 2^31-1 ms overflows to 1 ms in Node: a huge `_timeout` would mean a keep-alive every ms.
    const intervalMs = Math.min(intervalS * 1000, MAX_TIMER_MS);
    let inFlight: Promise<void> = Promise.resolve();
    const timer = setInterval(() => {
      inFlight = inFlight.then(async () => {
        try {
          await this.deps.bus.publish('', to.replyQ, encodeReply({ msgId: to.msgId, ending: false }), { ...JSON_PROPERTIES });
          log.debug({ msg_id: to.msgId, interval_s: intervalS }, 'sent call-monitor keep-alive');
        } catch (err) {
          // The client or the broker is gone; its call will time out as it should.
          log.debug({ err: errorMessage(err) }, 'call-monitor keep-alive failed; no more keep-alives');
          clearInterval(timer);
        }
      });
    }, intervalMs);
    return {
      stop: async () => {
        clearInterval(timer);
        await inFlight;
      },
    };
  }

  /**
   * Counts a request once, when its fate is known. The method label is a method the target serves,
   * or UNKNOWN_METHOD: a sender must not be able to make up label values (and series) at will.
   */
  private count(method: string | undefined, result: RpcResultLabel): void {
    const { metrics, target } = this.deps;
    if (!metrics) return;
    const served = method !== undefined && !method.startsWith('_') && target.methods.has(method);
    metrics.rpcRequest(served ? method : UNKNOWN_METHOD, result);
  }

  private async replyFailureIfCall(request: RpcRequest, err: unknown, log: Logger): Promise<void> {
    if (request.msgId === undefined || request.replyQ === undefined) return;
    await this.sendFailure({ msgId: request.msgId, replyQ: request.replyQ }, err, log);
  }

  private async sendFailure(to: ReplyAddress, err: unknown, log: Logger): Promise<void> {
    await this.publishReply(to, encodeReply({ msgId: to.msgId, failure: serializeFailure(err), ending: true }), log);
  }

  /** Replies are best effort, as in oslo: a reply that cannot be sent is logged, never retried forever. */
  private async publishReply(to: ReplyAddress, body: Buffer, log: Logger): Promise<void> {
    try {
      await this.deps.bus.publish('', to.replyQ, body, { ...JSON_PROPERTIES });
      log.debug({ msg_id: to.msgId, reply_q: to.replyQ }, 'sent RPC reply');
    } catch (err) {
      log.error({ msg_id: to.msgId, reply_q: to.replyQ, err: errorMessage(err) }, 'could not send RPC reply');
    }
  }

  private requestLogger(request: RpcRequest, requestId: string): Logger {
    // Not validated yet (a refused request is logged too): a hostile uuid is logged cut short.
    const instanceUuid = instanceUuidOf(request.args);
    return this.log.child({
      request_id: requestId,
      ...(instanceUuid !== undefined && { instance_uuid: clip(instanceUuid) }),
      method: request.method,
      ...(request.msgId !== undefined && { msg_id: request.msgId }),
      ...(request.uniqueId !== undefined && { unique_id: request.uniqueId }),
    });
  }
}
