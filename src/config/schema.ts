import os from 'node:os';
import { z } from 'zod';
import { LISTEN_FORM, parseListenAddress, type ListenAddress } from './listen-address.js';
import { rabbitOptionsSchema } from './rabbit-options.js';
import { redactTransportUrl, transportUrlProblem } from './transport-url.js';
import { bool, cpuList, int, nonEmpty, num, positiveNum } from './values.js';

export { rabbitOptionsSchema, type RabbitOptions } from './rabbit-options.js';
export type { ListenAddress } from './listen-address.js';

/**
 * The config schema (SPEC §7). Every option here is documented, with its default, in
 * etc/snapshot-driver.conf. Unknown sections and options are errors.
 *
 * Values arrive as strings from the INI reader; the coercions below turn them into typed values.
 * Options marked `path` are resolved against the folder of the config file that set them.
 */

export const STRATEGIES = [
  'cold',
  'suspend-create-resume-extract',
  'double-suspend',
  'deferred-delete',
  'live',
  'monitor-snapshot',
] as const;
export type StrategyName = (typeof STRATEGIES)[number];

/** `[hypervisor] driver` (SPEC §4). */
export const HYPERVISOR_DRIVERS = ['qemu', 'libvirt'] as const;
export type HypervisorDriver = (typeof HYPERVISOR_DRIVERS)[number];

/**
 * `[hypervisor] running_export_rate_mb` default (MiB/s of data; holes cost nothing): the limit of a
 * copy no one waits for of a running guest's disk. Unlimited, the guest's fsync p99 during it was
 * 2.5–5.7× idle with `live` (its own QEMU serves the copy) and 2.8–4.4× with `monitor-snapshot`
 * (qemu-img beside it, the hashes) on the 2-core bench host; at 100 MiB/s, 2–2.8× and 1.1–1.8×
 * (`npm run bench:downtime -- --strategies live,monitor-snapshot --export-rate-mb R`).
 */
export const DEFAULT_RUNNING_EXPORT_RATE_MB = 100;

/** Guest-agent filesystem freeze before a strategy's point in time (SPEC §3). */
export const QUIESCE_MODES = ['off', 'auto', 'required'] as const;
export type QuiesceMode = (typeof QUIESCE_MODES)[number];

/** `[image_store] backend` (SPEC §6, §6.1). */
export const IMAGE_STORE_BACKENDS = ['local', 'glance'] as const;
export type ImageStoreBackendName = (typeof IMAGE_STORE_BACKENDS)[number];

/** `[glance] auth_strategy`: keystone sends the request's token; noauth sends none. */
export const GLANCE_AUTH_STRATEGIES = ['keystone', 'noauth'] as const;

const API_SERVERS_FORM = 'a comma-separated list of http:// or https:// URLs such as http://glance.example:9292';

/**
 * `[glance] api_servers`: URLs tried in order, as nova's. Scheme, host, port and a path prefix only
 * (no credentials, query or fragment); a trailing slash is dropped. Empty: none.
 */
const apiServers = z.string().transform((value, ctx): string[] => {
  const out: string[] = [];
  for (const item of value.split(',').map((v) => v.trim()).filter((v) => v !== '')) {
    let url: URL;
    try {
      url = new URL(item);
    } catch {
      ctx.issues.push({ code: 'custom', input: value, message: `${API_SERVERS_FORM} (${JSON.stringify(redactTransportUrl(item).slice(0, 80))} is not a URL)` });
      return z.NEVER;
    }
    const problem =
      url.protocol !== 'http:' && url.protocol !== 'https:'
        ? `${url.protocol} is not http: or https:`
        : url.username !== '' || url.password !== ''
          ? 'credentials do not belong in the URL'
          : url.search !== '' || url.hash !== ''
            ? 'no query or fragment'
            : undefined;
    if (problem !== undefined) {
      ctx.issues.push({ code: 'custom', input: value, message: `${API_SERVERS_FORM} (${url.host}: ${problem})` });
      return z.NEVER;
    }
    out.push(`${url.protocol}//${url.host}${url.pathname.replace(/\/+$/, '')}`);
  }
  return out;
});

/** A transport URL (SPEC §5); the message names the problem, never the password. */
const transportUrl = z.string().superRefine((value, ctx) => {
  const problem = transportUrlProblem(value);
  if (problem !== undefined) {
    ctx.addIssue({
      code: 'custom',
      message: `a transport URL such as rabbit://user:pass@host:5672/vhost or memory:// (${problem})`,
    });
  }
});

/** `[metrics] listen` (SPEC §9): host:port, an IPv6 address in brackets; empty: off (null). */
const listenAddress = z.string().transform((value, ctx): ListenAddress | null => {
  const parsed = parseListenAddress(value);
  if (parsed !== null && 'problem' in parsed) {
    ctx.issues.push({ code: 'custom', input: value, message: `${LISTEN_FORM} (${parsed.problem})` });
    return z.NEVER;
  }
  return parsed;
});

export const schema = z
  .object({
    DEFAULT: z
      .object({
        // The RPC server consumes `compute.<host>`: an AMQP queue name is at most 255 bytes.
        host: z
          .string()
          .trim()
          .min(1, 'a non-empty string')
          .max(247, 'at most 247 characters (the RPC server consumes the queue compute.<host>, at most 255 bytes)')
          .regex(/^[\x21-\x7e]*$/, 'printable ASCII characters without spaces')
          .default(os.hostname()),
        instances_path: nonEmpty.default('/var/lib/snapshot-driver/instances'),
        state_path: nonEmpty.default('/var/lib/snapshot-driver'),
        max_concurrent_snapshots: int(1, 1000).default(5),
        agent_cpus: cpuList().default(''),
        debug: bool.default(false),
        transport_url: transportUrl.default('memory://'),
        control_exchange: z
          .string()
          .regex(/^[A-Za-z0-9._:-]{1,255}$/, '1 to 255 of A-Z a-z 0-9 . _ - :')
          .default('nova'),
      })
      .strict()
      .prefault({}),
    snapshot: z
      .object({
        strategy: z.enum(STRATEGIES).default('monitor-snapshot'),
        name_prefix: z
          .string()
          .regex(/^[A-Za-z0-9._-]{1,32}$/, '1 to 32 of A-Z a-z 0-9 . _ -')
          .default('snapdrv-'),
        quiesce: z.enum(QUIESCE_MODES).default('auto'),
        max_freeze_seconds: positiveNum.default(10),
        guest_agent_timeout: positiveNum.default(5),
      })
      .strict()
      .prefault({}),
    hypervisor: z
      .object({
        driver: z.enum(HYPERVISOR_DRIVERS).default('qemu'),
        libvirt_uri: z
          .string()
          .trim()
          .regex(/^[a-z][a-z0-9+]*:\/\/\S*$/, 'a libvirt connection URI such as qemu:///system')
          .default('qemu:///system'),
        virsh: nonEmpty.default('virsh'),
        job_timeout: num(1).default(600),
        qemu_binary: nonEmpty.default('qemu-system-x86_64'),
        qemu_img: nonEmpty.default('qemu-img'),
        accel: z
          .string()
          .regex(/^(kvm|tcg)(:(kvm|tcg))*$/, 'kvm, tcg, or a fallback list such as kvm:tcg')
          .default('kvm:tcg'),
        shutdown_timeout: num(0).default(60),
        qmp_timeout: num(0.1).default(30),
        qemu_img_timeout: num(1).default(120),
        export_timeout: num(1).default(3600),
        background_export_nice: int(0, 19).default(10),
        background_export_yield_seconds: int(0, 3600).default(120),
        wait_soft_reboot_seconds: int(0, 86_400).default(120),
        backup_cbw_timeout: int(1, 4_294_967_295).default(5),
        running_export_rate_mb: num(0).default(DEFAULT_RUNNING_EXPORT_RATE_MB),
      })
      .strict()
      .prefault({}),
    image_store: z
      .object({
        path: nonEmpty.default('/var/lib/snapshot-driver/images'),
        reserved_space_mb: int(0).default(512),
        os_hash_algo: z.enum(['sha512', 'sha384', 'sha256']).default('sha512'),
        backend: z.enum(IMAGE_STORE_BACKENDS).default('local'),
      })
      .strict()
      .prefault({}),
    glance: z
      .object({
        api_servers: apiServers.default([]),
        timeout: positiveNum.default(60),
        retries: int(0, 20).default(3),
        auth_strategy: z.enum(GLANCE_AUTH_STRATEGIES).default('keystone'),
      })
      .strict()
      .prefault({}),
    oslo_messaging_rabbit: rabbitOptionsSchema.prefault({}),
    oslo_messaging_notifications: z
      .object({
        driver: z.enum(['messagingv2', 'messaging', 'noop']).default('messagingv2'),
      })
      .strict()
      .prefault({}),
    notifications: z
      .object({
        notification_format: z.enum(['versioned', 'unversioned', 'both']).default('both'),
      })
      .strict()
      .prefault({}),
    metrics: z
      .object({
        listen: listenAddress.default({ host: '127.0.0.1', port: 9464 }),
      })
      .strict()
      .prefault({}),
  })
  .strict()
  .superRefine((config, ctx) => {
    if (config.image_store.backend === 'glance' && config.glance.api_servers.length === 0) {
      ctx.addIssue({ code: 'custom', path: ['glance', 'api_servers'], message: `${API_SERVERS_FORM} (required with [image_store] backend = glance)` });
    }
  });

export type Config = z.infer<typeof schema>;
export type RawConfig = Record<string, Record<string, string>>;

/** Options holding filesystem paths, resolved against the config file's folder. */
export const PATH_OPTIONS: ReadonlyArray<readonly [section: string, option: string]> = [
  ['DEFAULT', 'instances_path'],
  ['DEFAULT', 'state_path'],
  ['image_store', 'path'],
  ['oslo_messaging_rabbit', 'ssl_ca_file'],
  ['oslo_messaging_rabbit', 'ssl_cert_file'],
  ['oslo_messaging_rabbit', 'ssl_key_file'],
];

/** The config with every default: what the agent uses with no config file. */
export function defaultConfig(): Config {
  return schema.parse({});
}
