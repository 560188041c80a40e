import type { StrategyName } from '../config/schema.js';
import { createSnapshot, deletePending, deleteSnapshot, exportDisk, exportSnapshot, keepAsPending, monitorCreateSnapshot, resume, suspend } from './steps.js';
import type { Step } from './context.js';
import { markSaving, startBackup, waitBackup } from './live-steps.js';
import { quiesce, thaw } from './quiesce-steps.js';

/**
 * Every strategy's whole sequence (SPEC §3). "suspend" is a managed save; on a guest with no QEMU
 * process it does nothing, and the same steps then work on the offline disk (`live` then exports it).
 * A running guest is frozen (quiesce) right before the point in time (the first suspend, the backup
 * start, the snapshot created through the monitor) and thawed as soon as it runs again, or as soon as
 * the point in time is taken where it never stopped; a guest that is not running is never frozen.
 */
export const STRATEGY_STEPS: Readonly<Record<StrategyName, readonly Step[]>> = {
  cold: [quiesce, suspend, exportDisk, resume, thaw],
  'suspend-create-resume-extract': [quiesce, suspend, createSnapshot, resume, thaw, exportSnapshot, deleteSnapshot],
  'double-suspend': [quiesce, suspend, createSnapshot, resume, thaw, exportSnapshot, suspend, deleteSnapshot, resume],
  'deferred-delete': [quiesce, suspend, deletePending, createSnapshot, resume, thaw, exportSnapshot, keepAsPending],
  live: [markSaving, quiesce, startBackup, thaw, waitBackup],
  'monitor-snapshot': [quiesce, monitorCreateSnapshot, thaw, exportSnapshot, deleteSnapshot],
};

/** Whether a strategy managed-saves a guest that has a process (it never stops the vCPUs otherwise). */
export const USES_MANAGED_SAVE: Readonly<Record<StrategyName, boolean>> = {
  cold: true,
  'suspend-create-resume-extract': true,
  'double-suspend': true,
  'deferred-delete': true,
  live: false,
  'monitor-snapshot': false,
};

/** Internal snapshots a strategy may leave on a running guest's disk. */
export const SNAPSHOTS_LEFT_MAX: Readonly<Record<StrategyName, number>> = {
  cold: 0,
  'suspend-create-resume-extract': 0,
  'double-suspend': 0,
  'deferred-delete': 1,
  live: 0,
  'monitor-snapshot': 0,
};
