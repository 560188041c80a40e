import { QmpClient } from './qmp.js';

/**
 * QMP connections opened per operation and closed after it. QEMU's QMP chardev serves one client
 * at a time (the agent and the CLI may both act on a guest), so a connection is never kept idle;
 * operations of this process that overlap on one guest (e.g. a status query during a managed save)
 * share its connection instead of queueing behind it.
 */
export class QmpSessions {
  private readonly open = new Map<string, Session>();

  constructor(private readonly timeoutMs: number) {}

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
      if (await existing.client.then((c) => c.connected, () => false)) return existing;
      await this.release(socketPath, existing);
    }
    const created: Session = { client: QmpClient.connect(socketPath, { timeoutMs: this.timeoutMs }), users: 1 };
    created.client.catch(() => undefined);
    this.open.set(socketPath, created);
    return created;
  }

  private async release(socketPath: string, session: Session): Promise<void> {
    session.users--;
    if (session.users > 0) return;
    if (this.open.get(socketPath) === session) this.open.delete(socketPath);
    await session.client.then((c) => c.close(), () => undefined);
  }
}

interface Session {
  client: Promise<QmpClient>;
  users: number;
}
