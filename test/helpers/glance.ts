import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { runProgram } from '../../src/util/exec.js';

/**
 * A private, real Glance (Debian 12's python3-glance, 25.x) for one test file: its own temp folder,
 * sqlite database, file store, a free 127.0.0.1 port, `workers = 0`, no keystone. Nothing here
 * skips: when Glance cannot start, the test fails with the tail of Glance's own output.
 *
 * Two pipelines (paste flavors): `noauth` (flavor empty: unauthenticated, every request admin) and
 * `trusted`: Glance's real ContextMiddleware without keystonemiddleware in front, which takes the
 * identity from `X-Identity-Status: Confirmed`, `X-Project-Id`, `X-User-Id`, `X-Roles` (what
 * keystonemiddleware would set from the token): it shows which project the agent sent.
 */

export const GLANCE_PYTHON = process.env.GLANCE_PYTHON ?? '/usr/bin/python3';
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 10_000;

const PASTE_INI = `[pipeline:glance-api]
pipeline = versionnegotiation unauthenticated-context rootapp

[pipeline:glance-api-trusted]
pipeline = versionnegotiation context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:unauthenticated-context]
paste.filter_factory = glance.api.middleware.context:UnauthenticatedContextMiddleware.factory

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory
`;

export interface GlanceOptions {
  /** `noauth` (default) or `trusted` (ContextMiddleware trusting the identity headers). */
  pipeline?: 'noauth' | 'trusted';
  /** `[DEFAULT] image_size_cap` in bytes (Glance's default: 1 TiB). */
  imageSizeCap?: number;
}

export class GlanceServer {
  private child: ChildProcess | undefined;
  private output = '';
  private exited: Promise<void> | undefined;

  private constructor(
    readonly dir: string,
    readonly port: number,
    readonly opts: GlanceOptions,
  ) {}

  /** Makes the folder and config files, creates the database (db_sync), starts the API and waits for it. */
  static async start(dir: string, opts: GlanceOptions = {}): Promise<GlanceServer> {
    await fs.mkdir(path.join(dir, 'data'), { recursive: true });
    const g = new GlanceServer(dir, await freePort(), opts);
    await g.writeConfig();
    const sync = await runProgram(GLANCE_PYTHON, ['-m', 'glance.cmd.manage', '--config-file', g.configFile, 'db_sync'], { timeoutMs: 120_000 }).catch((err: Error) => {
      throw new Error(`Glance is required by this test (python3-glance, scripts/setup.sh): db_sync could not run: ${err.message}`);
    });
    if (sync.code !== 0) throw new Error(`Glance is required by this test: db_sync failed (exit ${sync.code}; install python3-glance with scripts/setup.sh):\n${tail(sync.stdout + sync.stderr)}`);
    await g.run();
    return g;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  get configFile(): string {
    return path.join(this.dir, 'glance-api.conf');
  }

  /** The data folder of the file store (one file per active image, named by its id). */
  get dataDir(): string {
    return path.join(this.dir, 'data');
  }

  /** Glance's own output so far (its log lines go to stderr). */
  get log(): string {
    return this.output;
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  private async writeConfig(): Promise<void> {
    await fs.writeFile(path.join(this.dir, 'glance-api-paste.ini'), PASTE_INI);
    // Without it, Glance refuses nova's properties such as kernel_id: null (Debian ships it in glance-api).
    await fs.copyFile('/etc/glance/schema-image.json', path.join(this.dir, 'schema-image.json')).catch(() => undefined);
    await fs.writeFile(
      this.configFile,
      [
        '[DEFAULT]',
        'bind_host = 127.0.0.1',
        `bind_port = ${this.port}`,
        'workers = 0',
        'use_stderr = true',
        `image_size_cap = ${this.opts.imageSizeCap ?? 1099511627776}`,
        `node_staging_uri = file://${path.join(this.dir, 'staging')}`,
        '[database]',
        `connection = sqlite:///${path.join(this.dir, 'glance.sqlite')}`,
        '[glance_store]',
        'stores = file',
        'default_store = file',
        `filesystem_store_datadir = ${this.dataDir}/`,
        '[paste_deploy]',
        `flavor = ${this.opts.pipeline === 'trusted' ? 'trusted' : ''}`,
        `config_file = ${path.join(this.dir, 'glance-api-paste.ini')}`,
        '',
      ].join('\n'),
    );
  }

  /** Starts the API process and waits (bounded) until GET /versions answers. */
  async run(): Promise<void> {
    if (this.child !== undefined && this.child.exitCode === null && this.child.signalCode === null) throw new Error('Glance runs already');
    const child = spawn(GLANCE_PYTHON, ['-m', 'glance.cmd.api', '--config-file', this.configFile], { stdio: ['ignore', 'pipe', 'pipe'], cwd: this.dir });
    this.child = child;
    const onData = (c: Buffer) => {
      this.output += c.toString('utf8');
      if (this.output.length > 4_000_000) this.output = this.output.slice(-2_000_000);
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    this.exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
    const spawnError = new Promise<never>((_, reject) => child.once('error', (err) => reject(new Error(`cannot run ${GLANCE_PYTHON}: ${err.message}`))));
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`Glance exited at start (${child.exitCode ?? child.signalCode}):\n${tail(this.output)}`);
      }
      const ok = await Promise.race([versionsAnswer(this.url), spawnError]);
      if (ok) return;
      if (Date.now() > deadline) {
        await this.stop();
        throw new Error(`Glance did not answer GET /versions within ${START_TIMEOUT_MS / 1000} s:\n${tail(this.output)}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }

  /** Sends `sig` to the API process (SIGSTOP: Glance stops reading and answering). */
  signal(sig: NodeJS.Signals): void {
    if (this.child?.pid === undefined) throw new Error('Glance does not run');
    this.child.kill(sig);
  }

  /** SIGKILL (a Glance killed mid-upload), and waits for the process to be gone. */
  async kill(): Promise<void> {
    const child = this.child;
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGKILL');
    await this.exited;
  }

  /** SIGTERM, then SIGKILL after a bound. */
  async stop(): Promise<void> {
    const child = this.child;
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    const killed = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        child.kill('SIGKILL');
        resolve();
      }, STOP_TIMEOUT_MS);
    });
    await Promise.race([this.exited, killed]);
    clearTimeout(timer);
    await this.exited;
  }

  /** A JSON request to this Glance as nova-api would make it (admin on noauth; `headers` for the trusted pipeline). */
  async api(method: string, p: string, body?: unknown, headers: Record<string, string> = {}): Promise<{ status: number; json: unknown; text: string }> {
    const res = await fetch(`${this.url}${p}`, {
      method,
      headers: { ...(body !== undefined && { 'content-type': p.includes('/file') ? 'application/octet-stream' : method === 'PATCH' ? 'application/openstack-images-v2.1-json-patch' : 'application/json' }), ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(30_000),
    });
    const text = await res.text();
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    return { status: res.status, json, text };
  }

  /** The image's record, or undefined (404). */
  async image(id: string, headers: Record<string, string> = {}): Promise<Record<string, unknown> | undefined> {
    const r = await this.api('GET', `/v2/images/${id}`, undefined, headers);
    if (r.status === 404) return undefined;
    if (r.status !== 200) throw new Error(`GET /v2/images/${id}: ${r.status} ${r.text}`);
    return r.json as Record<string, unknown>;
  }

  /** POST /v2/images as nova-api's snapshot does: no disk or container format, status queued. */
  async createQueued(id: string, name: string, headers: Record<string, string> = {}, extra: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
    const r = await this.api('POST', '/v2/images', { id, name, visibility: 'private', ...extra }, headers);
    if (r.status !== 201) throw new Error(`POST /v2/images: ${r.status} ${r.text}`);
    return r.json as Record<string, unknown>;
  }

  /** Polls the image until `pred` holds (bounded); resolves with the record (undefined: deleted). */
  async waitImage(id: string, pred: (img: Record<string, unknown> | undefined) => boolean, timeoutMs = 60_000, headers: Record<string, string> = {}) {
    const deadline = Date.now() + timeoutMs;
    let last: Record<string, unknown> | undefined;
    for (;;) {
      last = await this.image(id, headers);
      if (pred(last)) return last;
      if (Date.now() > deadline) throw new Error(`image ${id} in Glance: condition not met within ${timeoutMs} ms (last: ${JSON.stringify(last)})`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

async function versionsAnswer(url: string): Promise<boolean> {
  try {
    const res = await fetch(`${url}/versions`, { signal: AbortSignal.timeout(2000) });
    await res.arrayBuffer();
    return res.status === 200;
  } catch {
    return false;
  }
}

function tail(text: string, lines = 40): string {
  return text.split('\n').slice(-lines).join('\n');
}

/** A port nothing listens on now (the kernel's pick). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/** How the agent's config reaches this Glance. */
export function glanceConfigLines(g: GlanceServer, o: { authStrategy?: 'keystone' | 'noauth'; timeout?: number; retries?: number } = {}): string[] {
  return [
    '[glance]',
    `api_servers = ${g.url}`,
    `auth_strategy = ${o.authStrategy ?? 'noauth'}`,
    `timeout = ${o.timeout ?? 30}`,
    `retries = ${o.retries ?? 3}`,
  ];
}
