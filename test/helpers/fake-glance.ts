import { createHash, randomUUID } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

/** One image as the fake keeps it (Glance v2's JSON, extra properties at the top level). */
export type FakeImage = Record<string, unknown> & { id: string; status: string };

/** A request the fake received: method, path, and its headers (lower-case names). */
export interface SeenRequest {
  method: string;
  path: string;
  headers: http.IncomingHttpHeaders;
}

/**
 * A small in-memory Glance v2 for the failures a real one cannot easily produce: an early answer
 * without reading the body, a server that stops reading, a connection cut half-way, a lying hash.
 * It implements what the agent uses: GET/POST/PATCH/DELETE of /v2/images[/id], PUT and GET of
 * /v2/images/{id}/file (nova's rules: 400 before the formats are set, 415 without
 * application/octet-stream, 409 on an image not queued), and the list with property filters.
 */
export class FakeGlance {
  readonly images = new Map<string, FakeImage>();
  readonly data = new Map<string, Buffer>();
  readonly requests: SeenRequest[] = [];
  /** The status each deleted image had when its DELETE came. */
  readonly statusAtDelete = new Map<string, string>();
  /** Answer the next PUTs with this status at once, before reading the body (then drained; 413, 409, 503…). */
  earlyAnswer: { status: number; message: string; times: number } | undefined;
  /** Stop reading the next PUT's body after this many bytes (the socket is paused, nothing answered). */
  stopReadingAfter: number | undefined;
  /** Cut the connection of the next PUT after this many bytes (the image goes back to queued). */
  cutAfter: number | undefined;
  /** How many PUTs in a row cutAfter cuts (default 1). */
  cutTimes = 1;
  /** Called with each piece of a PUT's body as it is read (e.g. to look at the host meanwhile). */
  onPutData: ((imageId: string, bytesSoFar: number) => void) | undefined;
  /** Record this os_hash_value instead of the real one. */
  lieAboutHash = false;
  private readonly server: http.Server;
  private readonly sockets = new Set<import('node:net').Socket>();

  private constructor() {
    this.server = http.createServer((req, res) => void this.handle(req, res));
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
  }

  static async start(): Promise<FakeGlance> {
    const g = new FakeGlance();
    await new Promise<void>((resolve) => g.server.listen(0, '127.0.0.1', resolve));
    return g;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** A record as nova-api makes it: queued, no formats yet. */
  addQueued(id: string, extra: Record<string, unknown> = {}): FakeImage {
    const now = new Date().toISOString().replace(/\.\d+Z$/, 'Z');
    const img: FakeImage = {
      id,
      name: `snap-${id.slice(0, 8)}`,
      status: 'queued',
      disk_format: null,
      container_format: null,
      size: null,
      virtual_size: null,
      checksum: null,
      os_hash_algo: null,
      os_hash_value: null,
      owner: 'project-a',
      min_disk: 0,
      min_ram: 0,
      visibility: 'private',
      protected: false,
      tags: [],
      created_at: now,
      updated_at: now,
      ...extra,
    };
    this.images.set(id, img);
    return img;
  }

  private json(res: http.ServerResponse, status: number, body: unknown): void {
    const text = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  private error(res: http.ServerResponse, status: number, message: string): void {
    this.json(res, status, { message, code: String(status), title: http.STATUS_CODES[status] });
  }

  private async body(req: http.IncomingMessage): Promise<Buffer> {
    const chunks: Buffer[] = [];
    for await (const c of req as AsyncIterable<Buffer>) chunks.push(c);
    return Buffer.concat(chunks);
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://x');
    this.requests.push({ method: req.method ?? '', path: url.pathname + url.search, headers: req.headers });
    const m = /^\/v2\/images(?:\/([0-9a-f-]{36})(\/file)?)?$/.exec(url.pathname);
    if (!m) return this.error(res, 404, 'not found');
    const [, id, file] = m;
    const img = id !== undefined ? this.images.get(id) : undefined;
    if (id === undefined) {
      if (req.method === 'GET') {
        let list = [...this.images.values()];
        for (const [k, v] of url.searchParams) if (!['limit', 'sort_key', 'sort_dir', 'marker'].includes(k)) list = list.filter((i) => i[k] === v);
        return this.json(res, 200, { images: list });
      }
      if (req.method === 'POST') {
        const b = JSON.parse((await this.body(req)).toString()) as Record<string, unknown>;
        const newId = typeof b.id === 'string' ? b.id : randomUUID();
        if (this.images.has(newId)) return this.error(res, 409, `Image with identifier ${newId} already exists!`);
        const created = this.addQueued(newId, b);
        return this.json(res, 201, created);
      }
      return this.error(res, 405, 'method not allowed');
    }
    if (img === undefined) {
      await this.body(req).catch(() => undefined);
      return this.error(res, 404, `No image found with ID ${id}`);
    }
    if (file === undefined) {
      if (req.method === 'GET') return this.json(res, 200, img);
      if (req.method === 'DELETE') {
        this.statusAtDelete.set(img.id, img.status);
        this.images.delete(img.id);
        this.data.delete(img.id);
        res.writeHead(204).end();
        return;
      }
      if (req.method === 'PATCH') {
        if (req.headers['content-type'] !== 'application/openstack-images-v2.1-json-patch') return this.error(res, 415, 'Unsupported Content-Type');
        const ops = JSON.parse((await this.body(req)).toString()) as { op: string; path: string; value: unknown }[];
        for (const op of ops) {
          const key = op.path.slice(1);
          if (op.op === 'add' && img[key] !== undefined && img[key] !== null && !['disk_format', 'container_format'].includes(key)) {
            return this.error(res, 409, `Property ${key} already present.`);
          }
          if (op.op === 'replace' && (img[key] === undefined || img[key] === null)) return this.error(res, 409, `Property ${key} does not exist.`);
          img[key] = op.value;
        }
        return this.json(res, 200, img);
      }
      return this.error(res, 405, 'method not allowed');
    }
    if (req.method === 'GET') {
      const d = this.data.get(img.id);
      if (img.status !== 'active' || d === undefined) return this.error(res, 204, 'no data');
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': d.length });
      res.end(d);
      return;
    }
    if (req.method !== 'PUT') return this.error(res, 405, 'method not allowed');
    if (this.earlyAnswer !== undefined && this.earlyAnswer.times > 0) {
      this.earlyAnswer.times--;
      // Answered before the body is read, which is then drained, as servers do (a lingering close):
      // a socket closed with the body unread is reset, and the client may see the reset instead.
      req.resume();
      return this.error(res, this.earlyAnswer.status, this.earlyAnswer.message);
    }
    if (req.headers['content-type'] !== 'application/octet-stream') return this.error(res, 415, 'Unsupported Content-Type');
    if (img.disk_format === null || img.container_format === null) return this.error(res, 400, 'Properties disk_format, container_format must be set prior to saving data.');
    if (img.status !== 'queued') return this.error(res, 409, `Image status transition from ${img.status} to saving is not allowed`);
    img.status = 'saving';
    const md5 = createHash('md5');
    const sha = createHash('sha512');
    const chunks: Buffer[] = [];
    let n = 0;
    const stopAt = this.stopReadingAfter;
    const cutAt = this.cutAfter;
    this.stopReadingAfter = undefined;
    if (--this.cutTimes <= 0) {
      this.cutAfter = undefined;
      this.cutTimes = 1;
    }
    try {
      for await (const c of req as AsyncIterable<Buffer>) {
        chunks.push(c);
        md5.update(c);
        sha.update(c);
        n += c.length;
        this.onPutData?.(img.id, n);
        if (stopAt !== undefined && n >= stopAt) {
          // Reads nothing more and never answers (leaving the loop would drain the body): the
          // client's watchdog has to end it.
          await new Promise<void>((resolve) => req.socket.once('close', () => resolve()));
          img.status = 'queued';
          return;
        }
        if (cutAt !== undefined && n >= cutAt) {
          img.status = 'queued';
          req.socket.destroy();
          return;
        }
      }
    } catch {
      img.status = 'queued';
      return;
    }
    img.status = 'active';
    img.size = n;
    img.checksum = md5.digest('hex');
    img.os_hash_algo = 'sha512';
    img.os_hash_value = this.lieAboutHash ? 'f'.repeat(128) : sha.digest('hex');
    this.data.set(img.id, Buffer.concat(chunks));
    res.writeHead(204).end();
  }
}
