import type { StrategyName } from '../config/schema.js';
import {
  createSnapshot,
  deletePending,
  deleteSnapshot,
  exportDisk,
  exportSnapshot,
  keepAsPending,
  resume,
  suspend,
  type Step,
} from './steps.js';
import { markSaving, quiesce, startBackup, thaw, waitBackup } from './live-steps.js';

/**
 * Every strategy's whole sequence (SPEC §3). "suspend" is a managed save; on a guest with no QEMU
 * process it does nothing, and the same steps then work on the offline disk (`live` then exports it).
 */
export const STRATEGY_STEPS: Readonly<Record<StrategyName, readonly Step[]>> = {
  cold: [suspend, exportDisk, resume],
  'suspend-create-resume-extract': [suspend, createSnapshot, resume, exportSnapshot, deleteSnapshot],
  'double-suspend': [suspend, createSnapshot, resume, exportSnapshot, suspend, deleteSnapshot, resume],
  'deferred-delete': [suspend, deletePending, createSnapshot, resume, exportSnapshot, keepAsPending],
  live: [markSaving, quiesce, startBackup, thaw, waitBackup],
};

/** Internal snapshots a strategy may leave on a running guest's disk. */
export const SNAPSHOTS_LEFT_MAX: Readonly<Record<StrategyName, number>> = {
  cold: 0,
  'suspend-create-resume-extract': 0,
  'double-suspend': 0,
  'deferred-delete': 1,
  live: 0,
};
