import os from 'node:os';
import { z } from 'zod';

/** The value forms of config options: INI values arrive as strings, these check and convert them. */

export const bool = z
  .string()
  .trim()
  .toLowerCase()
  .pipe(z.enum(['true', 'false', 'yes', 'no', 'on', 'off', '1', '0']))
  .transform((s) => ['true', 'yes', 'on', '1'].includes(s));

export const int = (min: number, max = Number.MAX_SAFE_INTEGER) =>
  z
    .string()
    .trim()
    .regex(/^-?\d+$/, 'an integer')
    .transform(Number)
    .pipe(z.number().int().min(min).max(max));

export const num = (min: number) =>
  z
    .string()
    .trim()
    .regex(/^\d+(\.\d+)?$/, 'a number')
    .transform(Number)
    .pipe(z.number().min(min));

/** A number of seconds greater than 0. */
export const positiveNum = z
  .string()
  .trim()
  .regex(/^\d+(\.\d+)?$/, 'a number')
  .transform(Number)
  .pipe(z.number().positive());

export const str = z.string();
export const nonEmpty = z.string().trim().min(1, 'a non-empty string');

const CPU_LIST_FORM = 'a CPU list such as 3 or 2-3,6 (taskset -c), or nothing';

/**
 * A list of this host's CPUs in taskset's `-c` form ("2-3,6"); '' for none. Each CPU must be one of
 * the host's (`hostCpus`, default os.cpus().length; not checked when that is unknown, 0).
 */
export const cpuList = (hostCpus = os.cpus().length) =>
  z
    .string()
    .trim()
    .superRefine((value, ctx) => {
      if (value === '') return;
      if (!/^\d+(-\d+)?(,\d+(-\d+)?)*$/.test(value)) {
        ctx.addIssue({ code: 'custom', message: CPU_LIST_FORM });
        return;
      }
      for (const part of value.split(',')) {
        const bounds = part.split('-').map(Number);
        const lo = bounds[0] ?? 0;
        const hi = bounds[1] ?? lo;
        if (hi < lo) ctx.addIssue({ code: 'custom', message: `${part} runs backwards: ${CPU_LIST_FORM}` });
        else if (hostCpus > 0 && hi >= hostCpus) {
          ctx.addIssue({ code: 'custom', message: `CPU ${hi} is not on this host (it has CPUs 0-${hostCpus - 1})` });
        }
      }
    });
