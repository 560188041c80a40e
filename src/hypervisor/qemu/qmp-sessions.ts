import type { Logger } from '../../log.js';
import { QmpClient } from './qmp.js';

/**
 * QMP connections opened per operation and closed after it. QEMU's QMP chardev serves one client
 * at a time (the agent and the CLI may both act on a guest), so a connection is never kept idle;
 * operations of this process that overlap on one guest (e.g. a status query during a managed save)
 * share its connection instead of queueing behind it.
 *
 * Except after a timeout: a session left with a timed-out command unanswered stays open, for as
 * long again as that command's timeout, so that its late reply is read and logged (QmpClient) rather
 * than lost with the connection; this process's next operations on the guest share it meanwhile (in
 * QEMU's order: after the timed-out command). It does not keep the process alive.
 */
export class QmpSessions {
  private readonly open = new Map<string, Session>();

  constructor(
    private readonly timeoutMs: number,
    private readonly log?: Logger,
  ) {}

  async use<T>(socketPath: string, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    const entry = await this.acquire(socketPath);
    try {
      return await fn(await entry.client);
    } finally {
      await this.release(socketPath, entry);
    }
  }

  private async acquire(socketPath: string): Promise<Session> {
    const existing = this.open.get(socketPath);
    if (existing) {
      existing.users++;
      const client = await existing.client.catch(() => undefined);
      if (client?.connected) {
        client.ref();
        return existing;
      }
      await this.release(socketPath, existing);
    }
    const created: Session = { client: QmpClient.connect(socketPath, { timeoutMs: this.timeoutMs, log: this.log }), users: 1 };
    created.client.catch(() => undefined);
    this.open.set(socketPath, created);
    return created;
  }

  private async release(socketPath: string, session: Session): Promise<void> {
    session.users--;
    if (session.users > 0) return;
    const client = await session.client.catch(() => undefined);
    if (client?.connected && client.unanswered > 0) {
      // Kept for the late replies, without holding the caller or the process.
      client.unref();
      void client.whenSettled(client.lateReplyWindowMs).then(() => {
        if (session.users > 0) return;
        if (this.open.get(socketPath) === session) this.open.delete(socketPath);
        return client.close();
      });
      return;
    }
    if (this.open.get(socketPath) === session) this.open.delete(socketPath);
    await client?.close();
  }
}

interface Session {
  client: Promise<QmpClient>;
  users: number;
}
