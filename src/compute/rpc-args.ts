import { InvalidArgument, NoSuchMethod } from '../errors.js';
import { isUuid } from '../util/uuid.js';

/** The RPC methods the compute manager serves (SPEC §5). */
export const SERVED_METHODS = ['snapshot_instance', 'backup_instance', 'reboot_instance', 'start_instance', 'stop_instance'] as const;
export type ServedMethod = (typeof SERVED_METHODS)[number];

export const REBOOT_TYPES = ['SOFT', 'HARD'] as const;
export type RebootType = (typeof REBOOT_TYPES)[number];

/** The instance an RPC names, from a nova object primitive or a plain `{"uuid": …}`. */
export interface InstanceRef {
  /** Lower-case UUID. */
  uuid: string;
  displayName?: string;
  imageRef?: string;
  userId?: string;
  projectId?: string;
  /** The primitive's `nova_object.data` (or the plain object itself), as received. */
  data: Record<string, unknown>;
  /** The `instance` argument as received. */
  raw: Record<string, unknown>;
}

export type ParsedCall =
  | { method: 'snapshot_instance'; instance: InstanceRef; imageId: string }
  | { method: 'backup_instance'; instance: InstanceRef; imageId: string; backupType: string; rotation: number }
  | { method: 'reboot_instance'; instance: InstanceRef; rebootType: RebootType }
  | { method: 'start_instance'; instance: InstanceRef }
  | { method: 'stop_instance'; instance: InstanceRef; cleanShutdown: boolean };

const INSTANCE_FORM = 'a nova Instance object primitive ({"nova_object.name": "Instance", "nova_object.data": {"uuid": …}}) or {"uuid": …}';

/** Argument names per method: required, then optional. */
const SIGNATURES: Record<ServedMethod, { required: readonly string[]; optional: readonly string[] }> = {
  snapshot_instance: { required: ['instance', 'image_id'], optional: [] },
  backup_instance: { required: ['instance', 'image_id', 'backup_type', 'rotation'], optional: [] },
  reboot_instance: { required: ['instance', 'reboot_type'], optional: ['block_device_info'] },
  start_instance: { required: ['instance'], optional: [] },
  stop_instance: { required: ['instance'], optional: ['clean_shutdown'] },
};

export function isServedMethod(method: string): method is ServedMethod {
  return (SERVED_METHODS as readonly string[]).includes(method);
}

/**
 * Checks and decodes the arguments of one served method. Throws NoSuchMethod for another method,
 * InvalidArgument (naming the argument and the expected form) for a bad, missing or unknown argument.
 * Optional arguments may be absent or null (nova sends None for block_device_info).
 */
export function parseCall(method: string, args: unknown): ParsedCall {
  if (!isServedMethod(method)) throw new NoSuchMethod(`method ${JSON.stringify(method)} is not served: expected one of ${SERVED_METHODS.join(', ')}`);
  if (!isPlainObject(args)) throw new InvalidArgument(`${method}: arguments must be a JSON object, got ${describe(args)}`);
  const sig = SIGNATURES[method];
  for (const name of Object.keys(args)) {
    if (!sig.required.includes(name) && !sig.optional.includes(name)) {
      const known = [...sig.required, ...sig.optional.map((o) => `${o}?`)].join(', ');
      throw new InvalidArgument(`${method}: unexpected argument ${JSON.stringify(name)}: expected only ${known}`);
    }
  }
  for (const name of sig.required) {
    if (!(name in args)) throw new InvalidArgument(`${method}: missing argument ${name}: expected ${EXPECTED[name] ?? 'a value'}`);
  }
  const instance = parseInstance(method, args.instance);
  switch (method) {
    case 'snapshot_instance':
      return { method, instance, imageId: parseImageId(method, args.image_id) };
    case 'backup_instance':
      return {
        method,
        instance,
        imageId: parseImageId(method, args.image_id),
        backupType: parseBackupType(method, args.backup_type),
        rotation: parseRotation(method, args.rotation),
      };
    case 'reboot_instance':
      parseBlockDeviceInfo(method, args.block_device_info);
      return { method, instance, rebootType: parseRebootType(method, args.reboot_type) };
    case 'start_instance':
      return { method, instance };
    case 'stop_instance':
      return { method, instance, cleanShutdown: parseCleanShutdown(method, args.clean_shutdown) };
  }
}

const EXPECTED: Record<string, string> = {
  instance: INSTANCE_FORM,
  image_id: 'an image id (a UUID)',
  backup_type: 'a non-empty string of at most 255 characters such as "daily"',
  rotation: 'an integer >= 0 (how many backups of this type to keep)',
  reboot_type: `one of ${REBOOT_TYPES.join(', ')}`,
};

export function parseInstance(method: string, v: unknown): InstanceRef {
  const bad = (what: string) => new InvalidArgument(`${method}: argument instance ${what}: expected ${INSTANCE_FORM}`);
  if (!isPlainObject(v)) throw bad(`is ${describe(v)}`);
  let data: Record<string, unknown>;
  let field: string;
  if ('nova_object.data' in v || 'nova_object.name' in v) {
    const name = v['nova_object.name'];
    if (name !== 'Instance') throw bad(`is a nova object primitive of ${describe(name)}, not of "Instance"`);
    const d = v['nova_object.data'];
    if (!isPlainObject(d)) throw bad(`has nova_object.data ${describe(d)}`);
    data = d;
    field = 'instance["nova_object.data"]';
  } else {
    data = v;
    field = 'instance';
  }
  if (!('uuid' in data)) throw bad('has no uuid');
  if (!isUuid(data.uuid)) {
    throw new InvalidArgument(`${method}: argument ${field}.uuid ${describe(data.uuid)} is not an instance uuid: expected a UUID`);
  }
  const text = (key: string): string | undefined => {
    const x = data[key];
    if (x === undefined || x === null) return undefined;
    if (typeof x !== 'string') throw new InvalidArgument(`${method}: argument ${field}.${key} is ${describe(x)}: expected a string or null`);
    if (x.length > MAX_TEXT) {
      throw new InvalidArgument(`${method}: argument ${field}.${key} is ${x.length} characters long: expected at most ${MAX_TEXT} (as in nova's database)`);
    }
    return x;
  };
  return {
    uuid: data.uuid.toLowerCase(),
    displayName: text('display_name'),
    imageRef: text('image_ref'),
    userId: text('user_id'),
    projectId: text('project_id'),
    data,
    raw: v,
  };
}

function parseImageId(method: string, v: unknown): string {
  if (!isUuid(v)) throw new InvalidArgument(`${method}: argument image_id ${describe(v)} is not an image id: expected a UUID`);
  return v.toLowerCase();
}

function parseBackupType(method: string, v: unknown): string {
  if (typeof v !== 'string' || v.trim() === '' || v.length > MAX_TEXT) {
    throw new InvalidArgument(`${method}: argument backup_type is ${describe(v)}: expected ${EXPECTED.backup_type}`);
  }
  return v;
}

function parseRotation(method: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw new InvalidArgument(`${method}: argument rotation is ${describe(v)}: expected ${EXPECTED.rotation}`);
  }
  return v;
}

function parseRebootType(method: string, v: unknown): RebootType {
  if (!(REBOOT_TYPES as readonly unknown[]).includes(v)) {
    throw new InvalidArgument(`${method}: argument reboot_type is ${describe(v)}: expected ${EXPECTED.reboot_type}`);
  }
  return v as RebootType;
}

/** Accepted and ignored: the agent handles the root disk only. */
function parseBlockDeviceInfo(method: string, v: unknown): void {
  if (v !== undefined && v !== null && !isPlainObject(v)) {
    throw new InvalidArgument(`${method}: argument block_device_info is ${describe(v)}: expected an object or null`);
  }
}

function parseCleanShutdown(method: string, v: unknown): boolean {
  if (v === undefined || v === null) return true;
  if (typeof v !== 'boolean') throw new InvalidArgument(`${method}: argument clean_shutdown is ${describe(v)}: expected true or false`);
  return v;
}

/** Longest string field taken from a request (display_name, user_id, …: nova stores them in 255). */
const MAX_TEXT = 255;

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A short description of a received value for error messages. */
function describe(v: unknown): string {
  if (v === undefined) return 'missing';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'object') return 'an object';
  if (typeof v === 'string') return JSON.stringify(v.length > 80 ? `${v.slice(0, 80)}…` : v);
  return `${typeof v} ${String(v)}`;
}
