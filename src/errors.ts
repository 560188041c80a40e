/**
 * Typed errors with stable names. The `name` travels on the wire as an oslo failure `class`
 * and decides the CLI exit code (2: bad usage or config, 1: the operation failed).
 */
export abstract class SnapshotDriverError extends Error {
  /** CLI exit code for this kind of error. */
  readonly exitCode: 1 | 2 = 1;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** Bad command-line usage or argument. */
export class UsageError extends SnapshotDriverError {
  override readonly exitCode = 2;
}

/** A config file is missing, malformed, or holds an unknown option or a bad value. */
export class ConfigError extends SnapshotDriverError {
  override readonly exitCode = 2;
}

/** A received value quoted for a message, cut after 80 characters (ids can be anything a caller sent). */
function quoteShort(v: string): string {
  return v.length > 80 ? `${JSON.stringify(v.slice(0, 80))}… (${v.length} characters)` : JSON.stringify(v);
}

/** An image id that is not a UUID (refused before any file is touched). */
export class InvalidImageId extends SnapshotDriverError {
  override readonly exitCode = 2;
  constructor(readonly imageId: string) {
    super(`invalid image id ${quoteShort(imageId)}: expected a UUID such as 1b4e28ba-2fa1-11d2-883f-0016d3cca427`);
  }
}

/** An instance uuid that is not a UUID. */
export class InvalidInstanceId extends SnapshotDriverError {
  override readonly exitCode = 2;
  constructor(readonly instanceUuid: string) {
    super(`invalid instance uuid ${quoteShort(instanceUuid)}: expected a UUID`);
  }
}

export class UnknownStrategy extends SnapshotDriverError {
  override readonly exitCode = 2;
  constructor(readonly strategy: string, known: readonly string[]) {
    super(`unknown snapshot strategy ${JSON.stringify(strategy)}: expected one of ${known.join(', ')}`);
  }
}

export class InstanceNotFound extends SnapshotDriverError {
  constructor(readonly instanceUuid: string) {
    super(`instance ${instanceUuid} not found`);
  }
}

export class InstanceExists extends SnapshotDriverError {
  constructor(readonly instanceUuid: string) {
    super(`instance ${instanceUuid} already exists`);
  }
}

/** The instance is not in a power state that allows the requested action. */
export class InstanceInvalidState extends SnapshotDriverError {}

export class ImageNotFound extends SnapshotDriverError {
  constructor(readonly imageId: string) {
    super(`image ${imageId} not found`);
  }
}

export class ImageExists extends SnapshotDriverError {
  constructor(readonly imageId: string) {
    super(`image ${imageId} already exists`);
  }
}

/** Not enough free space in the image store (free space minus reserved_space_mb). */
export class InsufficientSpace extends SnapshotDriverError {}

/** A recomputed checksum differs from the one recorded in the image metadata. */
export class ChecksumMismatch extends SnapshotDriverError {}

/** A hash worker thread died or failed before its digest (the image is not committed). */
export class HashWorkerFailed extends SnapshotDriverError {}

/**
 * A violation of the safety rule (SPEC §2): changing a qcow2 file's metadata while a QEMU process
 * holds it open, or reading the active layer of an open disk as if it were a point in time.
 */
export class SafetyViolation extends SnapshotDriverError {}

/** qemu-img exited non-zero or printed something unparseable. */
export class QemuImgError extends SnapshotDriverError {
  constructor(
    message: string,
    readonly argv: readonly string[] = [],
    readonly stderr = '',
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * An external program did not finish within its bound: it was stopped (SIGTERM, then SIGKILL after a
 * grace period, with every process it started). Names the program, the bound and, when the bound is
 * an operator's option, that option (e.g. `[hypervisor] export_timeout`).
 */
export class ProgramTimeout extends SnapshotDriverError {
  constructor(
    readonly program: string,
    readonly argv: readonly string[],
    readonly timeoutMs: number,
    readonly option: string | undefined,
    readonly stderr = '',
  ) {
    const what = argv.length > 0 && !argv[0]!.startsWith('-') ? `${program} ${argv[0]}` : program;
    const bound = timeoutMs % 1000 === 0 ? `${timeoutMs / 1000} s` : `${timeoutMs} ms`;
    super(`${what} did not finish within ${bound}${option === undefined ? '' : ` (${option})`}: killed`);
  }
}

/** QMP answered a command with an error. */
export class QmpError extends SnapshotDriverError {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
  }
}

/** A QMP command got no answer within its timeout, or the monitor connection was lost. */
export class QmpTimeout extends SnapshotDriverError {}
export class QmpDisconnected extends SnapshotDriverError {}

/** A QEMU process failed to start, or exited when it should not have. */
export class QemuProcessError extends SnapshotDriverError {}

/** A managed save's or a resume's migration did not complete within `[hypervisor] job_timeout`. */
export class MigrationTimeout extends QemuProcessError {}

/** A failure deliberately injected by a test or the fault-injection switch. */
export class InjectedFault extends SnapshotDriverError {}

/** The snapshot operation failed; `cause` holds the first error, `undoErrors` any failed undo. */
export class SnapshotFailed extends SnapshotDriverError {
  constructor(
    message: string,
    readonly undoErrors: readonly unknown[] = [],
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * A snapshot the agent did not finish because it stopped (crashed, was killed) in the middle; found in
 * the operation journal at the next start and recovered: guest back in its prior state, image killed.
 */
export class SnapshotInterrupted extends SnapshotDriverError {}

/** The guest's QEMU process died during a snapshot and could not be started again: it is shut off. */
export class GuestLost extends SnapshotDriverError {}

/**
 * A guest whose vCPUs this operation stopped for a managed save could not be made to run again (its
 * save was undone, or its resume loaded the state, but `cont` failed: e.g. another process holds the
 * disk's write lock). It is paused; the operation's record stays in the journal, so that recovery
 * runs it once that is possible.
 */
export class GuestLeftPaused extends SnapshotDriverError {}

/**
 * `serve` cannot listen where `[metrics] listen` says (the port is in use, the address is not one of
 * this host's, a port below 1024 without the right): the message names the option and the reason.
 */
export class MetricsListenError extends SnapshotDriverError {
  override readonly exitCode = 2;
}

/** Another agent (`serve`) already runs on the same state_path. */
export class AgentAlreadyRunning extends SnapshotDriverError {}

/** Another process (the agent, a command) is working on the instance. */
export class InstanceBusy extends SnapshotDriverError {}

export function errorName(err: unknown): string {
  return err instanceof Error ? err.name : 'Error';
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** An RPC or CLI argument of the wrong type or form; the message names the argument. */
export class InvalidArgument extends SnapshotDriverError {
  override readonly exitCode = 2;
}

/** oslo.messaging: the requested method is not served. */
export class NoSuchMethod extends SnapshotDriverError {}

/** oslo.messaging: the requested RPC version is not compatible with the served one. */
export class UnsupportedVersion extends SnapshotDriverError {}

/** A message that is not a valid oslo.messaging request (not JSON, bad envelope, no method…). */
export class MalformedMessage extends SnapshotDriverError {}

/**
 * The message broker refused an operation (an AMQP channel error such as 404 NOT_FOUND for a
 * missing exchange or queue, 406 PRECONDITION_FAILED for a redeclaration with other flags), or the
 * message bus is closed. `code` is the AMQP reply code when the broker gave one; the message is the
 * broker's reply text (e.g. "NOT_FOUND - no exchange 'x' in vhost '/'").
 */
export class BrokerError extends SnapshotDriverError {
  constructor(
    message: string,
    readonly code?: number,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** No guest agent answered (quiesce = required), or it failed to freeze or thaw. */
export class GuestAgentError extends SnapshotDriverError {}

/** libvirt (through virsh) refused or failed a command; the message is virsh's, with the command. */
export class LibvirtError extends SnapshotDriverError {
  constructor(
    message: string,
    /** The virsh arguments (the command and the domain), for logs. */
    readonly command: readonly string[],
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * An instance the backend cannot snapshot as it is defined (a libvirt domain with no qcow2 root disk,
 * a transient domain for a strategy that needs a managed save): refused before it is touched.
 */
export class UnsupportedInstance extends SnapshotDriverError {}
