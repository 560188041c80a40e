import type { Hypervisor, BackupJob, PowerState } from '../hypervisor/types.js';
import type { ImageStoreBackend } from '../image-store/image-store.js';
import type { ImageSink } from '../image-store/incoming-image.js';
import type { Logger } from '../log.js';
import type { WatchedOperation } from '../util/guest-waits.js';
import type { SuspendWindow } from './downtime.js';
import type { GuestFreeze, QuiesceOptions } from './guest-freeze.js';
import type { Lifecycle } from './lifecycle.js';
import type { PendingSnapshots } from './pending.js';

/** What every step of one snapshot operation sees and updates. */
export interface SnapshotContext {
  readonly hv: Hypervisor;
  readonly store: ImageStoreBackend;
  readonly lifecycle: Lifecycle;
  readonly pending: PendingSnapshots;
  readonly log: Logger;
  readonly uuid: string;
  readonly imageId: string;
  /** The internal snapshot this operation makes: name_prefix + image id. */
  readonly snapshotName: string;
  /** Power state before the operation; the guest is back in it afterwards. */
  readonly priorState: PowerState;
  readonly quiesce: QuiesceOptions;
  /** The disk's virtual size: the size of the raw image. */
  readonly diskSize: number;
  onProgress?: (fraction: number) => void;
  /** This operation among the host's (GuestWaits): its background exports hold back while another guest waits. */
  watched?: WatchedOperation;
  /** The image's data as the store receives it from an export (hashed on the way), staged or streamed. */
  incoming?: ImageSink;
  /** True from the start of this operation's managed save until the guest is resumed. */
  suspended: boolean;
  /** Guest downtime so far, in ms: the time its vCPUs did not run (or its I/O was held). */
  downtimeMs: number;
  /** This operation's managed save, until the guest is resumed. */
  suspendWindow?: SuspendWindow;
  /** The guest-agent freeze, once one was asked for. */
  freeze?: GuestFreeze;
  /** live: the backup job, once started. */
  backup?: BackupJob;
  /** The image's point in time was taken (the first managed save, or the backup job's start). */
  pointInTimeTaken?: boolean;
  /** The point in time was taken while the guest's filesystems were frozen. */
  quiesced: boolean;
  /** The guest's QEMU died during the operation and was booted again (its memory state was lost). */
  guestRestarted?: boolean;
}

/** One step of a strategy, and how to undo it when a later step fails. */
export interface Step {
  readonly name: string;
  /**
   * The step exports into the store from a source that can be read again, no guest waiting for it
   * (given the guest's power state before the operation): the store may stream it (exportInto's
   * `background`).
   */
  readonly rerunnableExport?: (priorState: PowerState) => boolean;
  run(ctx: SnapshotContext): Promise<void>;
  undo?(ctx: SnapshotContext): Promise<void>;
}
